"""Our models against Hugging Face's on small random checkpoints (fp32).

Each test builds a tiny random HF model, saves it, loads it with
``get_model`` and compares the logits of every position of a prefill.
"""
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig,
                          MistralConfig, PretrainedConfig, PreTrainedModel,
                          Qwen3Config)

from vllm.attention.backends.abstract import AttentionMetadata
from vllm.config import DeviceConfig, ModelConfig
from vllm.forward_context import set_forward_context
from vllm.model_executor.model_loader import get_model

ATOL = 1e-4


def _llama(**overrides) -> LlamaConfig:
    kwargs: dict[str, Any] = dict(vocab_size=103,
                                  hidden_size=64,
                                  intermediate_size=96,
                                  num_hidden_layers=2,
                                  num_attention_heads=4,
                                  num_key_value_heads=2,
                                  max_position_embeddings=128,
                                  rms_norm_eps=1e-5,
                                  tie_word_embeddings=False,
                                  architectures=["LlamaForCausalLM"])
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


CONFIGS = {
    "llama-gqa-untied":
    lambda: _llama(),
    "llama-mha-tied-bias":
    lambda: _llama(num_hidden_layers=3,
                   num_key_value_heads=4,
                   tie_word_embeddings=True,
                   attention_bias=True,
                   mlp_bias=True),
    "llama3-rope-head-dim":
    lambda: _llama(num_key_value_heads=1,
                   head_dim=32,
                   rope_parameters={
                       "rope_type": "llama3",
                       "rope_theta": 50000.0,
                       "factor": 8.0,
                       "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16,
                   }),
    "llama-linear-rope":
    lambda: _llama(rope_scaling={
        "type": "linear",
        "factor": 2.0
    }),
    "mistral":
    lambda: MistralConfig(vocab_size=97,
                          hidden_size=64,
                          intermediate_size=96,
                          num_hidden_layers=2,
                          num_attention_heads=4,
                          num_key_value_heads=2,
                          head_dim=16,
                          max_position_embeddings=128,
                          sliding_window=None,
                          architectures=["MistralForCausalLM"]),
    "qwen3-tied":
    lambda: Qwen3Config(vocab_size=101,
                        hidden_size=64,
                        intermediate_size=96,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        num_key_value_heads=2,
                        head_dim=32,
                        max_position_embeddings=128,
                        tie_word_embeddings=True,
                        architectures=["Qwen3ForCausalLM"]),
}


def make_hf_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A random HF model whose norms and biases are random too (HF starts
    them at 1 and 0, which would hide mix-ups)."""
    torch.manual_seed(seed)
    # larger than HF's default 0.02, so that logits are O(1) and a wrong
    # rotary or norm shows far above the tolerance
    config.initializer_range = 0.15
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def save_model(model: PreTrainedModel, path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        model.save_pretrained(path)
    elif fmt == "sharded":
        model.save_pretrained(path, max_shard_size="40KB")
        assert (path / "model.safetensors.index.json").is_file()
    elif fmt == "bin":
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        raise AssertionError(fmt)
    return path


def model_config_for(path: Path, **overrides) -> ModelConfig:
    kwargs: dict[str, Any] = dict(model=str(path),
                                  tokenizer=str(path),
                                  hf_config=AutoConfig.from_pretrained(path),
                                  dtype=torch.float32,
                                  max_model_len=128)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)  # type: ignore[arg-type]


def prefill_metadata(seq_lens: list[int]) -> AttentionMetadata:
    """The profiling-path layout of a batch of whole prompts (no KV cache)."""
    total = sum(seq_lens)
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(num_actual_tokens=total,
                             num_decodes=0,
                             max_query_len=max(seq_lens),
                             max_seq_len=max(seq_lens),
                             query_start_loc=torch.tensor(starts,
                                                          dtype=torch.int32),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                             block_tables=torch.zeros((len(seq_lens), 1),
                                                      dtype=torch.int32),
                             slot_mapping=torch.arange(total))


@torch.no_grad()
def our_logits(model: Any, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of every position of each prompt, all run as one batch."""
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with set_forward_context(prefill_metadata([len(p) for p in prompts])):
        hidden = model(input_ids, positions)
    logits = model.compute_logits(hidden)
    return list(logits.split([len(p) for p in prompts]))


@torch.no_grad()
def hf_logits(model: PreTrainedModel, prompt: torch.Tensor) -> torch.Tensor:
    return model(prompt[None]).logits[0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_logits_match_hf(name: str, tmp_path: Path):
    hf = make_hf_model(CONFIGS[name]())
    path = save_model(hf, tmp_path / name, "safetensors")
    model = get_model(model_config_for(path), DeviceConfig())
    assert not model.training
    vocab = hf.config.vocab_size
    prompt = torch.randint(0,
                           vocab, (37, ),
                           generator=torch.Generator().manual_seed(1))
    (ours, ) = our_logits(model, [prompt])
    assert ours.shape == (37, vocab)
    torch.testing.assert_close(ours, hf_logits(hf, prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_checkpoint_formats_match_hf(fmt: str, tmp_path: Path):
    hf = make_hf_model(CONFIGS["llama-mha-tied-bias"](), seed=3)
    path = save_model(hf, tmp_path / fmt, fmt)
    model = get_model(model_config_for(path), DeviceConfig())
    prompt = torch.randint(0, hf.config.vocab_size, (19, ))
    (ours, ) = our_logits(model, [prompt])
    torch.testing.assert_close(ours, hf_logits(hf, prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen3-tied"])
def test_two_sequences_in_one_batch(name: str, tmp_path: Path):
    hf = make_hf_model(CONFIGS[name](), seed=5)
    path = save_model(hf, tmp_path / name, "safetensors")
    model = get_model(model_config_for(path), DeviceConfig())
    gen = torch.Generator().manual_seed(2)
    vocab = hf.config.vocab_size
    prompts = [torch.randint(0, vocab, (n, ), generator=gen) for n in (13, 29)]
    for ours, prompt in zip(our_logits(model, prompts), prompts):
        torch.testing.assert_close(ours,
                                   hf_logits(hf, prompt),
                                   atol=ATOL,
                                   rtol=0)


def test_stories260k_matches_hf(stories260k_path: Path):
    """The real tiny Llama (tied, GQA, head_dim 8) of ../shared/models."""
    hf = AutoModelForCausalLM.from_pretrained(stories260k_path).eval()
    model = get_model(model_config_for(stories260k_path, max_model_len=512),
                      DeviceConfig())
    prompt = torch.tensor([1, 403, 407, 261, 378])
    (ours, ) = our_logits(model, [prompt])
    torch.testing.assert_close(ours, hf_logits(hf, prompt), atol=ATOL, rtol=0)
    # " Once" follows the prompt in the known-good greedy output
    assert int(ours[-1].argmax()) == int(hf_logits(hf, prompt)[-1].argmax())
