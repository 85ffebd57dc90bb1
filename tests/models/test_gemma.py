"""Gemma (v1) against Hugging Face: greedy generation through ``LLM`` equals
``generate(do_sample=False)`` (fp32, CPU); GemmaRMSNorm equals HF's bit for
bit in every dtype; the activation follows vLLM's rule."""
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GemmaConfig
from transformers.models.gemma.modeling_gemma import \
    GemmaRMSNorm as HFGemmaRMSNorm

from tests.models.utils import (build_random_model, check_matches_hf,
                                hf_generate, random_prompts, vllm_generate)
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.models.gemma import GemmaForCausalLM

MAX_TOKENS = 32
PROMPTS = random_prompts(512)


def _config(**overrides: Any) -> GemmaConfig:
    # hidden 48: sqrt(48) is not exact in any dtype; head_dim 16 != 48 / 4
    kwargs: dict[str, Any] = dict(vocab_size=512,
                                  hidden_size=48,
                                  intermediate_size=96,
                                  num_hidden_layers=3,
                                  num_attention_heads=4,
                                  num_key_value_heads=1,
                                  head_dim=16,
                                  max_position_embeddings=256,
                                  rms_norm_eps=1e-6,
                                  hidden_act="gelu_pytorch_tanh",
                                  pad_token_id=0,
                                  bos_token_id=1,
                                  eos_token_id=2,
                                  architectures=["GemmaForCausalLM"])
    kwargs.update(overrides)
    return GemmaConfig(**kwargs)


CONFIGS = {
    "mqa-head-dim": lambda: _config(),
    "gqa-bias": lambda: _config(num_key_value_heads=2, attention_bias=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_gemma_matches_hf(name: str, tmp_path: Path,
                                 stories260k_path: Path) -> None:
    hf_model = build_random_model(CONFIGS[name](), tmp_path, stories260k_path)
    hf = hf_generate(hf_model, PROMPTS, MAX_TOKENS)
    check_matches_hf(hf,
                     vllm_generate(tmp_path, PROMPTS, MAX_TOKENS),
                     logprob_atol=1e-4)


@pytest.mark.parametrize("dtype",
                         [torch.float32, torch.bfloat16, torch.float16])
def test_gemma_rms_norm_matches_hf(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = 0.5 * torch.randn(40, generator=gen)
    x = (3 * torch.randn(7, 40, generator=gen)).to(dtype)
    residual = torch.randn(7, 40, generator=gen).to(dtype)
    hf = HFGemmaRMSNorm(40, eps=1e-6)
    ours = GemmaRMSNorm(40, eps=1e-6, params_dtype=dtype)
    assert torch.count_nonzero(ours.weight) == 0  # starts as the identity
    with torch.no_grad():
        hf.weight.copy_(weight.to(dtype))
        hf.to(dtype)
        ours.weight.copy_(weight.to(dtype))
    assert torch.equal(ours(x), hf(x))
    normed, added = ours(x, residual)
    assert torch.equal(added, x + residual)
    assert torch.equal(normed, hf(x + residual))


def test_activation_is_tanh_gelu() -> None:
    """vLLM's rule: the first Gemma configs say hidden_act="gelu" but the
    model was trained with the tanh approximation, which is what runs."""
    model = GemmaForCausalLM(_config(hidden_act="gelu", num_hidden_layers=1))
    assert model.model.layers[0].mlp.act_fn.approximate == "tanh"
    config = _config(hidden_act="gelu",
                     hidden_activation="gelu_pytorch_tanh",
                     num_hidden_layers=1)
    model = GemmaForCausalLM(config)
    assert model.model.layers[0].mlp.act_fn.approximate == "tanh"
    with pytest.raises(ValueError, match="hidden_activation='gelu'"):
        GemmaForCausalLM(_config(hidden_activation="gelu"))


def test_untied_config_is_refused() -> None:
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        GemmaForCausalLM(_config(tie_word_embeddings=False))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_gemma_matches_hf_cuda(name: str, dtype: str, tmp_path: Path,
                                      stories260k_path: Path) -> None:
    """fp32: equal tokens; bf16: vLLM's logprob rule against HF in bf16."""
    build_random_model(CONFIGS[name](), tmp_path, stories260k_path)
    hf = hf_generate(tmp_path, PROMPTS, MAX_TOKENS, "cuda",
                     getattr(torch, dtype))
    ours = vllm_generate(tmp_path, PROMPTS, MAX_TOKENS, "cuda", dtype)
    check_matches_hf(hf, ours, equal_tokens=dtype == "float32")
