"""OPT end to end against Hugging Face transformers: greedy generation through
``LLM`` equals ``generate(do_sample=False)`` token for token (fp32, CPU) and
logprobs agree by vLLM's rule, on tiny random checkpoints (GPT-2 tokenizer,
full 50257 vocabulary) saved as safetensors, as ``.bin``, sharded, and with
the ``decoder.`` names of facebook/opt-125m's files."""
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, OPTConfig, OPTForCausalLM

from tests.utils import check_logprobs_close, check_outputs_equal
from vllm import LLM, SamplingParams

NUM_LOGPROBS = 5
MAX_TOKENS = 32
MAX_MODEL_LEN = 128
VOCAB_SIZE = 50257
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                    "merges.txt")

# name -> OPTConfig overrides (tiny shapes; everything else shared)
CONFIGS: dict[str, dict[str, Any]] = {
    # opt-125m style: pre-LN, final_layer_norm
    "pre-ln":
    dict(),
    # opt-350m style: post-LN, no final norm, 16-wide word embeddings
    "post-ln-proj":
    dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    # projections with pre-LN, no biases, no LayerNorm affine, untied head
    "pre-ln-proj-nobias-untied":
    dict(word_embed_proj_dim=16,
         enable_bias=False,
         layer_norm_elementwise_affine=False,
         tie_word_embeddings=False),
}

# (config name, checkpoint format)
CASES = [
    ("pre-ln", "safetensors"),
    ("pre-ln", "no-prefix"),
    ("post-ln-proj", "bin"),
    ("post-ln-proj", "sharded"),
    ("pre-ln-proj-nobias-untied", "safetensors"),
]


def _build_hf(overrides: dict[str, Any]) -> OPTForCausalLM:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_MODEL_LEN,
        pad_token_id=1,
        # weights large enough for varied tokens
        # and clear top-1 margins
        init_std=0.5,
        bos_token_id=50256,
        eos_token_id=50256,
        architectures=["OPTForCausalLM"])
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**kwargs)).eval()
    with torch.no_grad():
        # Random LayerNorm affines and biases (HF initialises them to 1 and
        # 0), so a mix-up of weight and bias would show.
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0,
                              std=0.1)
    return model


def _save(model: OPTForCausalLM, model_dir: Path, fmt: str,
          tokenizer_dir: Path) -> Path:
    """Write ``model`` to ``model_dir`` as ``fmt``: safetensors, bin (a
    torch.save'd state dict), sharded (several safetensors files + index) or
    no-prefix (safetensors named ``decoder.*``, no lm_head: the layout of
    facebook/opt-125m)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(model_dir)
    elif fmt == "sharded":
        model.save_pretrained(model_dir, max_shard_size="100KB")
        assert len(list(model_dir.glob("*.safetensors"))) > 1
    elif fmt == "bin":
        model.config.save_pretrained(model_dir)
        torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    elif fmt == "no-prefix":
        assert model.config.tie_word_embeddings
        model.config.save_pretrained(model_dir)
        state = {
            name.removeprefix("model."): t.clone().contiguous()
            for name, t in model.state_dict().items()
            if not name.startswith("lm_head.")
        }
        assert all(name.startswith("decoder.") for name in state)
        save_file(state,
                  model_dir / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        raise AssertionError(fmt)
    for name in _TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, model_dir / name)
    return model_dir


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 2, 5, 11, 16, 17, 40, 64]
    # id 1 (the pad id) included on purpose: nothing may mask it
    return [[1] + [rng.randrange(VOCAB_SIZE) for _ in range(n - 1)]
            for n in lengths]


def _hf_generate(model: OPTForCausalLM,
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
def test_random_opt_matches_hf(name: str, fmt: str, tmp_path: Path,
                               gpt2_tokenizer_path: Path) -> None:
    model = _build_hf(CONFIGS[name])
    model_dir = _save(model, tmp_path / "model", fmt, gpt2_tokenizer_path)
    prompts = _prompts()
    hf = _hf_generate(model, prompts)
    ours = _vllm_generate(model_dir, prompts)
    _compare(hf, ours)


def test_dev_guide_example(tmp_path: Path, gpt2_tokenizer_path: Path) -> None:
    """The developer guide's first example, as written, on a tiny OPT."""
    model_dir = _save(_build_hf({}), tmp_path / "opt", "safetensors",
                      gpt2_tokenizer_path)

    llm = LLM(model=str(model_dir), max_model_len=32)
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=10))

    assert len(outputs) == 1
    assert outputs[0].prompt == "Hello"
    assert len(outputs[0].outputs[0].token_ids) > 0
    assert outputs[0].outputs[0].text != ""


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_opt_matches_hf_cuda(name: str, dtype: str, tmp_path: Path,
                                    gpt2_tokenizer_path: Path) -> None:
    """fp32: equal tokens; bf16: vLLM's logprob rule against HF in bf16."""
    model = _build_hf(CONFIGS[name])
    model_dir = _save(model, tmp_path / "model", "safetensors",
                      gpt2_tokenizer_path)
    prompts = _prompts()
    hf = _hf_generate(model, prompts, "cuda", getattr(torch, dtype))
    ours = _vllm_generate(model_dir, prompts, "cuda", dtype)
    _compare(hf, ours, same_tokens=dtype == "float32", same_logprobs=False)
