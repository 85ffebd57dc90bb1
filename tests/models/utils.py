"""Helpers of the end-to-end model tests: greedy generation through Hugging
Face and through ``LLM`` on the same checkpoint, in the shape that
tests/utils.py's comparisons take."""
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (AutoModelForCausalLM, GenerationConfig,
                          PretrainedConfig, PreTrainedModel)

from tests.models.test_model_forward import make_hf_model, save_model
from tests.utils import (TokensTextLogprobs, check_logprobs_close,
                         check_outputs_equal)
from vllm import LLM, SamplingParams

NUM_LOGPROBS = 5

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def copy_tokenizer(tokenizer_dir: Path, model_dir: Path) -> None:
    """Put a tokenizer (e.g. stories260K's, 512 tokens) beside a model."""
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, model_dir / name)


def build_random_model(config: PretrainedConfig,
                       model_dir: Path,
                       tokenizer_dir: Path,
                       fmt: str = "safetensors",
                       seed: int = 0) -> PreTrainedModel:
    """A random HF model (norms and biases random too, logits O(1)) saved
    in ``fmt`` ("safetensors", "sharded" or "bin") with a tokenizer beside
    it; returns the HF model."""
    model = make_hf_model(config, seed=seed)
    save_model(model, model_dir, fmt)
    copy_tokenizer(tokenizer_dir, model_dir)
    return model


def random_prompts(vocab_size: int) -> list[list[int]]:
    """8 prompts of 1 to 64 ids in [3, vocab_size), the same every run."""
    rng = random.Random(0)
    lengths = [1, 3, 7, 16, 17, 30, 45, 64]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def hf_generate(model: Path | PreTrainedModel,
                prompts: list[list[int]],
                max_tokens: int,
                device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> list[TokensTextLogprobs]:
    """Greedy ``generate`` of HF's model (a checkpoint folder, loaded in
    ``dtype`` on ``device``, or a model already built), one prompt at a time,
    with the top-``NUM_LOGPROBS`` logprobs of each step."""
    if not isinstance(model, PreTrainedModel):
        model = AutoModelForCausalLM.from_pretrained(
            model, dtype=dtype).to(device).eval()
    # generate() fills unset fields from the model's own generation config:
    # clear its EOS so that every prompt runs max_tokens (ignore_eos).
    model.generation_config.eos_token_id = None
    config = GenerationConfig(max_new_tokens=max_tokens,
                              do_sample=False,
                              eos_token_id=None,
                              pad_token_id=0)
    results: list[TokensTextLogprobs] = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids], device=device),
                             generation_config=config,
                             output_logits=True,
                             return_dict_in_generate=True)
        new_ids = out.sequences[0, len(ids):].tolist()
        logprobs = []
        for step_logits in out.logits:
            lp = torch.log_softmax(step_logits[0].float(), dim=-1)
            top = torch.topk(lp, NUM_LOGPROBS)
            logprobs.append(dict(zip(top.indices.tolist(),
                                     top.values.tolist())))
        results.append((new_ids, None, logprobs))
    return results


def vllm_generate(model_dir: Path,
                  prompts: list[list[int]],
                  max_tokens: int,
                  device: str = "cpu",
                  dtype: str = "float32",
                  max_model_len: int = 256,
                  **llm_kwargs: Any) -> list[TokensTextLogprobs]:
    """Greedy generation through ``LLM``, all prompts in one batch;
    ``llm_kwargs`` go to ``LLM`` (e.g. ``enforce_eager``)."""
    llm = LLM(str(model_dir),
              dtype=dtype,
              device=device,
              max_model_len=max_model_len,
              gpu_memory_utilization=0.3,
              **llm_kwargs)
    params = SamplingParams(temperature=0.0,
                            max_tokens=max_tokens,
                            ignore_eos=True,
                            logprobs=NUM_LOGPROBS)
    outputs = llm.generate([{
        "prompt_token_ids": p
    } for p in prompts],
                           params,
                           use_tqdm=False)
    results: list[TokensTextLogprobs] = []
    for out in outputs:
        completion = out.outputs[0]
        assert completion.logprobs is not None
        logprobs = [{
            tid: lp.logprob
            for tid, lp in step.items()
        } for step in completion.logprobs]
        results.append((completion.token_ids, completion.text, logprobs))
    return results


def check_matches_hf(hf: list[TokensTextLogprobs],
                     ours: list[TokensTextLogprobs],
                     equal_tokens: bool = True,
                     logprob_atol: float | None = None) -> None:
    """vLLM's logprob rule; with ``equal_tokens`` also token-for-token
    equality, and with ``logprob_atol`` equal logprobs of the chosen tokens
    (fp32 on the CPU: 1e-4)."""
    if equal_tokens:
        check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf",
                            "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")
    if logprob_atol is None:
        return
    for (_, _, hf_lps), (ids, _, our_lps) in zip(hf, ours):
        assert hf_lps is not None and our_lps is not None
        for tok, hf_lp, our_lp in zip(ids, hf_lps, our_lps):
            assert our_lp[tok] == pytest.approx(hf_lp[tok], abs=logprob_atol)
