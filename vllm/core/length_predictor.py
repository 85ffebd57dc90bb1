"""Predicts how many tokens a request will generate, from finished requests."""
import math
from collections import defaultdict, deque


def _bucket(n: int | None) -> int:
    """Powers of two: 0 for None/0, else floor(log2(n)) + 1."""
    return 0 if not n else int(math.log2(n)) + 1


class OutputLengthPredictor:
    """A high quantile of recent output lengths of similar requests.

    Similar = same prompt-length bucket and same max_tokens bucket (powers of
    two); a bucket with too few samples falls back to the max_tokens bucket,
    then to all requests. Predictions never exceed max_tokens.
    """

    def __init__(self,
                 quantile: float = 0.9,
                 min_samples: int = 8,
                 max_history: int = 512) -> None:
        self.quantile = quantile
        self.min_samples = min_samples
        self._by_key: dict[object, deque[int]] = defaultdict(
            lambda: deque(maxlen=max_history))

    def observe(self, prompt_len: int, max_tokens: int | None,
                output_len: int) -> None:
        cap = _bucket(max_tokens)
        for key in ((_bucket(prompt_len), cap), cap, None):
            self._by_key[key].append(output_len)

    def predict(self, prompt_len: int, max_tokens: int | None) -> int | None:
        cap = _bucket(max_tokens)
        for key in ((_bucket(prompt_len), cap), cap, None):
            samples = self._by_key.get(key)
            if samples is not None and len(samples) >= self.min_samples:
                ordered = sorted(samples)
                value = ordered[min(
                    len(ordered) - 1, int(self.quantile * len(ordered)))]
                return value if max_tokens is None else min(value, max_tokens)
        return None
