"""Sampling parameters end to end through LLM on stories260K."""
from pathlib import Path

import pytest

from vllm import LLM, SamplingParams

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm(stories260k_path: Path) -> LLM:
    return LLM(str(stories260k_path), device="cpu", max_model_len=256)


def _tokens(llm: LLM, **kwargs) -> list[int]:
    params = SamplingParams(max_tokens=40, ignore_eos=True, **kwargs)
    return llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids


def test_repetition_and_frequency_penalties_reduce_repeats(llm: LLM) -> None:
    greedy = _tokens(llm, temperature=0)
    for kwargs in (dict(repetition_penalty=3.0), dict(frequency_penalty=2.0),
                   dict(presence_penalty=2.0)):
        penalised = _tokens(llm, temperature=0, **kwargs)
        assert len(set(penalised)) > len(set(greedy)), kwargs


def test_logit_bias_and_allowed_token_ids(llm: LLM) -> None:
    assert set(_tokens(llm, temperature=0, logit_bias={300: 100.0})) == {300}
    allowed = [261, 286, 300, 383]
    sampled = _tokens(llm, temperature=1.0, seed=0, allowed_token_ids=allowed)
    assert set(sampled) <= set(allowed)


def test_bad_words_never_appear(llm: LLM) -> None:
    greedy = llm.generate(PROMPT,
                          SamplingParams(temperature=0, max_tokens=40),
                          use_tqdm=False)[0].outputs[0].text
    assert "Lily" in greedy
    banned = llm.generate(PROMPT,
                          SamplingParams(temperature=0,
                                         max_tokens=40,
                                         bad_words=["Lily"]),
                          use_tqdm=False)[0].outputs[0].text
    assert "Lily" not in banned


def test_logits_processor_runs_per_request(llm: LLM) -> None:
    seen: list[int] = []

    def force_token(output_ids: list[int], logits):
        seen.append(len(output_ids))
        logits[:] = float("-inf")
        logits[383] = 0.0
        return logits

    forced = _tokens(llm, temperature=0, logits_processors=[force_token])
    assert set(forced) == {383} and seen[:3] == [0, 1, 2]
    assert _tokens(llm, temperature=0) != forced  # other requests unaffected
