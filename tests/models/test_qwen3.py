"""Qwen3 against Hugging Face: greedy generation through ``LLM`` equals
``generate(do_sample=False)`` (fp32, CPU); per-head q/k norms, explicit
head_dim, tied and untied heads."""
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen3Config

from tests.models.utils import (build_random_model, check_matches_hf,
                                hf_generate, random_prompts, vllm_generate)

MAX_TOKENS = 32
PROMPTS = random_prompts(512)


def _config(**overrides: Any) -> Qwen3Config:
    kwargs: dict[str, Any] = dict(vocab_size=512,
                                  hidden_size=64,
                                  intermediate_size=128,
                                  num_hidden_layers=3,
                                  num_attention_heads=4,
                                  num_key_value_heads=2,
                                  head_dim=32,
                                  max_position_embeddings=256,
                                  rms_norm_eps=1e-6,
                                  rope_theta=1e6,
                                  bos_token_id=1,
                                  eos_token_id=2,
                                  architectures=["Qwen3ForCausalLM"])
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


CONFIGS = {
    # Qwen3-0.6B's layout: head_dim larger than hidden / heads, tied
    "gqa-tied-wide-heads":
    lambda: _config(tie_word_embeddings=True),
    "mqa-untied":
    lambda: _config(
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_qwen3_matches_hf(name: str, tmp_path: Path,
                                 stories260k_path: Path) -> None:
    hf_model = build_random_model(CONFIGS[name](), tmp_path, stories260k_path)
    hf = hf_generate(hf_model, PROMPTS, MAX_TOKENS)
    check_matches_hf(hf,
                     vllm_generate(tmp_path, PROMPTS, MAX_TOKENS),
                     logprob_atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_qwen3_matches_hf_cuda(name: str, dtype: str, tmp_path: Path,
                                      stories260k_path: Path) -> None:
    """fp32: equal tokens; bf16: vLLM's logprob rule against HF in bf16."""
    build_random_model(CONFIGS[name](), tmp_path, stories260k_path)
    hf = hf_generate(tmp_path, PROMPTS, MAX_TOKENS, "cuda",
                     getattr(torch, dtype))
    ours = vllm_generate(tmp_path, PROMPTS, MAX_TOKENS, "cuda", dtype)
    check_matches_hf(hf, ours, equal_tokens=dtype == "float32")
