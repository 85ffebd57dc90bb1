"""OutputLengthPredictor: online output-length quantiles by bucket."""
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.core.length_predictor import OutputLengthPredictor


def test_none_without_history() -> None:
    pred = OutputLengthPredictor(min_samples=4)
    assert pred.predict(100, 256) is None
    assert pred.predict(100, None) is None
    for _ in range(3):
        pred.observe(100, 256, 50)
    assert pred.predict(100, 256) is None  # 3 < min_samples everywhere
    pred.observe(100, 256, 50)
    assert pred.predict(100, 256) == 50
    assert pred.num_observed == 4


def test_learns_per_bucket_distributions() -> None:
    pred = OutputLengthPredictor(quantile=0.9, min_samples=8)
    # short prompts (16-31 tokens) answer briefly, long ones (512-1023) at length
    for i in range(50):
        pred.observe(20, 1024, 10 + i % 10)  # 10..19
        pred.observe(600, 1024, 300 + i % 10)  # 300..309
    assert pred.predict(17, 1024) == 18  # nearest-rank p90 of 10..19
    assert pred.predict(1000, 1024) == 308
    # the same prompt bucket with another cap bucket has its own history
    for _ in range(8):
        pred.observe(20, 64, 60)
    assert pred.predict(20, 64) == 60
    assert pred.predict(20, 1024) == 18
    assert pred.num_samples(20, 1024) == 50


def test_never_above_max_tokens() -> None:
    pred = OutputLengthPredictor(min_samples=1)
    for _ in range(20):
        pred.observe(100, 1000, 900)
    assert pred.predict(100, 1000) == 900
    assert pred.predict(100, 600) == 600  # same cap bucket (512-1023)
    assert pred.predict(100, 5) == 5  # only global history: clamped
    assert pred.predict(100, 0) == 0


@settings(max_examples=200, deadline=None)
@given(obs=st.lists(st.tuples(st.integers(0, 5000),
                              st.one_of(st.none(), st.integers(1, 4096)),
                              st.integers(0, 5000)),
                    max_size=60),
       prompt_len=st.integers(0, 5000),
       max_tokens=st.one_of(st.none(), st.integers(0, 4096)),
       quantile=st.floats(0.01, 1.0),
       min_samples=st.integers(1, 10))
def test_prediction_bounds_hold_for_any_history(obs, prompt_len, max_tokens,
                                                quantile, min_samples) -> None:
    pred = OutputLengthPredictor(quantile, min_samples, max_history=16)
    for p, cap, out in obs:
        pred.observe(p, cap, min(out, cap) if cap is not None else out)
    value = pred.predict(prompt_len, max_tokens)
    if len(obs) < min_samples:
        assert value is None
    if value is not None:
        assert value >= 0
        if max_tokens is not None:
            assert value <= max_tokens
        assert value <= max(out for _, _, out in obs) or value == max_tokens


def test_falls_back_to_cap_bucket_then_global() -> None:
    pred = OutputLengthPredictor(quantile=1.0, min_samples=5)
    for _ in range(5):
        pred.observe(1000, 256, 100)  # prompt bucket 512-1023, cap 256-511
    for _ in range(3):
        pred.observe(20, 256, 40)  # a bucket below min_samples
    # prompt bucket 16-31 has 3 samples: the cap bucket (8 samples) answers
    assert pred.predict(20, 256) == 100
    # a prompt bucket never seen: the cap bucket too
    assert pred.predict(5, 300) == 100
    # a cap bucket never seen: the global history
    assert pred.predict(20, 2048) == 100
    assert pred.predict(20, None) == 100
    # the fine bucket answers on its own once it holds min_samples
    for _ in range(2):
        pred.observe(20, 256, 40)
    assert pred.predict(20, 256) == 40


def test_fallback_scales_capped_samples_to_the_new_cap() -> None:
    """A request that hit its cap only says its true length is at least the
    cap: on another cap's scale it counts as that cap."""
    pred = OutputLengthPredictor(quantile=0.5, min_samples=4)
    for _ in range(6):
        pred.observe(100, 64, 64)  # all truncated at 64
    for _ in range(4):
        pred.observe(100, 64, 10)  # stopped by themselves
    # same cap: median of {10 x4, >=64 x6} is 64
    assert pred.predict(100, 64) == 64
    # a larger cap, only global history: the truncated ones could run to it
    assert pred.predict(100, 2000) == 2000
    # no cap: censored lengths are unknown; the largest known length answers
    assert pred.predict(100, None) == 10
    # uncensored history predicts the same length whatever the cap
    other = OutputLengthPredictor(quantile=0.5, min_samples=4)
    for _ in range(4):
        other.observe(100, 4096, 30)
    assert other.predict(100, 4096) == 30
    assert other.predict(100, 64) == 30
    assert other.predict(100, None) == 30
    assert other.predict(100, 20) == 20


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_quantile_on_lognormal(q: float) -> None:
    rng = np.random.default_rng(0)
    median, sigma = 150.0, 1.0
    pred = OutputLengthPredictor(quantile=q, min_samples=8, max_history=4000)
    for x in rng.lognormal(math.log(median), sigma, size=4000):
        pred.observe(200, None, int(x))
    value = pred.predict(200, None)
    assert value is not None
    z = {0.5: 0.0, 0.9: 1.2816, 0.99: 2.3263}[q]
    expected = median * math.exp(sigma * z)
    assert value == pytest.approx(expected, rel=0.15)
    # fresh samples from the same law fall short of it at rate ~ 1 - q
    fresh = rng.lognormal(math.log(median), sigma, size=20000)
    assert np.mean(fresh > value) == pytest.approx(1 - q, abs=0.03)


def test_high_quantile_rarely_falls_short() -> None:
    """Online, request by request: p90 predictions cover ~90% of requests,
    the mean would cover far fewer on heavy-tailed lengths."""
    rng = np.random.default_rng(1)
    pred = OutputLengthPredictor(quantile=0.9)
    lengths = np.minimum(rng.lognormal(math.log(150), 1.0, 3000), 1024)
    covered = total = 0
    for x in lengths.astype(int):
        guess = pred.predict(200, 1024)
        if guess is not None:
            total += 1
            covered += x <= guess
        pred.observe(200, 1024, int(x))
    assert covered / total == pytest.approx(0.9, abs=0.03)
    assert np.mean(lengths <= lengths.mean()) < 0.75


def test_history_is_bounded_and_recent() -> None:
    pred = OutputLengthPredictor(quantile=1.0, min_samples=4, max_history=10)
    for _ in range(100):
        pred.observe(50, 128, 100)
    assert pred.predict(50, 128) == 100
    for _ in range(10):
        pred.observe(50, 128, 7)  # the workload changed
    assert pred.predict(50, 128) == 7  # old samples are gone
    assert pred.num_samples(50, 128) == 10
    for window in pred._windows.values():
        assert len(window.recent) == len(window.ordered) <= 10
    # sorted view stays consistent with the recent samples under churn
    r = random.Random(0)
    for _ in range(500):
        pred.observe(r.randint(1, 4000), r.choice([None, 16, 128, 1024]),
                     r.randint(0, 16))
    for window in pred._windows.values():
        assert window.ordered == sorted(window.recent)
        assert len(window) <= 10
    assert len(pred._windows) <= 3 * 13 * 5  # bounded number of buckets


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        OutputLengthPredictor(quantile=0.0)
    with pytest.raises(ValueError):
        OutputLengthPredictor(min_samples=0)
    with pytest.raises(ValueError):
        OutputLengthPredictor(min_samples=8, max_history=4)
    with pytest.raises(ValueError):
        OutputLengthPredictor().observe(10, 10, -1)
