"""prompt_logprobs: for each prompt token, its logprob given the tokens before
it (the first token has none) and the top-N, as Hugging Face computes them.

Proved on stories260K (fp32) against log_softmax of HF's forward logits, with
and without chunked prefill, with prefix caching and with preemption."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm import LLM, EngineArgs, LLMEngine, RequestOutputKind, SamplingParams
from vllm.outputs import PromptLogprobs

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the sun.",
    "The dog",
    "Tom had a big red ball. One day he went to the park with his mom and "
    "they played with the ball all day long until the sun went down.",
]
NUM_LOGPROBS = 5
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(stories260k_path: Path):
    return AutoModelForCausalLM.from_pretrained(stories260k_path,
                                                dtype=torch.float32).eval()


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position. -> [P, V]"""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_against_hf(model, ids: list[int], ours: PromptLogprobs | None,
                     num_logprobs: int) -> None:
    assert ours is not None and len(ours) == len(ids)
    assert ours[0] is None
    ref = hf_prompt_logprobs(model, ids)
    for j in range(1, len(ids)):
        entry = ours[j]
        assert entry is not None
        row = ref[j - 1]
        token = ids[j]
        assert entry[token].logprob == pytest.approx(row[token].item(),
                                                     abs=ATOL)
        # rank: 1 + the number of tokens strictly more likely
        assert entry[token].rank == 1 + int((row > row[token]).sum())
        top = torch.topk(row, num_logprobs)
        top_ids = top.indices.tolist()
        others = {t: lp for t, lp in entry.items() if lp.rank <= num_logprobs}
        assert set(others) == set(top_ids) | ({token} & set(others))
        for rank, (t, value) in enumerate(zip(top_ids, top.values.tolist()),
                                          start=1):
            assert entry[t].logprob == pytest.approx(value, abs=ATOL)
            if rank <= 10:  # far down, near-ties may swap within ATOL
                assert entry[t].rank == rank
        assert len(entry) in (num_logprobs, num_logprobs + 1)


def _params(**kwargs) -> SamplingParams:
    kwargs.setdefault("prompt_logprobs", NUM_LOGPROBS)
    return SamplingParams(temperature=0, max_tokens=4, **kwargs)


@pytest.mark.parametrize("engine_kwargs", [
    dict(enable_chunked_prefill=False),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4),
],
                         ids=["whole-prompt", "chunks-of-8"])
def test_matches_hf_forward(stories260k_path: Path, hf_model,
                            engine_kwargs: dict) -> None:
    llm = LLM(str(stories260k_path),
              device="cpu",
              max_model_len=128,
              **engine_kwargs)
    outputs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for out in outputs:
        ids = out.prompt_token_ids
        check_against_hf(hf_model, ids, out.prompt_logprobs, NUM_LOGPROBS)
        for j in range(1, len(ids)):
            entry = out.prompt_logprobs[j]
            assert entry is not None
            assert entry[ids[j]].decoded_token == tokenizer.decode([ids[j]])
        # the completion is unaffected
        plain = llm.generate({"prompt_token_ids": ids},
                             _params(prompt_logprobs=None),
                             use_tqdm=False)[0]
        assert plain.prompt_logprobs is None
        assert plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_zero_gives_the_prompt_token_only(stories260k_path: Path,
                                          hf_model) -> None:
    llm = LLM(str(stories260k_path), device="cpu", max_model_len=128)
    out = llm.generate(PROMPTS[0], _params(prompt_logprobs=0),
                       use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert out.prompt_logprobs is not None
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:] if e is not None)
    ref = hf_prompt_logprobs(hf_model, ids)
    for j in range(1, len(ids)):
        entry = out.prompt_logprobs[j]
        assert entry is not None
        assert entry[ids[j]].logprob == pytest.approx(ref[j - 1, ids[j]].item(),
                                                      abs=ATOL)
    # one-token prompt: just the None
    single = llm.generate({"prompt_token_ids": [ids[0]]},
                          _params(),
                          use_tqdm=False)[0]
    assert single.prompt_logprobs == [None]


def test_whole_vocabulary_needs_max_logprobs(stories260k_path: Path,
                                             hf_model) -> None:
    llm = LLM(str(stories260k_path), device="cpu", max_model_len=128)
    with pytest.raises(ValueError,
                       match="Requested prompt logprobs of -1, which is "
                       "greater than max allowed: 20"):
        llm.generate(PROMPTS[1], _params(prompt_logprobs=-1), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt logprobs of 21"):
        llm.generate(PROMPTS[1], _params(prompt_logprobs=21), use_tqdm=False)
    llm = LLM(str(stories260k_path),
              device="cpu",
              max_model_len=128,
              max_logprobs=-1)
    out = llm.generate(PROMPTS[1], _params(prompt_logprobs=-1),
                       use_tqdm=False)[0]
    vocab = hf_model.config.vocab_size
    assert out.prompt_logprobs is not None
    assert all(
        len(e) == vocab for e in out.prompt_logprobs[1:] if e is not None)
    check_against_hf(hf_model, out.prompt_token_ids, out.prompt_logprobs, vocab)


def test_prefix_caching_never_skips_a_prompt_logprob(stories260k_path: Path,
                                                     hf_model) -> None:
    """A request that asks for prompt logprobs does not take cached blocks
    (their logits were never computed); the blocks it computes are cached
    for the requests after it."""
    llm = LLM(str(stories260k_path),
              device="cpu",
              max_model_len=128,
              block_size=8,
              enable_prefix_caching=True)
    prompt = PROMPTS[2]
    first = llm.generate(prompt, _params(prompt_logprobs=None),
                         use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    out = llm.generate(prompt, _params(), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    check_against_hf(hf_model, out.prompt_token_ids, out.prompt_logprobs,
                     NUM_LOGPROBS)
    again = llm.generate(prompt, _params(prompt_logprobs=None),
                         use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_preemption_does_not_duplicate_entries(stories260k_path: Path, hf_model,
                                               preemption_mode: str) -> None:
    """A cache of 10 blocks of 8 tokens cannot hold the requests at once:
    some are preempted mid-prompt or after it and computed again."""
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(stories260k_path),
                   device="cpu",
                   max_model_len=80,
                   block_size=8,
                   num_gpu_blocks_override=10,
                   max_num_batched_tokens=16,
                   max_num_seqs=4,
                   enable_chunked_prefill=True,
                   preemption_mode=preemption_mode,
                   swap_space=0.002))
    params = SamplingParams(temperature=0,
                            max_tokens=12,
                            ignore_eos=True,
                            prompt_logprobs=2)
    for i, prompt in enumerate(PROMPTS + PROMPTS[:1]):
        engine.add_request(str(i), prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert engine.scheduler.num_cumulative_preemption > 0
    for out in finished.values():
        check_against_hf(hf_model, out.prompt_token_ids, out.prompt_logprobs, 2)


def test_delta_outputs_return_each_entry_once(stories260k_path: Path) -> None:
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(stories260k_path),
                   device="cpu",
                   max_num_batched_tokens=8,
                   max_num_seqs=4,
                   enable_chunked_prefill=True))
    engine.add_request(
        "delta", PROMPTS[0],
        _params(prompt_logprobs=1, output_kind=RequestOutputKind.DELTA))
    engine.add_request("full", PROMPTS[0], _params(prompt_logprobs=1))
    pieces: list = []
    full = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "delta":
                pieces += out.prompt_logprobs or []
            elif out.finished:
                full = out
    assert full is not None and full.prompt_logprobs is not None
    assert len(pieces) == len(full.prompt_logprobs)
    assert pieces[0] is None
    for piece, entry in zip(pieces[1:], full.prompt_logprobs[1:]):
        assert piece is not None and entry is not None
        assert piece.keys() == entry.keys()
        for token, lp in piece.items():
            assert lp.logprob == pytest.approx(entry[token].logprob, abs=1e-5)
