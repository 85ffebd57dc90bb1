"""Predicts how many tokens a request will generate, from finished requests.

``OutputLengthPredictor`` learns online from the output lengths the engine has
seen (``observe`` is called for every request that finished normally) and
answers ``predict`` with a high quantile of the lengths of similar requests.
It never looks at the prompt's text.

Similar requests share a bucket: the prompt length's power of two crossed with
the ``max_tokens`` power of two (``None``, no cap, is a bucket of its own).
Every observation is recorded at three levels, from fine to coarse:

1. (prompt-length bucket, max_tokens bucket)
2. (any prompt length, max_tokens bucket)
3. every request

``predict`` answers from the finest level whose bucket holds at least
``min_samples`` samples, and ``None`` when even the global one does not: the
caller then does what it would do without a predictor.

A quantile (0.9 by default), not the mean: a prediction that falls short
costs a preemption, one that overshoots only holds some memory back, and
output lengths are heavy-tailed.

Scaling across caps. A request that stopped by itself before its cap
(EOS, stop string) tells its true length. One that reached its ``max_tokens``
only tells that its true length is at least that cap: it is recorded as
*censored* (+inf). A request asking for ``max_tokens = C`` would stop at
``min(true length, C)``, so the prediction is ``min(quantile, C)`` at every
level: a censored sample counts as C for it, an uncensored one as its length
clamped to C. Samples of a coarser level, whose caps may differ from C, are so
put on the requesting caller's scale, and a prediction is never above
``max_tokens``. (Without a cap a censored sample's true length is unknown; the
quantile then falls back to the largest uncensored sample.)

Cost: each bucket keeps its most recent ``max_history`` samples in arrival
order (for eviction) and in sorted order (for the quantile): ``observe`` is a
binary search and a short list insertion per level, ``predict`` a dictionary
look-up and an index per level. Memory is bounded by the number of buckets
(about log2(max prompt) x log2(max cap)) times ``max_history``.
"""
import math
from bisect import bisect_left, insort
from collections import deque

# The key of a bucket: (prompt bucket or None for "any", cap bucket), or
# None for the global bucket. A cap bucket is None for "no max_tokens".
_Key = tuple[int | None, int | None] | None

_ANY_PROMPT = None


def _pow2_bucket(n: int) -> int:
    """``n`` in [2**(b-1), 2**b) -> b; 0 -> 0."""
    return max(n, 0).bit_length()


def _cap_bucket(max_tokens: int | None) -> int | None:
    return None if max_tokens is None else _pow2_bucket(max_tokens)


class _Window:
    """The most recent ``max_history`` samples, also kept sorted."""

    __slots__ = ("recent", "ordered")

    def __init__(self, max_history: int) -> None:
        self.recent: deque[float] = deque(maxlen=max_history)
        self.ordered: list[float] = []

    def __len__(self) -> int:
        return len(self.recent)

    def add(self, value: float) -> None:
        if len(self.recent) == self.recent.maxlen:
            oldest = self.recent[0]  # evicted by the append below
            del self.ordered[bisect_left(self.ordered, oldest)]
        self.recent.append(value)
        insort(self.ordered, value)

    def quantile(self, q: float) -> float:
        """Nearest rank: the smallest sample with at least a fraction ``q`` of
        the samples at or below it."""
        n = len(self.ordered)
        rank = min(n, max(1, math.ceil(q * n)))
        return self.ordered[rank - 1]

    def largest_finite(self) -> float | None:
        index = bisect_left(self.ordered, math.inf)
        return self.ordered[index - 1] if index else None


class OutputLengthPredictor:
    """A high quantile of the recent output lengths of similar requests.

    Args:
        quantile: which quantile of a bucket's samples is predicted, in (0, 1].
        min_samples: samples a bucket needs before it is trusted; below that
            the next coarser level answers.
        max_history: samples kept per bucket (the most recent ones), so the
            predictor follows a workload that changes and its memory is bounded.
    """

    def __init__(self,
                 quantile: float = 0.9,
                 min_samples: int = 8,
                 max_history: int = 512) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}.")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}.")
        if max_history < min_samples:
            raise ValueError(f"max_history ({max_history}) must be >= "
                             f"min_samples ({min_samples}).")
        self.quantile = quantile
        self.min_samples = min_samples
        self.max_history = max_history
        self.num_observed = 0
        self._windows: dict[_Key, _Window] = {}

    @staticmethod
    def _keys(prompt_len: int, max_tokens: int | None) -> tuple[_Key, ...]:
        """The buckets of a request, finest first."""
        cap = _cap_bucket(max_tokens)
        return (_pow2_bucket(prompt_len), cap), (_ANY_PROMPT, cap), None

    def observe(self, prompt_len: int, max_tokens: int | None,
                output_len: int) -> None:
        """Record a request that finished normally (not aborted)."""
        if output_len < 0:
            raise ValueError(f"output_len must be >= 0, got {output_len}.")
        censored = max_tokens is not None and output_len >= max_tokens
        value = math.inf if censored else float(output_len)
        for key in self._keys(prompt_len, max_tokens):
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(self.max_history)
            window.add(value)
        self.num_observed += 1

    def predict(self, prompt_len: int, max_tokens: int | None) -> int | None:
        """Predicted number of output tokens, never above ``max_tokens``;
        ``None`` while fewer than ``min_samples`` requests were observed."""
        for key in self._keys(prompt_len, max_tokens):
            window = self._windows.get(key)
            if window is None or len(window) < self.min_samples:
                continue
            value = window.quantile(self.quantile)
            if max_tokens is not None:
                return int(min(value, max_tokens))
            if value == math.inf:
                finite = window.largest_finite()
                if finite is None:
                    continue  # only censored samples: ask a coarser level
                value = finite
            return int(value)
        return None

    def num_samples(self, prompt_len: int, max_tokens: int | None) -> int:
        """Samples in the finest bucket of such a request (for inspection)."""
        window = self._windows.get(self._keys(prompt_len, max_tokens)[0])
        return 0 if window is None else len(window)

    def __repr__(self) -> str:
        return (f"OutputLengthPredictor(quantile={self.quantile}, "
                f"min_samples={self.min_samples}, "
                f"max_history={self.max_history}, "
                f"observed={self.num_observed}, buckets={len(self._windows)})")
