"""Engine statistics: an INFO log of throughput every few seconds, and the
counters, gauges and histograms the server's ``GET /metrics`` shows in
Prometheus' text format (exposition format 0.0.4), as vLLM does.

One StatLogger per engine, written only by the engine's thread (LLMEngine
records each step, each request's first token and each finish). The server
reads it from another thread through ``snapshot()``: every write and the
copy take one lock, so a snapshot never sees half of an update.

Names are vLLM V0's (``vllm:gpu_cache_usage_perc``,
``vllm:num_requests_swapped``, ``vllm:gpu_prefix_cache_hit_rate``), each
sample labelled ``model_name``. ``prompt_tokens_total`` counts each
request's prompt once, when its first token is sampled (as vLLM V1: cached
and recomputed prompt tokens count once); ``generation_tokens_total``
counts every sampled token used.
"""
import bisect
import math
import threading
import time
from dataclasses import dataclass, field

from vllm.logger import init_logger

logger = init_logger(__name__)

# Upper bounds (seconds) of the histogram buckets; +Inf is implied.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)
E2E_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                       30.0, 60.0)
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Histogram:
    """Observations counted per bucket (``counts[i]``: values in
    (bounds[i-1], bounds[i]], the last one above every bound)."""
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it), +Inf last."""
        out = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> "Histogram":
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass
class MetricsSnapshot:
    """What /metrics shows: totals since start and the latest gauges."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    preemptions: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float | None = None
    time_to_first_token: Histogram = field(
        default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e_latency: Histogram = field(
        default_factory=lambda: Histogram(E2E_LATENCY_BUCKETS))

    def copy(self) -> "MetricsSnapshot":
        return MetricsSnapshot(
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            finished=dict(self.finished),
            preemptions=self.preemptions,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_swapped=self.num_swapped,
            kv_cache_usage=self.kv_cache_usage,
            prefix_cache_hit_rate=self.prefix_cache_hit_rate,
            time_to_first_token=self.time_to_first_token.copy(),
            e2e_latency=self.e2e_latency.copy())


class StatLogger:
    """Accumulates per-step token counts; logs throughput and queue state;
    keeps the totals and gauges of /metrics (see ``snapshot``)."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last_log = time.monotonic()
        # Throughput since the last log line.
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._lock = threading.Lock()
        self._metrics = MetricsSnapshot()

    # ------------------------------------------------ engine thread: writes
    def record_step(self, num_prompt_tokens: int,
                    num_generation_tokens: int) -> None:
        """Tokens one step computed (prompt) and sampled (generation)."""
        self._prompt_tokens += num_prompt_tokens
        self._generation_tokens += num_generation_tokens
        with self._lock:
            self._metrics.generation_tokens += num_generation_tokens

    def record_first_token(self, num_prompt_tokens: int,
                           time_to_first_token: float) -> None:
        """A request sampled its first token (its prompt is done)."""
        with self._lock:
            self._metrics.prompt_tokens += num_prompt_tokens
            self._metrics.time_to_first_token.observe(time_to_first_token)

    def record_finished(self, finish_reason: str | None,
                        e2e_latency: float | None) -> None:
        """A request ended (``e2e_latency`` None: aborted, not observed)."""
        reason = finish_reason or "abort"
        with self._lock:
            finished = self._metrics.finished
            finished[reason] = finished.get(reason, 0) + 1
            if e2e_latency is not None:
                self._metrics.e2e_latency.observe(e2e_latency)

    def update_gauges(self, *, num_running: int, num_waiting: int,
                      num_swapped: int, kv_cache_usage: float,
                      prefix_cache_hit_rate: float | None,
                      num_preemptions: int) -> None:
        with self._lock:
            m = self._metrics
            m.num_running, m.num_waiting, m.num_swapped = (num_running,
                                                           num_waiting,
                                                           num_swapped)
            m.kv_cache_usage = kv_cache_usage
            m.prefix_cache_hit_rate = prefix_cache_hit_rate
            m.preemptions = num_preemptions

    def maybe_log(self, *, num_running: int, num_waiting: int, num_swapped: int,
                  kv_cache_usage: float, prefix_cache_hit_rate: float | None,
                  num_preemptions: int) -> None:
        """Store the gauges; log a line when ``interval_s`` has passed."""
        self.update_gauges(num_running=num_running,
                           num_waiting=num_waiting,
                           num_swapped=num_swapped,
                           kv_cache_usage=kv_cache_usage,
                           prefix_cache_hit_rate=prefix_cache_hit_rate,
                           num_preemptions=num_preemptions)
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

    # ------------------------------------------------- any thread: reads
    def snapshot(self) -> MetricsSnapshot:
        """A consistent copy of the metrics, safe to read from any thread."""
        with self._lock:
            return self._metrics.copy()


# ------------------------------------------------ Prometheus text rendering
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label_value(value: str) -> str:
    """A label value as the text format quotes it: \\ " and newline
    escaped."""
    value = value.replace("\\", "\\\\")
    value = value.replace('"', '\\"')
    return value.replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{escape_label_value(value)}"'
                     for key, value in labels.items())
    return "{" + inner + "}"


class _Writer:
    """Lines of the text format, one metric family at a time."""

    def __init__(self, base_labels: dict[str, str]) -> None:
        self.base = base_labels
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self,
               name: str,
               value: float,
               extra: dict[str, str] | None = None) -> None:
        labels = {**self.base, **(extra or {})}
        self.lines.append(f"{name}{_labels(labels)} {format_value(value)}")

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        self.family(name, "histogram", help_text)
        for bound, count in hist.cumulative():
            self.sample(f"{name}_bucket", count, {"le": format_value(bound)})
        self.sample(f"{name}_sum", hist.total)
        self.sample(f"{name}_count", hist.count)


def render_prometheus(snapshot: MetricsSnapshot, model_name: str) -> str:
    """The metrics in Prometheus' text exposition format 0.0.4."""
    w = _Writer({"model_name": model_name})
    gauges: list[tuple[str, str, float | None]] = [
        ("vllm:num_requests_running",
         "Number of requests currently running on the GPU.",
         snapshot.num_running),
        ("vllm:num_requests_waiting", "Number of requests waiting to be "
         "processed.", snapshot.num_waiting),
        ("vllm:num_requests_swapped", "Number of requests swapped to CPU.",
         snapshot.num_swapped),
        ("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 "
         "percent usage.", snapshot.kv_cache_usage),
        ("vllm:gpu_prefix_cache_hit_rate", "GPU prefix cache block hit rate.",
         snapshot.prefix_cache_hit_rate),
    ]
    for name, help_text, value in gauges:
        if value is None:
            continue  # prefix caching is off
        w.family(name, "gauge", help_text)
        w.sample(name, value)
    counters = [
        ("vllm:num_preemptions_total",
         "Cumulative number of preemptions from the engine.",
         snapshot.preemptions),
        ("vllm:prompt_tokens_total", "Number of prefill tokens processed.",
         snapshot.prompt_tokens),
        ("vllm:generation_tokens_total",
         "Number of generation tokens processed.", snapshot.generation_tokens),
    ]
    for name, help_text, total in counters:
        w.family(name, "counter", help_text)
        w.sample(name, total)
    name = "vllm:request_success_total"
    w.family(name, "counter", "Count of finished requests, by finish reason.")
    for reason, total in snapshot.finished.items():
        w.sample(name, total, {"finished_reason": reason})
    w.histogram("vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                snapshot.time_to_first_token)
    w.histogram("vllm:e2e_request_latency_seconds",
                "Histogram of end to end request latency in seconds.",
                snapshot.e2e_latency)
    return "\n".join(w.lines) + "\n"
