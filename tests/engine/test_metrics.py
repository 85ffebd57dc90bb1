import logging

from vllm.engine.metrics import StatLogger


class _Records(logging.Handler):

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_stat_logger_reports_every_interval() -> None:
    records = _Records()
    logger = logging.getLogger("vllm.engine.metrics")
    logger.addHandler(records)
    try:
        stats = StatLogger(interval_s=0.0)
        stats.record_step(num_prompt_tokens=100, num_generation_tokens=4)
        stats.maybe_log(num_running=4,
                        num_waiting=2,
                        num_swapped=1,
                        kv_cache_usage=0.5,
                        prefix_cache_hit_rate=0.25,
                        num_preemptions=3)
        quiet = StatLogger(interval_s=3600.0)
        quiet.maybe_log(num_running=0,
                        num_waiting=0,
                        num_swapped=0,
                        kv_cache_usage=0.0,
                        prefix_cache_hit_rate=None,
                        num_preemptions=0)
    finally:
        logger.removeHandler(records)
    assert len(records.messages) == 1
    message = records.messages[0]
    for part in ("Running: 4 reqs", "Swapped: 1 reqs", "Pending: 2 reqs",
                 "GPU KV cache usage: 50.0%", "Prefix cache hit rate: 25.0%",
                 "Preemptions: 3", "prompt throughput"):
        assert part in message, part
