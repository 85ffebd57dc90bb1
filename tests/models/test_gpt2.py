"""GPT-2 end to end against Hugging Face transformers: greedy generation
through ``LLM`` equals ``generate(do_sample=False)`` token for token (fp32,
CPU) and logprobs agree by vLLM's rule, on tiny random checkpoints (GPT-2
tokenizer, full 50257 vocabulary) saved as safetensors, sharded, and as the
``.bin`` of the original openai-community/gpt2 layout (no ``transformer.``
prefix, attention-mask buffers stored)."""
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from tests.utils import check_logprobs_close, check_outputs_equal
from vllm import LLM, SamplingParams
from vllm.model_executor.models.gpt2 import GPT2LMHeadModel as OurGPT2

NUM_LOGPROBS = 5
MAX_TOKENS = 32
MAX_MODEL_LEN = 128
VOCAB_SIZE = 50257
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                    "merges.txt")

# name -> GPT2Config overrides (tiny shapes; everything else shared)
CONFIGS: dict[str, dict[str, Any]] = {
    # gpt2 style: gelu_new, 4x MLP, scaled attention, tied head
    "gpt2":
    dict(),
    # unscaled attention scores, narrow MLP, erf GELU, other eps, untied
    "unscaled-ninner-untied":
    dict(scale_attn_weights=False,
         n_inner=48,
         activation_function="gelu",
         layer_norm_epsilon=1e-3,
         tie_word_embeddings=False),
}

# (config name, checkpoint format)
CASES = [
    ("gpt2", "safetensors"),
    ("gpt2", "legacy-bin"),
    ("gpt2", "sharded"),
    ("unscaled-ninner-untied", "safetensors"),
]


def _build_hf(overrides: dict[str, Any]) -> GPT2LMHeadModel:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=MAX_MODEL_LEN,
        # weights large enough for varied tokens
        # and clear top-1 margins
        initializer_range=0.5,
        architectures=["GPT2LMHeadModel"])
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**kwargs)).eval()
    with torch.no_grad():
        # Random LayerNorm affines and biases (HF initialises them to 1 and
        # 0), so a mix-up (or a missed transpose) would show.
        for name, param in model.named_parameters():
            if ".ln_" in name or name.endswith(".bias"):
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0,
                              std=0.1)
    return model


def _save(model: GPT2LMHeadModel, model_dir: Path, fmt: str,
          tokenizer_dir: Path) -> Path:
    """Write ``model`` to ``model_dir`` as ``fmt``: safetensors, sharded
    (several safetensors files + index) or legacy-bin (a torch.save'd state
    dict named ``h.*`` / ``wte.*`` with the ``attn.bias`` and
    ``attn.masked_bias`` buffers and no lm_head, as openai-community/gpt2's
    pytorch_model.bin)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(model_dir)
    elif fmt == "sharded":
        model.save_pretrained(model_dir, max_shard_size="100KB")
        assert len(list(model_dir.glob("*.safetensors"))) > 1
    elif fmt == "legacy-bin":
        config = model.config
        assert config.tie_word_embeddings
        config.save_pretrained(model_dir)
        state = {
            name.removeprefix("transformer."): t
            for name, t in model.state_dict().items()
            if not name.startswith("lm_head.")
        }
        n = config.n_positions
        for i in range(config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(
                torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, model_dir / "pytorch_model.bin")
    else:
        raise AssertionError(fmt)
    for name in _TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, model_dir / name)
    return model_dir


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 2, 5, 11, 16, 17, 40, 64]
    return [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in lengths]


def _hf_generate(model: GPT2LMHeadModel,
                 prompts: list[list[int]],
                 device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> list[tuple]:
    model = model.to(device=device, dtype=dtype)
    config = GenerationConfig(max_new_tokens=MAX_TOKENS,
                              do_sample=False,
                              eos_token_id=None,
                              pad_token_id=None)
    results = []
    for ids in prompts:
        input_ids = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids,
                                 attention_mask=torch.ones_like(input_ids),
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


def _vllm_generate(model_dir: Path,
                   prompts: list[list[int]],
                   device: str = "cpu",
                   dtype: str = "float32") -> list[tuple]:
    llm = LLM(str(model_dir),
              dtype=dtype,
              device=device,
              max_model_len=MAX_MODEL_LEN,
              gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0,
                            max_tokens=MAX_TOKENS,
                            ignore_eos=True,
                            logprobs=NUM_LOGPROBS)
    outputs = llm.generate([{
        "prompt_token_ids": p
    } for p in prompts],
                           params,
                           use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        assert completion.logprobs is not None
        logprobs = [{
            tid: lp.logprob
            for tid, lp in step.items()
        } for step in completion.logprobs]
        results.append((completion.token_ids, completion.text, logprobs))
    return results


def _compare(hf: list[tuple],
             ours: list[tuple],
             same_tokens: bool = True,
             same_logprobs: bool = True) -> None:
    if same_tokens:
        check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf",
                            "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")
    if same_logprobs:
        # our logprobs of the chosen tokens equal HF's (fp32, CPU)
        for (_, _, hf_lps), (ids, _, our_lps) in zip(hf, ours):
            for tok, hf_lp, our_lp in zip(ids, hf_lps, our_lps):
                assert our_lp[tok] == pytest.approx(hf_lp[tok], abs=1e-4)


@pytest.mark.parametrize("name,fmt", CASES)
def test_random_gpt2_matches_hf(name: str, fmt: str, tmp_path: Path,
                                gpt2_tokenizer_path: Path) -> None:
    model = _build_hf(CONFIGS[name])
    model_dir = _save(model, tmp_path / "model", fmt, gpt2_tokenizer_path)
    prompts = _prompts()
    hf = _hf_generate(model, prompts)
    ours = _vllm_generate(model_dir, prompts)
    _compare(hf, ours)


@pytest.mark.parametrize("flag", [
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "add_cross_attention"
])
def test_unsupported_variants_are_rejected(flag: str) -> None:
    config = GPT2Config(vocab_size=64,
                        n_embd=16,
                        n_layer=1,
                        n_head=2,
                        n_positions=32,
                        **{flag: True})
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        OurGPT2(config)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_gpt2_matches_hf_cuda(name: str, dtype: str, tmp_path: Path,
                                     gpt2_tokenizer_path: Path) -> None:
    """fp32: equal tokens; bf16: vLLM's logprob rule against HF in bf16."""
    model = _build_hf(CONFIGS[name])
    model_dir = _save(model, tmp_path / "model", "safetensors",
                      gpt2_tokenizer_path)
    prompts = _prompts()
    hf = _hf_generate(model, prompts, "cuda", getattr(torch, dtype))
    ours = _vllm_generate(model_dir, prompts, "cuda", dtype)
    _compare(hf, ours, same_tokens=dtype == "float32", same_logprobs=False)
