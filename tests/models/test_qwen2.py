"""Qwen2 / Qwen2.5 against Hugging Face: greedy generation through ``LLM``
equals ``generate(do_sample=False)`` (fp32, CPU), in every checkpoint
format; sliding windows that would take effect are refused."""
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, Qwen2Config

from tests.models.utils import (build_random_model, check_matches_hf,
                                copy_tokenizer, hf_generate, make_hf_model,
                                random_prompts, save_model, vllm_generate)
from tests.utils import TokensTextLogprobs
from vllm import LLM

MAX_TOKENS = 32
PROMPTS = random_prompts(512)


def _config(**overrides: Any) -> Qwen2Config:
    kwargs: dict[str, Any] = dict(vocab_size=512,
                                  hidden_size=64,
                                  intermediate_size=128,
                                  num_hidden_layers=3,
                                  num_attention_heads=4,
                                  num_key_value_heads=2,
                                  max_position_embeddings=256,
                                  rms_norm_eps=1e-6,
                                  bos_token_id=1,
                                  eos_token_id=2,
                                  architectures=["Qwen2ForCausalLM"])
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


CONFIGS = {
    # Qwen2.5-0.5B's shape: GQA, tied LM head
    "gqa-tied":
    lambda: _config(tie_word_embeddings=True),
    # a window in the config that no layer uses (max_window_layers covers
    # them all), MQA, untied, Qwen's rope_theta
    "window-unused-mqa-untied":
    lambda: _config(num_key_value_heads=1,
                    tie_word_embeddings=False,
                    rope_theta=1e6,
                    use_sliding_window=True,
                    sliding_window=16,
                    max_window_layers=3),
}


@pytest.fixture(scope="module")
def gqa_tied_reference() -> tuple[PreTrainedModel, list[TokensTextLogprobs]]:
    """HF's model and outputs for "gqa-tied", shared by the format tests."""
    model = make_hf_model(CONFIGS["gqa-tied"]())
    return model, hf_generate(model, PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("name", ["window-unused-mqa-untied"])
def test_random_qwen2_matches_hf(name: str, tmp_path: Path,
                                 stories260k_path: Path) -> None:
    hf_model = build_random_model(CONFIGS[name](), tmp_path, stories260k_path)
    hf = hf_generate(hf_model, PROMPTS, MAX_TOKENS)
    check_matches_hf(hf,
                     vllm_generate(tmp_path, PROMPTS, MAX_TOKENS),
                     logprob_atol=1e-4)


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_checkpoint_formats_match_hf(fmt: str, tmp_path: Path,
                                     stories260k_path: Path,
                                     gqa_tied_reference) -> None:
    hf_model, hf = gqa_tied_reference
    save_model(hf_model, tmp_path, fmt)
    copy_tokenizer(stories260k_path, tmp_path)
    check_matches_hf(hf,
                     vllm_generate(tmp_path, PROMPTS, MAX_TOKENS),
                     logprob_atol=1e-4)


def test_sliding_window_in_use_is_refused(tmp_path: Path,
                                          stories260k_path: Path) -> None:
    # layers 1 and 2 (>= max_window_layers) would use the 16-token window
    _config(use_sliding_window=True, sliding_window=16,
            max_window_layers=1).save_pretrained(tmp_path)
    copy_tokenizer(stories260k_path, tmp_path)
    with pytest.raises(ValueError, match=r"sliding_window=16"):
        LLM(str(tmp_path), device="cpu", load_format="dummy")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_qwen2_matches_hf_cuda(name: str, dtype: str, tmp_path: Path,
                                      stories260k_path: Path) -> None:
    """fp32: equal tokens; bf16: vLLM's logprob rule against HF in bf16."""
    build_random_model(CONFIGS[name](), tmp_path, stories260k_path)
    hf = hf_generate(tmp_path, PROMPTS, MAX_TOKENS, "cuda",
                     getattr(torch, dtype))
    ours = vllm_generate(tmp_path, PROMPTS, MAX_TOKENS, "cuda", dtype)
    check_matches_hf(hf, ours, equal_tokens=dtype == "float32")
