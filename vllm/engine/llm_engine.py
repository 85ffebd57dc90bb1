"""LLMEngine: requests in, one scheduled model step at a time, RequestOutputs out.

    add_request -> SequenceGroup -> scheduler.waiting
    step():  scheduler.schedule() -> executor.execute_model() (launch)
             [schedule and launch the next step: async scheduling]
             -> wait for the sampled tokens -> _process_outputs()
             (append tokens, detokenize, check stops) -> free finished blocks

Async scheduling (``async_scheduling=True``, the default): while step N runs
on the device, the engine already schedules and launches step N+1, each
sequence that samples in step N holding ``PLACEHOLDER_TOKEN_ID`` as its last
token (the model runner reads the real one on the device). Host work then
overlaps the GPU's. A sequence that stops at step N was computed once more in
step N+1; that row is dropped. Steps whose requests need their sampled tokens
on the host before the next step (bad words, logits processors, beam search, a
pending fork, prompt logprobs) and prefix caching (block hashes read the
tokens) run one at a time.
"""
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from vllm.beam_search import Beam, BeamSearch
from vllm.config import VllmConfig
from vllm.core.block_manager import BlockManager, SmartBlockAllocator
from vllm.core.scheduler import (PriorityScheduler, ScheduledSequenceGroup,
                                 Scheduler, SchedulerOutputs)
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.metrics import StatLogger
from vllm.engine.stop_checker import StopChecker
from vllm.executor.uniproc_executor import UniProcExecutor
from vllm.logger import init_logger
from vllm.model_executor.layers.sampler import LogprobsTensors
from vllm.model_executor.sampling_metadata import sequence_key
from vllm.outputs import (CompletionOutput, Logprob, PromptLogprobs,
                          RequestOutput)
from vllm.sampling_params import (BeamSearchParams, RequestOutputKind,
                                  SamplingParams)
from vllm.sequence import (PLACEHOLDER_TOKEN_ID, ScheduledSequence, Sequence,
                           SequenceGroup, SequenceStatus)
from vllm.transformers_utils.config import get_generation_config
from vllm.transformers_utils.detokenizer import IncrementalDetokenizer
from vllm.transformers_utils.tokenizer import (AnyTokenizer, encode_prompt,
                                               get_tokenizer)
from vllm.worker.model_runner import ModelRunnerOutput, PendingOutput

logger = init_logger(__name__)


@dataclass
class _LaunchedStep:
    """A step on the device whose tokens the host has not processed yet."""
    sched: SchedulerOutputs
    scheduled: list[ScheduledSequence]
    pending: PendingOutput
    # Its sequences were advanced (computed tokens, placeholders) when the
    # next step was scheduled.
    advanced: bool = False


def needs_host_tokens(params: SamplingParams) -> bool:
    """Whether a request's next step needs the tokens sampled so far on the
    host: the sampler reads them (bad words, logits processors). Penalties
    take a step's tokens from the device (``SamplingState.sampled``) and
    min_tokens only counts them."""
    return bool(params.bad_words or params.logits_processors)


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str  # optional: the text the ids came from, echoed in outputs


PromptType = str | TextPrompt | TokensPrompt


class LLMEngine:

    def __init__(self, vllm_config: VllmConfig, log_stats: bool = True) -> None:
        self.vllm_config = vllm_config
        self.model_config = model_config = vllm_config.model_config
        logger.info(
            "Initializing engine: model=%r, dtype=%s, max_model_len=%d, "
            "device=%s, block_size=%d", model_config.model, model_config.dtype,
            model_config.max_model_len, vllm_config.device_config.device,
            vllm_config.cache_config.block_size)
        self.tokenizer: AnyTokenizer | None = None
        if not model_config.skip_tokenizer_init:
            self.tokenizer = get_tokenizer(
                model_config.tokenizer,
                revision=model_config.tokenizer_revision)
        self.generation_config = get_generation_config(model_config.model,
                                                       model_config.revision)
        self.executor = UniProcExecutor(vllm_config)
        self.scheduler = _make_scheduler(vllm_config,
                                         self.executor.num_gpu_blocks,
                                         self.executor.num_cpu_blocks)
        self.stat_logger = StatLogger() if log_stats else None
        self.stop_checker = StopChecker(model_config.max_model_len,
                                        self._eos_token_ids())
        self.seq_groups: dict[str, SequenceGroup] = {}
        self._seq_counter = itertools.count()
        # DELTA outputs: (tokens, characters) already returned per sequence.
        self._returned: dict[int, tuple[int, int]] = {}
        # DELTA outputs: prompt logprobs already returned per request.
        self._returned_prompt_logprobs: dict[str, int] = {}
        # Async scheduling: the step launched ahead, not yet processed.
        self._in_flight: _LaunchedStep | None = None
        self._async_scheduling = (
            vllm_config.scheduler_config.async_scheduling
            and not vllm_config.cache_config.enable_prefix_caching)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        return cls(engine_args.create_engine_config(),
                   log_stats=not engine_args.disable_log_stats)

    def get_tokenizer(self) -> AnyTokenizer:
        if self.tokenizer is None:
            raise ValueError("The tokenizer was not initialised "
                             "(skip_tokenizer_init=True).")
        return self.tokenizer

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.generation_config.get("eos_token_id"),
                       getattr(self.model_config.hf_config, "eos_token_id",
                               None),
                       self.tokenizer.eos_token_id if self.tokenizer else None):
            if source is None:
                continue
            ids.update(source if isinstance(source, list) else [source])
        return ids

    # ------------------------------------------------------------ requests
    def preprocess_prompt(
            self,
            prompt: PromptType,
            request_id: str,
            truncate_prompt_tokens: int | None = None) -> TokensPrompt:
        """Tokenize and validate one prompt; ValueError names what is wrong.

        ``truncate_prompt_tokens`` (SamplingParams') keeps the last k tokens
        (left truncation, as vLLM: a BOS at the start is cut too); -1 means
        k = max_model_len. The length check applies after truncation.
        """
        if isinstance(prompt, str):
            prompt = TextPrompt(prompt=prompt)
        if not isinstance(prompt, dict) or not ("prompt" in prompt or
                                                "prompt_token_ids" in prompt):
            raise ValueError(
                f"Prompt of request {request_id} must be a str, "
                "{'prompt': str} or {'prompt_token_ids': [...]}, got "
                f"{type(prompt).__name__}.")
        text = prompt.get("prompt")
        if "prompt_token_ids" in prompt:
            token_ids = list(prompt["prompt_token_ids"])  # type: ignore
        else:
            assert text is not None
            token_ids = encode_prompt(self.get_tokenizer(), text)
        shown = repr(text[:40]) if text is not None else repr(token_ids[:8])
        if not token_ids or text == "":
            raise ValueError(f"The prompt of request {request_id} ({shown}) "
                             "is empty.")
        max_len = self.model_config.max_model_len
        if truncate_prompt_tokens is not None:
            keep = self._truncation_size(truncate_prompt_tokens)
            token_ids = token_ids[-keep:]
        if len(token_ids) > max_len:
            raise ValueError(
                f"The prompt of request {request_id} ({shown}) is "
                f"{len(token_ids)} tokens long, longer than the maximum model "
                f"length of {max_len}. Shorten it or raise max_model_len.")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"The prompt of request {request_id} ({shown}) "
                             f"has token ids outside the vocabulary "
                             f"[0, {vocab}): {bad[:10]}.")
        out = TokensPrompt(prompt_token_ids=token_ids)
        if text is not None:
            out["prompt"] = text
        return out

    def _truncation_size(self, truncate_prompt_tokens: int) -> int:
        """How many prompt tokens truncate_prompt_tokens keeps."""
        max_len = self.model_config.max_model_len
        if truncate_prompt_tokens == -1:
            return max_len
        if not (isinstance(truncate_prompt_tokens, int)
                and 1 <= truncate_prompt_tokens <= max_len):
            raise ValueError(
                f"truncate_prompt_tokens ({truncate_prompt_tokens}) must be "
                f"-1 or in [1, max_model_len={max_len}].")
        return truncate_prompt_tokens

    def _validate_params(self, params: SamplingParams) -> None:
        """Engine-time checks of vLLM."""
        max_logprobs = self.model_config.max_logprobs
        for kind, value in (("sample", params.logprobs),
                            ("prompt", params.prompt_logprobs)):
            if value is not None and max_logprobs != -1 and (
                    value == -1 or value > max_logprobs):
                raise ValueError(
                    f"Requested {kind} logprobs of {value}, which is "
                    f"greater than max allowed: {max_logprobs}.")
        vocab = self.model_config.vocab_size
        bad = [t for t in params.stop_token_ids or () if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})."
            )
        for name, ids in (("logit_bias", list(params.logit_bias or {})),
                          ("allowed_token_ids", params.allowed_token_ids
                           or [])):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name} has token ids outside the "
                                 f"vocabulary [0, {vocab}): {bad[:10]}.")
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise ValueError("Stop strings and bad_words need a tokenizer "
                             "(skip_tokenizer_init=True was given).")

    def add_request(self,
                    request_id: str,
                    prompt: PromptType,
                    params: SamplingParams,
                    arrival_time: float | None = None,
                    priority: int = 0) -> None:
        """Queue a request. Raises ValueError (and queues nothing) on bad input."""
        self._check_new_request(request_id, priority)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"Request {request_id}: expected SamplingParams, "
                             f"got {type(params).__name__}.")
        tokens_prompt = self.preprocess_prompt(prompt, request_id,
                                               params.truncate_prompt_tokens)
        self._validate_params(params)
        params = params.clone()
        if params.bad_words and self.tokenizer is not None:
            params.update_from_tokenizer(self.tokenizer)
        params.update_from_generation_config(
            self.generation_config,
            getattr(self.model_config.hf_config, "eos_token_id", None))
        generator = None
        if params.seed is not None:
            # On the host (the torch path copies its noise over); the
            # sampler's kernels use the sequences' seed_key instead.
            generator = torch.Generator().manual_seed(params.seed)
        self._queue(request_id, tokens_prompt, params, arrival_time, priority,
                    generator)

    def add_beam_search_request(self,
                                request_id: str,
                                prompt: PromptType,
                                params: BeamSearchParams,
                                arrival_time: float | None = None,
                                priority: int = 0) -> None:
        """Queue a beam search (vllm/beam_search.py): its sequences are the
        live beams; the finished output holds the ``beam_width`` best
        sequences, best first."""
        self._check_new_request(request_id, priority)
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"Request {request_id}: expected "
                             f"BeamSearchParams, got {type(params).__name__}.")
        tokens_prompt = self.preprocess_prompt(prompt, request_id)
        room = (self.model_config.max_model_len -
                len(tokens_prompt["prompt_token_ids"]))
        search = BeamSearch(
            params.beam_width, max(1, min(params.max_tokens, room)),
            params.length_penalty,
            set() if params.ignore_eos else self._eos_token_ids())
        vocab = self.model_config.vocab_size
        if search.num_candidates > vocab:
            raise ValueError(
                f"beam_width={params.beam_width} needs "
                f"{search.num_candidates} candidates per step, more than the "
                f"vocabulary's {vocab} tokens.")
        # Each step every beam computes one token and returns its best
        # candidates; the greedy token it samples is not used as such.
        step_params = SamplingParams(temperature=0.0,
                                     max_tokens=search.max_tokens,
                                     ignore_eos=True,
                                     logprobs=search.num_candidates,
                                     detokenize=False,
                                     output_kind=RequestOutputKind.FINAL_ONLY)
        group = self._queue(request_id, tokens_prompt, step_params,
                            arrival_time, priority, None)
        group.beam_search = search

    def _check_new_request(self, request_id: str, priority: int) -> None:
        if request_id in self.seq_groups:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        if priority != 0 and self.vllm_config.scheduler_config.policy != \
                "priority":
            raise ValueError("Priority scheduling is not enabled "
                             f"(request {request_id} has priority {priority}); "
                             "pass scheduling_policy='priority'.")

    def _queue(self, request_id: str, tokens_prompt: TokensPrompt,
               params: SamplingParams, arrival_time: float | None,
               priority: int,
               generator: torch.Generator | None) -> SequenceGroup:
        prompt_ids = tokens_prompt["prompt_token_ids"]
        seqs = [
            Sequence(next(self._seq_counter), prompt_ids,
                     self._make_detokenizer(prompt_ids, params))
            for _ in range(params.n)
        ]
        if params.seed is not None:
            for index, seq in enumerate(seqs):
                seq.seed_key = sequence_key(params.seed, index)
        seq_group = SequenceGroup(request_id,
                                  seqs,
                                  params,
                                  prompt=tokens_prompt.get("prompt"),
                                  arrival_time=arrival_time,
                                  priority=priority,
                                  generator=generator)
        self.seq_groups[request_id] = seq_group
        self.scheduler.add_seq_group(seq_group)
        return seq_group

    def _make_detokenizer(
            self, prompt_ids: list[int],
            params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None or not params.detokenize:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                      params.skip_special_tokens,
                                      params.spaces_between_special_tokens)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests wherever they are; their blocks are freed at once."""
        ids = {request_id} if isinstance(request_id, str) else set(request_id)
        aborted = self.scheduler.abort_seq_group(ids)
        for seq_group in aborted:
            self._forget(seq_group)
        if aborted and self.stat_logger is not None:
            for _ in aborted:
                self.stat_logger.record_finished("abort", None)
            self.stat_logger.update_gauges(**self._scheduler_stats())

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_seqs()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_seq_groups()

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return outputs of the requests it advanced.

        With async scheduling the batch may have been launched by the last
        call, and the next one is launched before this one is processed.
        """
        outputs: list[RequestOutput] = []
        step = self._in_flight or self._launch(outputs)
        self._in_flight = None
        if step is None:
            return outputs
        if self._can_run_ahead(step):
            self._advance(step)
            self._in_flight = self._launch(outputs)
        result = step.pending.get()
        # Requests that finished (or were aborted) after this step was
        # launched: their rows are dropped, their outputs already returned.
        live = [
            sg for sg in step.sched.scheduled_seq_groups
            if not sg.seq_group.is_finished()
        ]
        generated = self._process_outputs(live, result, step.advanced)
        self.scheduler.free_finished_seq_groups()
        if self.stat_logger is not None:
            self._log_stats(step.scheduled, generated)
        for sg in live:
            output = self._make_output(sg.seq_group)
            if output is not None:
                outputs.append(output)
        return outputs

    def _launch(self, outputs: list[RequestOutput]) -> _LaunchedStep | None:
        """Schedule a step and queue it on the device; requests the
        scheduler ignored go to ``outputs``."""
        sched = self.scheduler.schedule()
        outputs.extend(self._finish(g) for g in sched.ignored_seq_groups)
        if sched.is_empty:
            return None
        scheduled = [
            self._to_scheduled_sequence(seq, sg)
            for sg in sched.scheduled_seq_groups
            for seq in sg.seq_group.get_unfinished_seqs()
        ]
        pending = self.executor.execute_model(scheduled,
                                              sched.blocks_to_swap_out,
                                              sched.blocks_to_swap_in,
                                              sched.blocks_to_copy)
        return _LaunchedStep(sched, scheduled, pending)

    def _can_run_ahead(self, step: _LaunchedStep) -> bool:
        """Whether the next step may be scheduled before ``step``'s tokens
        reach the host: none of its requests needs them there first, none
        reaches max_model_len (the next step has no slot for it), and some
        sequence goes on after it."""
        if not (self._async_scheduling and step.pending.final_on_device):
            return False
        max_model_len = self.model_config.max_model_len
        goes_on = False
        for sg in step.sched.scheduled_seq_groups:
            group = sg.seq_group
            params = group.sampling_params
            if (group.beam_search is not None or group.fork_pending
                    or not group.prompt_logprobs_complete
                    or needs_host_tokens(params)):
                return False
            for seq in group.get_unfinished_seqs():
                if seq.num_computed_tokens + sg.token_chunk_size < \
                        seq.num_tokens:
                    goes_on = True  # a prompt chunk: samples nothing yet
                elif seq.num_tokens + 1 >= max_model_len:
                    return False
                elif (params.max_tokens is None
                      or len(seq.output_token_ids) + 1 < params.max_tokens):
                    goes_on = True
        return goes_on

    @staticmethod
    def _advance(step: _LaunchedStep) -> None:
        """Account for ``step`` before its tokens arrive: its tokens are
        computed, and each sequence that samples holds a placeholder."""
        step.advanced = True
        for sg in step.sched.scheduled_seq_groups:
            for seq in sg.seq_group.get_unfinished_seqs():
                seq.num_computed_tokens += sg.token_chunk_size
                if seq.num_computed_tokens == seq.num_tokens:
                    seq.output_token_ids.append(PLACEHOLDER_TOKEN_ID)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; refused (False) while requests run."""
        return self.scheduler.block_manager.reset_prefix_cache()

    def _log_stats(self, scheduled: list[ScheduledSequence],
                   num_generated: int) -> None:
        assert self.stat_logger is not None
        num_prompt = sum(
            max(
                0,
                min(len(s.token_ids),
                    len(s.prompt_token_ids) - s.num_computed_tokens))
            for s in scheduled)
        self.stat_logger.record_step(num_prompt, num_generated)
        self.stat_logger.maybe_log(**self._scheduler_stats())

    def _scheduler_stats(self) -> dict[str, Any]:
        """The queue and cache gauges StatLogger logs and /metrics shows."""
        bm = self.scheduler.block_manager
        return dict(num_running=len(self.scheduler.running),
                    num_waiting=len(self.scheduler.waiting),
                    num_swapped=len(self.scheduler.swapped),
                    kv_cache_usage=bm.usage,
                    prefix_cache_hit_rate=(bm.prefix_cache_hit_rate
                                           if bm.enable_caching else None),
                    num_preemptions=self.scheduler.num_cumulative_preemption)

    @staticmethod
    def _to_scheduled_sequence(seq: Sequence,
                               sg: ScheduledSequenceGroup) -> ScheduledSequence:
        chunk = sg.token_chunk_size
        group = sg.seq_group
        # One sequence of the group computes the prompt logprobs still missing.
        prompt_logprobs_from = None
        if (group.prompt_logprobs is not None
                and not group.prompt_logprobs_complete
                and seq is group.get_unfinished_seqs()[0]):
            prompt_logprobs_from = len(group.prompt_logprobs)
        return ScheduledSequence(seq_id=seq.seq_id,
                                 token_ids=seq.uncomputed_token_ids(chunk),
                                 num_computed_tokens=seq.num_computed_tokens,
                                 block_table=seq.block_table,
                                 do_sample=seq.num_computed_tokens +
                                 chunk == seq.num_tokens,
                                 sampling_params=group.sampling_params,
                                 generator=group.generator,
                                 prompt_token_ids=seq.prompt_token_ids,
                                 output_token_ids=seq.output_token_ids,
                                 prompt_logprobs_from=prompt_logprobs_from,
                                 seed_key=seq.seed_key)

    def _process_outputs(self, scheduled: list[ScheduledSequenceGroup],
                         result: ModelRunnerOutput, advanced: bool) -> int:
        """The one place where request state advances after a step
        (``advanced``: its computed tokens were counted when the next step
        was scheduled, and its sampled tokens are placeholders). -> the
        number of sampled tokens used (rows of requests that stopped since
        the launch are not)."""
        now = time.time()
        row_of = {seq_id: i for i, seq_id in enumerate(result.seq_ids)}
        generated = 0
        for sg in scheduled:
            group = sg.seq_group
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
            if group.beam_search is not None:
                sampled = self._advance_beams(group, sg.token_chunk_size,
                                              result, row_of)
            else:
                sampled = self._advance_samples(
                    group, 0 if advanced else sg.token_chunk_size, result,
                    row_of, advanced)
            generated += sampled
            if not sampled:
                continue  # a prompt chunk that is not the last one
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
                if self.stat_logger is not None:
                    self.stat_logger.record_first_token(
                        len(group.prompt_token_ids),
                        now - group.metrics.arrival_time)
            group.metrics.last_token_time = now
        return generated

    def _advance_samples(self, group: SequenceGroup, chunk: int,
                         result: ModelRunnerOutput, row_of: dict[int, int],
                         placeholders: bool) -> int:
        """Record prompt logprobs; append each sampled token (in place of its
        placeholder), detokenize it and check whether its sequence stops.
        -> the number of tokens appended."""
        params = group.sampling_params
        # With placeholders, every sequence that held one: a preemption
        # since may have left only the leader scheduled (a fork pending).
        seqs = ([seq for seq in group.seqs if not seq.is_finished]
                if placeholders else group.get_unfinished_seqs())
        appended = 0
        for seq in seqs:
            seq.num_computed_tokens += chunk
            if seq.seq_id in result.prompt_logprobs:
                self._record_prompt_logprobs(
                    group, *result.prompt_logprobs[seq.seq_id])
            row = row_of.get(seq.seq_id)
            if row is None:
                continue  # a prompt chunk that is not the last one
            token_id = result.sampled_token_ids[row]
            logprobs = None
            if params.logprobs is not None and result.logprobs is not None:
                logprobs = self._logprobs_of_row(result.logprobs, row,
                                                 params.logprobs)
            if placeholders:
                assert seq.output_token_ids[-1] == PLACEHOLDER_TOKEN_ID
                seq.output_token_ids.pop()
            seq.append_token(token_id, logprobs)
            appended += 1
            stopped = self.stop_checker.check_stop_token(seq, params)
            new_chars = 0
            if seq.detokenizer is not None and (
                    not stopped or params.include_stop_str_in_output):
                new_text = seq.detokenizer.append([token_id])
                seq.output_text += new_text
                new_chars = len(new_text)
            if not stopped:
                self.stop_checker.check_stop_text_and_length(
                    seq, new_chars, params)
        return appended

    def _advance_beams(self, group: SequenceGroup, chunk: int,
                       result: ModelRunnerOutput, row_of: dict[int,
                                                               int]) -> int:
        """A beam-search step: pick the next beams from the candidates of
        each live beam, fork the sequence of a beam kept more than once
        (blocks shared), free the beams dropped, finish when done. -> the
        number of beams that sampled."""
        search = group.beam_search
        seqs = group.get_unfinished_seqs()
        for seq in seqs:
            seq.num_computed_tokens += chunk
        if seqs[0].seq_id not in row_of:
            return 0  # a prompt chunk that is not the last one
        assert search is not None and result.logprobs is not None
        candidates = [
            self._logprobs_of_row(result.logprobs,
                                  row_of[seq.seq_id],
                                  search.num_candidates,
                                  decode=False) for seq in seqs
        ]
        next_beams = search.step([
            Beam(seq.output_token_ids, seq.cumulative_logprob,
                 seq.output_logprobs) for seq in seqs
        ], candidates)
        if search.done:
            for seq in seqs:  # their blocks go after this step
                seq.status = SequenceStatus.FINISHED_STOPPED
            return len(seqs)
        kept: list[Sequence] = []
        parents: set[int] = set()
        for parent, _ in next_beams:
            if parent in parents:
                child = seqs[parent].fork(next(self._seq_counter))
                self.scheduler.fork_seq(seqs[parent], child)
                kept.append(child)
            else:
                parents.add(parent)
                kept.append(seqs[parent])
        # Only now: a fork copies its parent's tokens before this step's.
        for seq, (parent, token) in zip(kept, next_beams):
            seq.append_token(token, candidates[parent])
        for i, seq in enumerate(seqs):
            if i not in parents:
                self.scheduler.free_seq(seq)
        group.seqs = kept
        return len(seqs)

    def _record_prompt_logprobs(self, group: SequenceGroup, first_token: int,
                                tensors: LogprobsTensors) -> None:
        """Append the entries of prompt tokens ``first_token, ...``; entries
        already recorded (a recompute after preemption) are skipped."""
        recorded = group.prompt_logprobs
        num_logprobs = group.sampling_params.prompt_logprobs
        assert recorded is not None and num_logprobs is not None
        assert first_token <= len(recorded), "prompt logprobs skipped a token"
        for row in range(
                len(recorded) - first_token, tensors.logprobs.shape[0]):
            recorded.append(self._logprobs_of_row(tensors, row, num_logprobs))

    def _logprobs_of_row(self,
                         tensors: LogprobsTensors,
                         row: int,
                         num_logprobs: int,
                         decode: bool = True) -> dict[int, Logprob]:
        """The sampled token and the top ``num_logprobs`` tokens of one row
        (``decode=False``: no decoded_token yet, see _fill_decoded)."""
        ids = tensors.logprob_token_ids[row].tolist()
        values = tensors.logprobs[row].tolist()
        if num_logprobs == -1:
            num_logprobs = len(ids) - 1
        decoded = self._decode_token if decode else lambda _: None
        result = {
            ids[0]:
            Logprob(values[0], int(tensors.selected_token_ranks[row]),
                    decoded(ids[0]))
        }
        for rank in range(1, num_logprobs + 1):
            result.setdefault(ids[rank],
                              Logprob(values[rank], rank, decoded(ids[rank])))
        return result

    def _decode_token(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return str(self.tokenizer.decode([token_id]))

    def _fill_decoded(self, steps: list[dict[int, Logprob]]) -> None:
        for step in steps:
            for token_id, logprob in step.items():
                if logprob.decoded_token is None:
                    logprob.decoded_token = self._decode_token(token_id)

    # ------------------------------------------------------------- outputs
    def _finish(self, seq_group: SequenceGroup) -> RequestOutput:
        output = self._make_output(seq_group)
        assert output is not None
        return output

    def _make_output(self, seq_group: SequenceGroup) -> RequestOutput | None:
        finished = seq_group.is_finished()
        params = seq_group.sampling_params
        kind = params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        finished_time = time.time()
        if finished:
            seq_group.metrics.finished_time = finished_time
        if seq_group.beam_search is not None:
            completions = self._beam_completions(seq_group.beam_search)
        else:
            completions = [
                self._completion(i, seq, params, kind)
                for i, seq in enumerate(seq_group.seqs)
            ]
        prompt_logprobs = self._prompt_logprobs_output(seq_group, kind)
        if finished:
            self._forget(seq_group)
            if self.stat_logger is not None:
                # One per request: the reason of its first (best) completion.
                self.stat_logger.record_finished(
                    completions[0].finish_reason if completions else None,
                    finished_time - seq_group.metrics.arrival_time)
        return RequestOutput(request_id=seq_group.request_id,
                             prompt=seq_group.prompt,
                             prompt_token_ids=seq_group.prompt_token_ids,
                             prompt_logprobs=prompt_logprobs,
                             outputs=completions,
                             finished=finished,
                             metrics=seq_group.metrics,
                             num_cached_tokens=seq_group.num_cached_tokens or 0)

    def _prompt_logprobs_output(
            self, seq_group: SequenceGroup,
            kind: RequestOutputKind) -> PromptLogprobs | None:
        """The prompt logprobs so far; DELTA: those not returned before
        (None when there are none)."""
        recorded = seq_group.prompt_logprobs
        if recorded is None or kind != RequestOutputKind.DELTA:
            return None if recorded is None else list(recorded)
        start = self._returned_prompt_logprobs.get(seq_group.request_id, 0)
        self._returned_prompt_logprobs[seq_group.request_id] = len(recorded)
        return recorded[start:] or None

    def _beam_completions(self, search: BeamSearch) -> list[CompletionOutput]:
        """The kept hypotheses, best first (none yet while running)."""
        completions = []
        for index, hypothesis in enumerate(search.finished):
            beam = hypothesis.beam
            self._fill_decoded(beam.logprobs)
            text = ""
            if self.tokenizer is not None:
                text = str(
                    self.tokenizer.decode(beam.token_ids,
                                          skip_special_tokens=True))
            completions.append(
                CompletionOutput(index=index,
                                 text=text,
                                 token_ids=beam.token_ids,
                                 cumulative_logprob=beam.cum_logprob,
                                 logprobs=beam.logprobs,
                                 finish_reason=hypothesis.finish_reason))
        return completions

    def _completion(self, index: int, seq: Sequence, params: SamplingParams,
                    kind: RequestOutputKind) -> CompletionOutput:
        text = seq.output_text
        if not seq.is_finished and params.output_text_buffer_length:
            # Hold back what may still become the start of a stop string.
            text = text[:max(0, len(text) - params.output_text_buffer_length)]
        token_ids = seq.output_token_ids
        logprobs = seq.output_logprobs if params.logprobs is not None else None
        if kind == RequestOutputKind.DELTA:
            num_tokens, num_chars = self._returned.get(seq.seq_id, (0, 0))
            self._returned[seq.seq_id] = (len(token_ids), len(text))
            text, token_ids = text[num_chars:], token_ids[num_tokens:]
            if logprobs is not None:
                logprobs = logprobs[num_tokens:]
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=list(token_ids),
            cumulative_logprob=(seq.cumulative_logprob
                                if logprobs is not None else None),
            logprobs=logprobs,
            finish_reason=seq.status.finish_reason,
            stop_reason=seq.stop_reason)

    def _forget(self, seq_group: SequenceGroup) -> None:
        self.seq_groups.pop(seq_group.request_id, None)
        self._returned_prompt_logprobs.pop(seq_group.request_id, None)
        for seq in seq_group.seqs:
            self._returned.pop(seq.seq_id, None)


def _make_scheduler(vllm_config: VllmConfig, num_gpu_blocks: int,
                    num_cpu_blocks: int) -> Scheduler:
    """The scheduler and block manager the configuration asks for."""
    cache = vllm_config.cache_config
    manager_cls = (SmartBlockAllocator
                   if cache.block_allocator == "smart" else BlockManager)
    block_manager = manager_cls(cache.block_size,
                                num_gpu_blocks,
                                enable_caching=cache.enable_prefix_caching,
                                num_cpu_blocks=num_cpu_blocks)
    scheduler_cls = (PriorityScheduler if vllm_config.scheduler_config.policy
                     == "priority" else Scheduler)
    return scheduler_cls(vllm_config.scheduler_config, block_manager)
