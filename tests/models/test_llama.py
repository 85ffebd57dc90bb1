"""End-to-end parity with Hugging Face transformers: greedy generation through
``LLM`` equals ``generate(do_sample=False)`` token for token (fp32, CPU), and
logprobs agree by vLLM's rule."""
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.models.utils import (copy_tokenizer, hf_generate, random_prompts,
                                vllm_generate)
from tests.utils import check_logprobs_close, check_outputs_equal
from vllm import LLM, SamplingParams

MAX_TOKENS = 32

# name -> LlamaConfig overrides (tiny shapes; everything else shared)
CONFIGS = {
    "gqa-tied":
    dict(num_attention_heads=4, num_key_value_heads=2,
         tie_word_embeddings=True),
    "mha-untied":
    dict(num_attention_heads=4,
         num_key_value_heads=4,
         tie_word_embeddings=False),
    "llama3-rope-odd-vocab":
    dict(num_attention_heads=8,
         num_key_value_heads=2,
         vocab_size=509,
         rope_scaling={
             "rope_type": "llama3",
             "factor": 8.0,
             "low_freq_factor": 1.0,
             "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64
         }),
    "head-dim-mqa":
    dict(num_attention_heads=4,
         num_key_value_heads=1,
         head_dim=32,
         attention_bias=True),
    # Head sizes the GPU backend (TRITON_ATTN) runs; the others fall back
    # to the torch reference there.
    "head-dim-64-gqa2":
    dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2),
    "head-dim-128-gqa4":
    dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=1),
}


def _build_model(tmp_path: Path, tokenizer_dir: Path, overrides: dict) -> Path:
    kwargs = dict(vocab_size=512,
                  hidden_size=64,
                  intermediate_size=128,
                  num_hidden_layers=3,
                  max_position_embeddings=256,
                  rms_norm_eps=1e-5,
                  rope_theta=10000.0,
                  bos_token_id=1,
                  eos_token_id=2)
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    copy_tokenizer(tokenizer_dir, tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_llama_matches_hf(name: str, tmp_path: Path,
                                 stories260k_path: Path) -> None:
    model_dir = _build_model(tmp_path, stories260k_path, CONFIGS[name])
    vocab = CONFIGS[name].get("vocab_size", 512)
    prompts = random_prompts(vocab)
    hf = hf_generate(model_dir, prompts, MAX_TOKENS)
    ours = vllm_generate(model_dir, prompts, MAX_TOKENS)
    check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf", "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")
    # Our logprobs of the chosen tokens equal HF's (fp32).
    for (_, _, hf_lps), (ids, _, our_lps) in zip(hf, ours):
        for tok, hf_lp, our_lp in zip(ids, hf_lps, our_lps):
            assert our_lp[tok] == pytest.approx(hf_lp[tok], abs=1e-4)


def test_stories260k_matches_hf(stories260k_path: Path) -> None:
    prompts = [[1, 403, 407, 261, 378], [1, 403], [1, 84, 300, 275, 380, 291]]
    hf = hf_generate(stories260k_path, prompts, 60)
    ours = vllm_generate(stories260k_path, prompts, 60)
    check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf", "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")


def test_stories260k_known_story(stories260k_path: Path) -> None:
    """The README's example reads the story the model card gives."""
    llm = LLM(model=str(stories260k_path))
    out = llm.generate(["Once upon a time"],
                       SamplingParams(temperature=0, max_tokens=60),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == [1, 403, 407, 261, 378]
    # ../shared/models/README.md gives the whole text, prompt included.
    assert out.prompt + out.outputs[0].text == (
        "Once upon a time, there was a little girl named Lily. She loved to "
        "play outside in the park. One day, she saw a big, red ball. She "
        "wanted to play with it, but it was too high.\nLily")
    assert len(out.outputs[0].token_ids) == 60
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.cuda
@pytest.mark.parametrize("enforce_eager", [False, True],
                         ids=["graphs", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_llama_matches_hf_cuda(name: str, dtype: str,
                                      enforce_eager: bool, tmp_path: Path,
                                      stories260k_path: Path) -> None:
    """fp32: equal tokens; bf16: vLLM's logprob rule against HF in bf16;
    with CUDA graphs for decodes and without."""
    model_dir = _build_model(tmp_path, stories260k_path, CONFIGS[name])
    prompts = random_prompts(CONFIGS[name].get("vocab_size", 512))
    hf = hf_generate(model_dir, prompts, MAX_TOKENS, "cuda",
                     getattr(torch, dtype))
    ours = vllm_generate(model_dir,
                         prompts,
                         MAX_TOKENS,
                         "cuda",
                         dtype,
                         enforce_eager=enforce_eager)
    if dtype == "float32":
        check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf",
                            "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")


@pytest.mark.cuda
@pytest.mark.parametrize("enforce_eager", [False, True],
                         ids=["graphs", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stories260k_matches_hf_cuda(dtype: str, enforce_eager: bool,
                                     stories260k_path: Path) -> None:
    prompts = [[1, 403, 407, 261, 378], [1, 403], [1, 84, 300, 275, 380, 291]]
    hf = hf_generate(stories260k_path, prompts, 60, "cuda",
                     getattr(torch, dtype))
    ours = vllm_generate(stories260k_path,
                         prompts,
                         60,
                         "cuda",
                         dtype,
                         enforce_eager=enforce_eager)
    if dtype == "float32":
        check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf",
                            "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")
