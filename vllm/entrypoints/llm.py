"""LLM: the offline entry point. ``LLM(model).generate(prompts, params)``."""
import dataclasses
import difflib
import itertools
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from vllm import envs
from vllm.beam_search import BeamSearchOutput, BeamSearchSequence
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine, PromptType, TokensPrompt
from vllm.logger import enable_trace_function_call, init_logger
from vllm.outputs import RequestOutput
from vllm.sampling_params import (BeamSearchParams, RequestOutputKind,
                                  SamplingParams)
from vllm.transformers_utils.tokenizer import AnyTokenizer

logger = init_logger(__name__)


class LLM:
    """An engine for offline generation, with vLLM's arguments.

    Extra keyword arguments go to :class:`EngineArgs` (``max_model_len``,
    ``block_size``, ``max_num_seqs``, ``load_format``, ``device``, ...); an
    unknown one is a TypeError.
    """

    def __init__(self,
                 model: str,
                 *,
                 tokenizer: str | None = None,
                 tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1,
                 dtype: Any = "auto",
                 quantization: str | None = None,
                 revision: str | None = None,
                 tokenizer_revision: str | None = None,
                 seed: int = 0,
                 gpu_memory_utilization: float = 0.9,
                 swap_space: float = 4,
                 cpu_offload_gb: float = 0,
                 enforce_eager: bool = False,
                 max_seq_len_to_capture: int = 8192,
                 disable_log_stats: bool = True,
                 **kwargs: Any) -> None:
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"LLM() got an unexpected keyword argument {name!r}.{hint}")
        if envs.VLLM_TRACE_FUNCTION:
            enable_trace_function_call()
        engine_args = EngineArgs(model=model,
                                 tokenizer=tokenizer,
                                 tokenizer_mode=tokenizer_mode,
                                 skip_tokenizer_init=skip_tokenizer_init,
                                 trust_remote_code=trust_remote_code,
                                 tensor_parallel_size=tensor_parallel_size,
                                 dtype=dtype,
                                 quantization=quantization,
                                 revision=revision,
                                 tokenizer_revision=tokenizer_revision,
                                 seed=seed,
                                 gpu_memory_utilization=gpu_memory_utilization,
                                 swap_space=swap_space,
                                 cpu_offload_gb=cpu_offload_gb,
                                 enforce_eager=enforce_eager,
                                 max_seq_len_to_capture=max_seq_len_to_capture,
                                 disable_log_stats=disable_log_stats,
                                 **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(engine_args)
        self._request_counter = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults
        (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens)."""
        config = self.llm_engine.generation_config
        names = {
            "temperature": "temperature",
            "top_p": "top_p",
            "top_k": "top_k",
            "min_p": "min_p",
            "repetition_penalty": "repetition_penalty",
            "max_new_tokens": "max_tokens",
        }
        return SamplingParams(
            **{
                ours: config[theirs]
                for theirs, ours in names.items()
                if config.get(theirs) is not None
            })

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams]
        | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None
    ) -> list[RequestOutput]:
        """Generate replies to conversations (one, or a list of them), each
        rendered with the tokenizer's chat template (or ``chat_template``)."""
        conversations = (messages if messages and isinstance(messages[0], list)
                         else [messages])
        tokenizer = self.get_tokenizer()
        prompts: list[PromptType] = []
        for conversation in conversations:
            try:
                text = tokenizer.apply_chat_template(
                    conversation,  # type: ignore[arg-type]
                    chat_template=chat_template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    **(chat_template_kwargs or {}))
            except ValueError as err:
                raise ValueError(
                    f"Cannot render the conversation: {err} Pass "
                    "chat_template= or use a model whose tokenizer has "
                    "one.") from err
            # The template writes the special tokens (BOS) itself.
            ids = tokenizer.encode(str(text), add_special_tokens=False)
            prompts.append(TokensPrompt(prompt_token_ids=ids, prompt=str(text)))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes (enable_prefix_caching=True)."""
        return self.llm_engine.reset_prefix_cache()

    def get_tokenizer(self) -> AnyTokenizer:
        return self.llm_engine.get_tokenizer()

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams]
        | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for the prompts; outputs in the prompts' order.

        Every prompt is validated before any work starts: a bad one raises
        ValueError naming it, and nothing is queued.
        """
        if lora_request is not None:
            raise ValueError("LoRA is not supported by this engine.")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = (list(sampling_params) if isinstance(
            sampling_params, SequenceABC) else [sampling_params] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"Got {len(params_list)} SamplingParams for "
                             f"{len(prompts)} prompts; pass one or one each.")
        priorities = priority if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"Got {len(priorities)} priorities for "
                             f"{len(prompts)} prompts.")

        engine = self.llm_engine
        request_ids = [str(next(self._request_counter)) for _ in prompts]
        processed: list[TokensPrompt] = [
            engine.preprocess_prompt(
                p, rid, getattr(params, "truncate_prompt_tokens", None))
            for p, rid, params in zip(prompts, request_ids, params_list)
        ]
        final_params = []
        for params in params_list:
            params = params.clone()
            params.output_kind = RequestOutputKind.FINAL_ONLY
            final_params.append(params)
        added: list[str] = []
        try:
            for rid, prompt, params, prio in zip(request_ids, processed,
                                                 final_params, priorities):
                engine.add_request(rid, prompt, params, priority=prio)
                added.append(rid)
            return self._run_engine(request_ids, use_tqdm)
        except BaseException:
            # Leave the engine clean for the next call.
            engine.abort_request(added)
            raise

    def beam_search(self,
                    prompts: PromptType | SequenceABC[PromptType],
                    params: BeamSearchParams,
                    *,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """The ``params.beam_width`` best sequences of each prompt, best first,
        as transformers' beam search finds them (see vllm/beam_search.py).
        Each sequence's ``tokens`` and ``text`` include the prompt."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError("beam_search takes BeamSearchParams, got "
                             f"{type(params).__name__}.")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        engine = self.llm_engine
        request_ids = [str(next(self._request_counter)) for _ in prompts]
        processed = [
            engine.preprocess_prompt(p, rid)
            for p, rid in zip(prompts, request_ids)
        ]
        added: list[str] = []
        try:
            for rid, prompt in zip(request_ids, processed):
                engine.add_beam_search_request(rid, prompt, params)
                added.append(rid)
            outputs = self._run_engine(request_ids, use_tqdm)
        except BaseException:
            engine.abort_request(added)
            raise
        tokenizer = engine.tokenizer
        results = []
        for out in outputs:
            sequences = []
            for completion in out.outputs:
                tokens = out.prompt_token_ids + completion.token_ids
                sequences.append(
                    BeamSearchSequence(tokens=tokens,
                                       logprobs=completion.logprobs or [],
                                       cum_logprob=completion.cumulative_logprob
                                       or 0.0,
                                       text=(str(tokenizer.decode(tokens)) if
                                             tokenizer is not None else None),
                                       finish_reason=completion.finish_reason))
            results.append(BeamSearchOutput(sequences=sequences))
        return results

    def _run_engine(self, request_ids: list[str],
                    use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        pbar = tqdm(total=len(request_ids),
                    desc="Processed prompts",
                    dynamic_ncols=True,
                    disable=not use_tqdm)
        in_toks = out_toks = 0
        with pbar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if not output.finished:
                        continue
                    finished[output.request_id] = output
                    in_toks += len(output.prompt_token_ids)
                    out_toks += sum(len(o.token_ids) for o in output.outputs)
                    elapsed = pbar.format_dict["elapsed"] or 1e-9
                    pbar.set_postfix_str(
                        f"est. speed input: {in_toks / elapsed:.2f} toks/s, "
                        f"output: {out_toks / elapsed:.2f} toks/s",
                        refresh=False)
                    pbar.update(1)
        return [finished[rid] for rid in request_ids]
