"""benchmarks/benchmark_throughput.py on CPU with a tiny random Llama."""

import importlib.util
import json
import random
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "benchmark_throughput.py"

THROUGHPUT_RE = re.compile(
    r"^Throughput: \d+\.\d{2} requests/s, "
    r"\d+\.\d{2} total tokens/s, "
    r"\d+\.\d{2} output tokens/s$", re.MULTILINE)
JSON_FIELDS = ("elapsed_time", "num_requests", "total_num_tokens",
               "total_output_tokens", "requests_per_second",
               "tokens_per_second", "output_tokens_per_second", "backend",
               "device", "torch", "transformers", "vllm")

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _vllm_missing() -> str | None:
    try:
        from vllm import LLM, SamplingParams  # noqa: F401
        from vllm.engine.arg_utils import EngineArgs  # noqa: F401
    except ImportError as e:
        return f"vllm.LLM / EngineArgs not importable yet ({e})"
    return None


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_throughput",
                                                  SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    return model_dir


def _run(bench: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path,
         args: list[str]) -> tuple[dict, str]:
    out_json = tmp_path / "result.json"
    stats = bench.main(args + ["--output-json", str(out_json)])
    stdout = capsys.readouterr().out
    assert THROUGHPUT_RE.search(stdout), stdout
    written = json.loads(out_json.read_text())
    for field in JSON_FIELDS:
        assert field in written, field
    assert written["elapsed_time"] > 0
    assert written == pytest.approx(stats)
    return written, stdout


def test_w1_dataset(bench: ModuleType) -> None:
    requests = bench.w1_requests()
    assert len(requests) == 256
    assert sum(len(r.prompt_token_ids) for r in requests) == 142_827
    assert sum(r.max_tokens for r in requests) == 133_966
    assert {(r.temperature, r.top_p) for r in requests} == {(0.6, 1.0)}
    # nano-vllm's bench.py draws from the global generator after seed(0).
    state = random.getstate()
    try:
        random.seed(0)
        first = [
            random.randint(0, 10000) for _ in range(random.randint(100, 1024))
        ]
    finally:
        random.setstate(state)
    assert requests[0].prompt_token_ids == first


def test_random_dataset(bench: ModuleType) -> None:
    fixed = bench.random_requests(5, 16, 4, seed=3, id_limit=100)
    assert [len(r.prompt_token_ids) for r in fixed] == [16] * 5
    assert [r.max_tokens for r in fixed] == [4] * 5
    assert all(0 <= t < 100 for r in fixed for t in r.prompt_token_ids)
    assert fixed == bench.random_requests(5, 16, 4, seed=3, id_limit=100)
    varied = bench.random_requests(200, 100, 10, range_ratio=0.5)
    assert {len(r.prompt_token_ids) for r in varied} <= set(range(50, 151))
    assert len({len(r.prompt_token_ids) for r in varied}) > 10
    assert {r.max_tokens for r in varied} <= set(range(5, 16))


def test_has_tokenizer(bench: ModuleType, tiny_model: Path) -> None:
    assert not bench.has_tokenizer(str(tiny_model))
    (tiny_model / "tokenizer.json").write_text("{}")
    assert bench.has_tokenizer(str(tiny_model))


def test_hf_backend_static(bench: ModuleType, tiny_model: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    stats, stdout = _run(bench, capsys, tmp_path, [
        "--backend", "hf", "--model",
        str(tiny_model), "--load-format", "dummy", "--num-prompts", "4",
        "--input-len", "8", "--output-len", "4", "--hf-batching", "static"
    ])
    assert stats["backend"] == "hf"
    assert stats["num_requests"] == 4
    assert stats["total_output_tokens"] == 16
    assert stats["total_num_tokens"] == 4 * 8 + 16
    assert "Total num output tokens:  16" in stdout


def test_hf_backend_static_ragged(bench: ModuleType, tiny_model: Path,
                                  tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Batches run to their longest request; only max_tokens are counted.
    stats, _ = _run(bench, capsys, tmp_path, [
        "--backend", "hf", "--model",
        str(tiny_model), "--load-format", "dummy", "--num-prompts", "5",
        "--input-len", "8", "--output-len", "6", "--random-range-ratio", "0.5",
        "--hf-max-batch-size", "2", "--hf-batching", "static", "--n", "2"
    ])
    requests = bench.random_requests(5,
                                     8,
                                     6,
                                     range_ratio=0.5,
                                     seed=0,
                                     id_limit=512)
    assert stats["total_output_tokens"] == 2 * sum(r.max_tokens
                                                   for r in requests)
    assert stats["total_num_tokens"] == (
        stats["total_output_tokens"] +
        sum(len(r.prompt_token_ids) for r in requests))


def test_hf_backend_continuous(bench: ModuleType, tiny_model: Path,
                               tmp_path: Path,
                               capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    cache = pytest.importorskip(
        "transformers.generation.continuous_batching.cache")
    if not hasattr(cache, "PagedAttentionMemoryHandler"):
        pytest.skip("transformers' continuous batching API changed")
    # On CPU transformers sizes its cache from psutil; give it 1 GiB.
    monkeypatch.setattr(cache.PagedAttentionMemoryHandler,
                        "get_available_memory", lambda self: 1 << 30)
    backend_hf = bench._import_sibling("backend_hf")
    monkeypatch.setattr(backend_hf, "choose_batching",
                        lambda model, batching: "continuous")
    stats, stdout = _run(bench, capsys, tmp_path, [
        "--backend", "hf", "--model",
        str(tiny_model), "--load-format", "dummy", "--num-prompts", "6",
        "--input-len", "8", "--output-len", "6", "--random-range-ratio", "0.5",
        "--n", "2"
    ])
    requests = bench.random_requests(6,
                                     8,
                                     6,
                                     range_ratio=0.5,
                                     seed=0,
                                     id_limit=512)
    assert "continuous batching" in stdout
    assert stats["total_output_tokens"] == 2 * sum(r.max_tokens
                                                   for r in requests)


@pytest.mark.skipif(_vllm_missing() is not None, reason=str(_vllm_missing()))
def test_vllm_backend(bench: ModuleType, tiny_model: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    stats, _ = _run(bench, capsys, tmp_path, [
        "--backend", "vllm", "--model",
        str(tiny_model), "--load-format", "dummy", "--dtype", "float32",
        "--max-model-len", "64", "--enforce-eager", "--num-prompts", "4",
        "--input-len", "8", "--output-len", "4", "--num-warmup-prompts", "1",
        "--num-gpu-blocks-override", "32"
    ])
    assert stats["backend"] == "vllm"
    assert stats["num_requests"] == 4
    assert stats["total_output_tokens"] == 16
    assert stats["total_num_tokens"] == 4 * 8 + 16
