"""Top-nσ (Tang et al., 2024): keep the tokens whose logit is at least
max - n * σ of the temperature-scaled logits, on logits the test controls."""
import math
from pathlib import Path

import pytest
import torch

from tests.samplers.utils import (assert_matches, draw_many, make_metadata,
                                  sample)
from vllm.sampling_params import SamplingParams

NEG_INF = float("-inf")


def kept_by_top_n_sigma(logits: list[float], n: float) -> list[bool]:
    """Plain-Python top-nσ: σ is the population standard deviation of the
    finite logits."""
    finite = [x for x in logits if math.isfinite(x)]
    mean = sum(finite) / len(finite)
    sigma = math.sqrt(sum((x - mean)**2 for x in finite) / len(finite))
    return [x >= max(finite) - n * sigma for x in logits]


def expected_probs(logits: list[float], keep: list[bool],
                   temperature: float) -> torch.Tensor:
    kept = torch.tensor([x if k else NEG_INF for x, k in zip(logits, keep)])
    return (kept / temperature).softmax(dim=-1)


LOGITS = [3.0, 2.6, 2.2, 1.0, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0]


@pytest.mark.parametrize("n", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_keeps_the_tokens_within_n_sigma_of_the_max(n, temperature):
    keep = kept_by_top_n_sigma(LOGITS, n)
    assert 1 < sum(keep) < len(LOGITS)  # the case is not trivial
    counts = draw_many(torch.tensor(LOGITS),
                       SamplingParams(top_n_sigma=n, temperature=temperature))
    assert_matches(counts, expected_probs(LOGITS, keep, temperature))


def test_tiny_n_is_greedy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 200, generator=gen) * 2
    params = [
        SamplingParams(top_n_sigma=1e-6, temperature=t, seed=i)
        for i, t in enumerate([0.5, 1.0, 3.0, 10.0] * 16)
    ]
    generators = [torch.Generator().manual_seed(i) for i in range(64)]
    tokens = sample(logits, params, generators=generators)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_large_n_keeps_everything():
    logits = torch.tensor(LOGITS[:5])
    counts = draw_many(logits, SamplingParams(top_n_sigma=100.0))
    assert_matches(counts, logits.softmax(dim=-1))


def test_sigma_ignores_masked_tokens():
    # Allowed: tokens 0-3. Over the whole row (with the -10s) σ is large
    # and n = 1 would keep all four; over the allowed tokens it keeps two.
    logits = [2.0, 1.8, 0.0, -0.5] + [-10.0] * 6
    allowed = [0, 1, 2, 3]
    assert all(kept_by_top_n_sigma(logits, 1.0)[:4])
    masked = logits[:4] + [NEG_INF] * 6
    keep = kept_by_top_n_sigma(masked, 1.0)
    assert keep[:4] == [True, True, False, False]
    counts = draw_many(
        torch.tensor(logits),
        SamplingParams(top_n_sigma=1.0, allowed_token_ids=allowed))
    assert_matches(counts, expected_probs(logits, keep, 1.0))


def test_applies_after_penalties():
    # The penalty drops token 0 far below; σ and max follow the new logits.
    logits = [3.0, 2.6, 2.2, 1.0, 0.0]
    penalised = [3.0 - 4.0] + logits[1:]
    keep = kept_by_top_n_sigma(penalised, 1.0)
    counts = draw_many(torch.tensor(logits),
                       SamplingParams(top_n_sigma=1.0,
                                      presence_penalty=2.0,
                                      frequency_penalty=2.0),
                       output_token_ids=[0])
    assert_matches(counts, expected_probs(penalised, keep, 1.0))


def test_top_p_renormalises_over_the_top_n_sigma_survivors():
    logits = [2.0, 1.9, 1.8] + [0.5] * 20
    keep = kept_by_top_n_sigma(logits, 1.0)
    assert keep == [True] * 3 + [False] * 20
    # Over the three survivors top_p 0.5 keeps two (0.37 + 0.33). Over the
    # whole row the first three hold only 0.38, so top_p alone keeps more.
    full = torch.tensor(logits).softmax(dim=-1)
    assert full[:3].sum() < 0.5
    counts = draw_many(torch.tensor(logits),
                       SamplingParams(top_n_sigma=1.0, top_p=0.5))
    assert_matches(counts,
                   expected_probs(logits, [True, True] + [False] * 21, 1.0))


def test_with_min_p_and_top_k():
    logits = torch.tensor(LOGITS)
    keep = kept_by_top_n_sigma(LOGITS, 2.0)
    assert keep == [True] * 7 + [False] * 3
    # top_k 3 after it: tokens 0-2; min_p 0.5 at T 1: > 3 + ln 0.5 = 2.31.
    counts = draw_many(logits, SamplingParams(top_n_sigma=2.0, top_k=3))
    assert_matches(counts, expected_probs(LOGITS, [True] * 3 + [False] * 7,
                                          1.0))
    counts = draw_many(logits, SamplingParams(top_n_sigma=2.0, min_p=0.5))
    assert_matches(counts, expected_probs(LOGITS, [True] * 2 + [False] * 8,
                                          1.0))


def test_greedy_ignores_top_n_sigma():
    params = SamplingParams(temperature=0.0, top_n_sigma=0.5)
    assert params.top_n_sigma is None
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 30, generator=gen)
    mixed = [params, SamplingParams(top_n_sigma=0.5)] * 4
    tokens = sample(logits, mixed)
    assert torch.equal(tokens[0::2], logits[0::2].argmax(dim=-1))


def test_metadata():
    md = make_metadata([SamplingParams(), SamplingParams(top_p=0.5)], 10)
    assert md.top_n_sigma is None
    md = make_metadata([SamplingParams(), SamplingParams(top_n_sigma=1.5)], 10)
    assert md.top_n_sigma is not None
    assert md.top_n_sigma.tolist() == [0.0, 1.5]


@pytest.mark.parametrize(
    "value", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "1", True])
def test_invalid_top_n_sigma_names_the_field(value):
    with pytest.raises(ValueError, match=r"^top_n_sigma ") as excinfo:
        SamplingParams(top_n_sigma=value)
    assert repr(value) in str(excinfo.value)


def test_valid_top_n_sigma():
    assert SamplingParams().top_n_sigma is None
    assert SamplingParams(top_n_sigma=1).top_n_sigma == 1
    assert SamplingParams(top_n_sigma=1e-6).top_n_sigma == 1e-6
    assert "top_n_sigma=2.0" in repr(SamplingParams(top_n_sigma=2.0))


def test_top_n_sigma_through_llm(stories260k_path: Path):
    from vllm import LLM
    llm = LLM(str(stories260k_path), device="cpu", max_model_len=128)
    params = SamplingParams(top_n_sigma=2.0, max_tokens=10)
    outputs = llm.generate(["Once upon a time"], params, use_tqdm=False)
    completion = outputs[0].outputs[0]
    assert 1 <= len(completion.token_ids) <= 10
    assert completion.text
    # A tiny n is greedy decoding.
    greedy = llm.generate(["Once upon a time"],
                          SamplingParams(temperature=0.0, max_tokens=10),
                          use_tqdm=False)[0].outputs[0].token_ids
    tiny = llm.generate(["Once upon a time"],
                        SamplingParams(top_n_sigma=1e-6, max_tokens=10),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert tiny == greedy
