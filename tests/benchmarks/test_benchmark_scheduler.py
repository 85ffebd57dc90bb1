"""benchmarks/benchmark_scheduler.py on a small workload (no model)."""
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "benchmark_scheduler.py"

RESULT_FIELDS = ("allocator", "num_blocks", "num_requests", "num_finished",
                 "num_ignored", "total_steps", "num_preemptions",
                 "recomputed_tokens", "computed_tokens", "prompt_tokens",
                 "output_tokens", "mean_latency_steps", "p99_latency_steps",
                 "mean_ttft_steps", "p99_ttft_steps", "output_tokens_per_step",
                 "tokens_per_step", "mean_kv_usage", "prediction_coverage")
SMALL = [
    "--num-requests", "120", "--arrival-rate", "2", "--prompt-median", "64",
    "--output-median", "48", "--max-tokens", "256", "--max-model-len", "1024",
    "--max-num-seqs", "64", "--max-num-batched-tokens", "512", "--seed", "3"
]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_scheduler", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check_result(result: dict, num_requests: int) -> None:
    for field in RESULT_FIELDS:
        assert field in result, field
    assert result["num_finished"] == num_requests
    assert result["num_ignored"] == 0
    assert result["num_stopped"] + result["num_length_capped"] == num_requests
    # Every token but each request's last is computed once, plus recomputation.
    assert result["computed_tokens"] == (result["prompt_tokens"] +
                                         result["output_tokens"] -
                                         num_requests +
                                         result["recomputed_tokens"])
    assert result["total_steps"] > 0
    assert result["p99_latency_steps"] >= result["mean_latency_steps"] * 0.5
    assert result["mean_latency_steps"] >= result["mean_ttft_steps"] >= 1
    assert result["output_tokens_per_step"] == pytest.approx(
        result["output_tokens"] / result["total_steps"])
    assert 0 < result["mean_kv_usage"] <= 1


def test_plain_json(bench: ModuleType, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plain.json"
    report = bench.main(SMALL +
                        ["--allocator", "plain", "--output-json",
                         str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) == {"config", "workload", "results", "ratios"}
    assert on_disk["ratios"] is None
    assert list(on_disk["results"]) == ["plain"]
    plain = on_disk["results"]["plain"]
    _check_result(plain, 120)
    assert plain["prediction_coverage"] is None
    # the default KV budget (a quarter of the demand) forces preemptions
    assert plain["num_preemptions"] > 0 and plain["recomputed_tokens"] > 0
    workload = on_disk["workload"]
    assert workload["num_blocks"] == plain["num_blocks"]
    assert workload["prompt_tokens"] == plain["prompt_tokens"]
    assert "total_steps" in capsys.readouterr().out


def test_ample_cache_never_preempts(bench: ModuleType) -> None:
    report = bench.main(SMALL + ["--allocator", "plain", "--kv-fraction", "4"])
    plain = report["results"]["plain"]
    _check_result(plain, 120)
    assert plain["num_preemptions"] == 0 and plain["recomputed_tokens"] == 0


def test_same_seed_same_workload(bench: ModuleType) -> None:
    a = bench.main(SMALL + ["--allocator", "plain"])
    b = bench.main(SMALL + ["--allocator", "plain"])
    for key in ("total_steps", "num_preemptions", "recomputed_tokens"):
        assert a["results"]["plain"][key] == b["results"]["plain"][key]
    c = bench.main(SMALL + ["--allocator", "plain", "--seed", "4"])
    assert c["workload"] != a["workload"]


def test_num_blocks_too_small_is_refused(bench: ModuleType) -> None:
    with pytest.raises(ValueError, match="longest request"):
        bench.main(SMALL + ["--allocator", "plain", "--num-blocks", "2"])


def test_both_allocators_and_ratios(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "both.json"
    bench.main(SMALL + ["--output-json", str(out)])
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["plain", "smart"]
    plain, smart = report["results"]["plain"], report["results"]["smart"]
    _check_result(plain, 120)
    _check_result(smart, 120)
    assert plain["num_blocks"] == smart["num_blocks"]
    # the predictor learned from finished requests and was consulted
    assert smart["predicted_requests"] > 0
    assert 0 <= smart["prediction_coverage"] <= 1
    ratios = report["ratios"]
    for field in bench.RATIO_FIELDS:
        assert field in ratios
    assert ratios["total_steps"] == pytest.approx(smart["total_steps"] /
                                                  plain["total_steps"])


def test_default_workload_meets_the_smart_allocator_target(
        bench: ModuleType) -> None:
    """The issue's target, on the deterministic default simulation: the
    smart allocator at least halves recomputed tokens for at most 5% more
    steps (counts of a seeded simulation, not timings)."""
    ratios = bench.main([])["ratios"]
    assert ratios["recomputed_tokens"] <= 0.5
    assert ratios["total_steps"] <= 1.05
