"""Mistral against Hugging Face: greedy generation through ``LLM`` equals
``generate(do_sample=False)`` (fp32, CPU) when attention is dense; a sliding
window shorter than the context is refused with a clear error."""
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import MistralConfig

from tests.models.utils import (build_random_model, check_matches_hf,
                                copy_tokenizer, hf_generate, random_prompts,
                                vllm_generate)
from vllm import LLM
from vllm.model_executor.models.llama import check_no_sliding_window

MAX_TOKENS = 32
PROMPTS = random_prompts(512)


def _config(**overrides: Any) -> MistralConfig:
    kwargs: dict[str, Any] = dict(vocab_size=512,
                                  hidden_size=64,
                                  intermediate_size=128,
                                  num_hidden_layers=3,
                                  num_attention_heads=4,
                                  num_key_value_heads=2,
                                  max_position_embeddings=256,
                                  rms_norm_eps=1e-5,
                                  bos_token_id=1,
                                  eos_token_id=2,
                                  architectures=["MistralForCausalLM"])
    kwargs.update(overrides)
    return MistralConfig(**kwargs)


CONFIGS = {
    # Mistral 7B v0.2+: no window; head_dim 32 != 64 / 4 (as in Nemo)
    "window-null-head-dim":
    lambda: _config(sliding_window=None, head_dim=32),
    # a window as long as the context is dense attention (HF masks with it)
    "window-covers-context":
    lambda: _config(sliding_window=256, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_mistral_matches_hf(name: str, tmp_path: Path,
                                   stories260k_path: Path) -> None:
    hf_model = build_random_model(CONFIGS[name](), tmp_path, stories260k_path)
    hf = hf_generate(hf_model, PROMPTS, MAX_TOKENS)
    check_matches_hf(hf,
                     vllm_generate(tmp_path, PROMPTS, MAX_TOKENS),
                     logprob_atol=1e-4)


def test_window_shorter_than_context_is_refused(tmp_path: Path,
                                                stories260k_path: Path) -> None:
    _config(sliding_window=128).save_pretrained(tmp_path)
    copy_tokenizer(stories260k_path, tmp_path)
    with pytest.raises(ValueError,
                       match=r"sliding_window=128 is smaller than the context"):
        LLM(str(tmp_path), device="cpu", load_format="dummy")


@pytest.mark.parametrize("window, max_model_len, refused", [(None, 4096, False),
                                                            (64, 64, False),
                                                            (64, 65, True),
                                                            (64, None, True),
                                                            (256, None, False)])
def test_check_no_sliding_window(window: int | None, max_model_len: int | None,
                                 refused: bool) -> None:
    """A window of W tokens is dense attention up to W tokens of context;
    without max_model_len the bound is max_position_embeddings (256)."""
    config = SimpleNamespace(sliding_window=window, max_position_embeddings=256)
    if refused:
        with pytest.raises(ValueError, match="max_model_len|max_position"):
            check_no_sliding_window(config, max_model_len)
    else:
        check_no_sliding_window(config, max_model_len)


def test_layer_types_decide_whether_a_window_is_used() -> None:
    config = SimpleNamespace(sliding_window=16,
                             max_position_embeddings=256,
                             layer_types=["full_attention"] * 2)
    check_no_sliding_window(config, 256)
    config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="sliding_window=16"):
        check_no_sliding_window(config, 256)
    check_no_sliding_window(config, 16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_mistral_matches_hf_cuda(name: str, dtype: str, tmp_path: Path,
                                        stories260k_path: Path) -> None:
    """fp32: equal tokens; bf16: vLLM's logprob rule against HF in bf16."""
    build_random_model(CONFIGS[name](), tmp_path, stories260k_path)
    hf = hf_generate(tmp_path, PROMPTS, MAX_TOKENS, "cuda",
                     getattr(torch, dtype))
    ours = vllm_generate(tmp_path, PROMPTS, MAX_TOKENS, "cuda", dtype)
    check_matches_hf(hf, ours, equal_tokens=dtype == "float32")
