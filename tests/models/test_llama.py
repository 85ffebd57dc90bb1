"""End-to-end parity with Hugging Face transformers: greedy generation through
``LLM`` equals ``generate(do_sample=False)`` token for token (fp32, CPU), and
logprobs agree by vLLM's rule."""
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from tests.utils import check_logprobs_close, check_outputs_equal
from vllm import LLM, SamplingParams

NUM_LOGPROBS = 5
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
    for name in ("tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    return tmp_path


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 3, 7, 16, 17, 30, 45, 64]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def _hf_generate(model_dir: Path,
                 prompts: list[list[int]],
                 max_tokens: int,
                 device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> list[tuple]:
    model = LlamaForCausalLM.from_pretrained(model_dir,
                                             dtype=dtype).to(device).eval()
    config = GenerationConfig(max_new_tokens=max_tokens,
                              do_sample=False,
                              eos_token_id=None,
                              pad_token_id=0)
    results = []
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


def _vllm_generate(model_dir: Path,
                   prompts: list[list[int]],
                   max_tokens: int,
                   device: str = "cpu",
                   dtype: str = "float32") -> list[tuple]:
    llm = LLM(str(model_dir),
              dtype=dtype,
              device=device,
              max_model_len=256,
              gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0,
                            max_tokens=max_tokens,
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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_llama_matches_hf(name: str, tmp_path: Path,
                                 stories260k_path: Path) -> None:
    model_dir = _build_model(tmp_path, stories260k_path, CONFIGS[name])
    vocab = CONFIGS[name].get("vocab_size", 512)
    prompts = _prompts(vocab)
    hf = _hf_generate(model_dir, prompts, MAX_TOKENS)
    ours = _vllm_generate(model_dir, prompts, MAX_TOKENS)
    check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf", "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")
    # Our logprobs of the chosen tokens equal HF's (fp32).
    for (_, _, hf_lps), (ids, _, our_lps) in zip(hf, ours):
        for tok, hf_lp, our_lp in zip(ids, hf_lps, our_lps):
            assert our_lp[tok] == pytest.approx(hf_lp[tok], abs=1e-4)


def test_stories260k_matches_hf(stories260k_path: Path) -> None:
    prompts = [[1, 403, 407, 261, 378], [1, 403], [1, 84, 300, 275, 380, 291]]
    hf = _hf_generate(stories260k_path, prompts, 60)
    ours = _vllm_generate(stories260k_path, prompts, 60)
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
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_llama_matches_hf_cuda(name: str, dtype: str, tmp_path: Path,
                                      stories260k_path: Path) -> None:
    """fp32: equal tokens; bf16: vLLM's logprob rule against HF in bf16."""
    model_dir = _build_model(tmp_path, stories260k_path, CONFIGS[name])
    prompts = _prompts(CONFIGS[name].get("vocab_size", 512))
    hf = _hf_generate(model_dir, prompts, MAX_TOKENS, "cuda",
                      getattr(torch, dtype))
    ours = _vllm_generate(model_dir, prompts, MAX_TOKENS, "cuda", dtype)
    if dtype == "float32":
        check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf",
                            "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stories260k_matches_hf_cuda(dtype: str,
                                     stories260k_path: Path) -> None:
    prompts = [[1, 403, 407, 261, 378], [1, 403], [1, 84, 300, 275, 380, 291]]
    hf = _hf_generate(stories260k_path, prompts, 60, "cuda",
                      getattr(torch, dtype))
    ours = _vllm_generate(stories260k_path, prompts, 60, "cuda", dtype)
    if dtype == "float32":
        check_outputs_equal([o[0] for o in hf], [o[0] for o in ours], "hf",
                            "vllm")
    check_logprobs_close(hf, ours, "hf", "vllm")
