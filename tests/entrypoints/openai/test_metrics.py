"""GET /metrics: Prometheus text format (0.0.4) of the engine's counters,
gauges and histograms, on stories260K through the ASGI app; the text
rendering; the engine-side counters."""
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.entrypoints.openai.test_server import call, server_args
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.engine.metrics import (CONTENT_TYPE, MetricsSnapshot,
                                 escape_label_value, render_prometheus)
from vllm.entrypoints.openai.api_server import build_app

# name{labels} value
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')

Labels = tuple[tuple[str, str], ...]
Families = dict[str, tuple[str, str]]  # name -> (type, help)
Samples = dict[tuple[str, Labels], float]  # (name, sorted labels) -> value


def _unescape(value: str) -> str:
    return re.sub(r'\\(.)', lambda m: "\n"
                  if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> tuple[Families, Samples]:
    """The families and samples of a /metrics body; asserts the
    format's shape: a HELP and a TYPE line before each family's samples."""
    assert text.endswith("\n")
    families: Families = {}
    samples: Samples = {}
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert name in helps, f"TYPE before HELP: {line}"
            assert kind in ("counter", "gauge", "histogram"), line
            families[name] = (kind, helps[name])
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, _, raw_labels, value = match.groups()
            family = next((f for f in families if name == f or (
                families[f][0] == "histogram" and name.startswith(f + "_"))),
                          None)
            assert family is not None, f"sample before its TYPE: {line}"
            labels: list[tuple[str, str]] = []
            rest = raw_labels or ""
            while rest:
                label = _LABEL.match(rest)
                assert label, f"bad labels in {line!r}"
                labels.append((label.group(1), _unescape(label.group(2))))
                rest = rest[label.end():]
            key = (name, tuple(sorted(labels)))
            assert key not in samples, f"duplicate sample {line}"
            samples[key] = float(value)
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def buckets(samples: Samples, name: str,
            model: str) -> list[tuple[float, float]]:
    out = []
    for (sample, labels), count in samples.items():
        lab = dict(labels)
        if sample == f"{name}_bucket" and lab["model_name"] == model:
            out.append((float(lab["le"]), count))
    return sorted(out)


@pytest.fixture(scope="module")
def engine(stories260k_path: Path) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=str(stories260k_path), device="cpu"))
    yield engine
    engine.shutdown()


def test_metrics_count_completions(engine: AsyncLLMEngine,
                                   stories260k_path: Path) -> None:
    model = "tiny"
    app = build_app(
        engine,
        server_args(stories260k_path,
                    served_model_name=[model],
                    api_key="secret"))
    # No API key needed, as vLLM.
    before = call(app, "GET", "/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"] == CONTENT_TYPE
    _, start = parse(before.text)

    prompt_tokens = generated = 0
    prompts = ["Once upon a time", "The little dog"]
    for i, prompt in enumerate(prompts):
        response = call(app,
                        "POST",
                        "/v1/completions",
                        headers={"Authorization": "Bearer secret"},
                        json={
                            "model": model,
                            "prompt": prompt,
                            "max_tokens": 4 + i,
                            "temperature": 0,
                            "ignore_eos": True
                        })
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["finish_reason"] == "length"
        prompt_tokens += body["usage"]["prompt_tokens"]
        generated += body["usage"]["completion_tokens"]
    assert generated == 4 + 5

    response = call(app, "GET", "/metrics")
    families, end = parse(response.text)

    def grew(name: str, **labels: str) -> float:
        labels["model_name"] = model
        return value(end, name, **labels) - value(start, name, **labels)

    assert grew("vllm:prompt_tokens_total") == prompt_tokens
    assert grew("vllm:generation_tokens_total") == generated
    assert grew("vllm:request_success_total", finished_reason="length") == 2
    assert grew("vllm:request_success_total", finished_reason="stop") == 0
    assert grew("vllm:request_success_total", finished_reason="abort") == 0
    assert grew("vllm:num_preemptions_total") == 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:num_requests_swapped"):
        assert families[name][0] == "gauge"
        assert value(end, name, model_name=model) == 0
    usage = value(end, "vllm:gpu_cache_usage_perc", model_name=model)
    assert 0 <= usage <= 1
    # Prefix caching is off: no hit-rate gauge.
    assert "vllm:gpu_prefix_cache_hit_rate" not in families
    for name in ("vllm:prompt_tokens_total", "vllm:request_success_total"):
        assert families[name][0] == "counter"

    finished = sum(
        value(end,
              "vllm:request_success_total",
              model_name=model,
              finished_reason=r) for r in ("stop", "length"))
    for name in ("vllm:time_to_first_token_seconds",
                 "vllm:e2e_request_latency_seconds"):
        assert families[name][0] == "histogram"
        assert grew(f"{name}_count") == 2
        counts = buckets(end, name, model)
        assert counts[-1][0] == math.inf
        assert all(a[1] <= b[1] for a, b in zip(counts, counts[1:]))
        total = value(end, f"{name}_count", model_name=model)
        assert counts[-1][1] == total == finished
        assert value(end, f"{name}_sum", model_name=model) > 0
    # Each request's first token comes before its end.
    assert value(end, "vllm:time_to_first_token_seconds_sum",
                 model_name=model) <= value(
                     end,
                     "vllm:e2e_request_latency_seconds_sum",
                     model_name=model)


def test_metrics_empty_when_stats_are_off(stories260k_path: Path) -> None:

    class NoStats:
        engine = type(
            "E", (), {
                "model_config": type("M", (), {"max_model_len": 8})(),
                "tokenizer": None,
                "generation_config": {}
            })()

        def get_metrics(self) -> None:
            return None

    response = call(build_app(NoStats(), server_args(stories260k_path)), "GET",
                    "/metrics")
    assert response.status_code == 200
    assert response.text == ""


def test_render_prometheus_text() -> None:
    snapshot = MetricsSnapshot(prompt_tokens=7,
                               generation_tokens=3,
                               num_running=2,
                               kv_cache_usage=0.25,
                               prefix_cache_hit_rate=0.5)
    snapshot.finished["stop"] = 1
    snapshot.time_to_first_token.observe(0.003)
    snapshot.time_to_first_token.observe(0.3)
    snapshot.time_to_first_token.observe(1e6)  # above every bound
    model = 'a "q" \\ b\nc'
    text = render_prometheus(snapshot, model)
    assert 'model_name="a \\"q\\" \\\\ b\\nc"' in text
    assert escape_label_value('x"\\\n') == 'x\\"\\\\\\n'
    lines = text.splitlines()
    i = lines.index("# TYPE vllm:prompt_tokens_total counter")
    assert lines[i - 1].startswith("# HELP vllm:prompt_tokens_total ")
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in lines
    assert "# TYPE vllm:gpu_prefix_cache_hit_rate gauge" in lines

    families, samples = parse(text)
    assert value(samples, "vllm:prompt_tokens_total", model_name=model) == 7
    assert value(samples, "vllm:num_requests_running", model_name=model) == 2
    assert value(samples, "vllm:gpu_cache_usage_perc", model_name=model) == 0.25
    assert value(samples,
                 "vllm:request_success_total",
                 model_name=model,
                 finished_reason="stop") == 1
    ttft = dict(buckets(samples, "vllm:time_to_first_token_seconds", model))
    assert ttft[0.001] == 0 and ttft[0.005] == 1 and ttft[0.25] == 1
    assert ttft[0.5] == 2 and ttft[10.0] == 2 and ttft[math.inf] == 3
    assert 'le="+Inf"' in text
    assert value(samples,
                 "vllm:time_to_first_token_seconds_count",
                 model_name=model) == 3
    assert value(samples,
                 "vllm:e2e_request_latency_seconds_count",
                 model_name=model) == 0
    # Every family has its HELP and TYPE, every sample its family.
    assert len(families) == text.count("# TYPE ") == text.count("# HELP ")


def test_engine_counters_via_llm(stories260k_path: Path) -> None:
    llm = LLM(str(stories260k_path), device="cpu", disable_log_stats=False)
    stat_logger = llm.llm_engine.stat_logger
    assert stat_logger is not None
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(["Once upon a time", "Lily", "The sun"],
                           params,
                           use_tqdm=False)
    metrics = stat_logger.snapshot()
    assert metrics.prompt_tokens == sum(
        len(o.prompt_token_ids) for o in outputs)
    assert metrics.generation_tokens == 3 * 6
    assert metrics.finished == {"stop": 0, "length": 3, "abort": 0}
    assert metrics.time_to_first_token.count == 3
    assert metrics.e2e_latency.count == 3
    assert metrics.num_running == metrics.num_waiting == 0

    # An abort counts as one; its latency is not observed.
    engine = llm.llm_engine
    engine.add_request("gone", "Once upon a time",
                       SamplingParams(max_tokens=50))
    engine.step()
    assert stat_logger.snapshot().num_running == 1
    engine.abort_request("gone")
    metrics = stat_logger.snapshot()
    assert metrics.finished["abort"] == 1
    assert metrics.e2e_latency.count == 3
    assert metrics.num_running == 0
    # The snapshot is a copy: later records do not change it.
    stat_logger.record_finished("stop", 0.1)
    assert metrics.finished["stop"] == 0
