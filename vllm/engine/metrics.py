"""Engine statistics, logged at INFO every few seconds as vLLM does."""
import time

from vllm.logger import init_logger

logger = init_logger(__name__)


class StatLogger:
    """Accumulates per-step token counts; logs throughput and queue state."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last_log = time.monotonic()
        self._prompt_tokens = 0
        self._generation_tokens = 0

    def record_step(self, num_prompt_tokens: int,
                    num_generation_tokens: int) -> None:
        self._prompt_tokens += num_prompt_tokens
        self._generation_tokens += num_generation_tokens

    def maybe_log(self, *, num_running: int, num_waiting: int, num_swapped: int,
                  kv_cache_usage: float, prefix_cache_hit_rate: float | None,
                  num_preemptions: int) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if elapsed < self.interval_s:
            return
        hit_rate = (
            "" if prefix_cache_hit_rate is None else
            f", Prefix cache hit rate: {100 * prefix_cache_hit_rate:.1f}%")
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: "
            "%.1f tokens/s, Running: %d reqs, Swapped: %d reqs, Pending: %d "
            "reqs, GPU KV cache usage: %.1f%%%s, Preemptions: %d",
            self._prompt_tokens / elapsed, self._generation_tokens / elapsed,
            num_running, num_swapped, num_waiting, 100 * kv_cache_usage,
            hit_rate, num_preemptions)
        self._last_log = now
        self._prompt_tokens = self._generation_tokens = 0
