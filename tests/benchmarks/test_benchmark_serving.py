"""benchmarks/benchmark_serving.py against the OpenAI server's ASGI app on
stories260K (no socket; the body streams chunk by chunk, as over HTTP)."""
import asyncio
import importlib.util
import json
import math
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.entrypoints.openai.test_server import server_args

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "benchmark_serving.py"

NUM_PROMPTS = 6
INPUT_LEN = 12
OUTPUT_LEN = 5
LATENCIES = ("ttft", "tpot", "itl", "e2el")
SUMMARY_FIELDS = ("duration", "completed", "failed", "total_input_tokens",
                  "total_output_tokens", "request_throughput",
                  "output_throughput", "total_token_throughput")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_serving", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine(stories260k_path: Path) -> Iterator[Any]:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.engine.async_llm_engine import AsyncLLMEngine
    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=str(stories260k_path),
                   device="cpu",
                   disable_log_stats=True))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def app(engine: Any, stories260k_path: Path) -> Any:
    from vllm.entrypoints.openai.api_server import build_app
    return build_app(engine, server_args(stories260k_path))


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """httpx.ASGITransport runs the app to the end and returns the whole
    body at once, which would make every TTFT equal to the E2E latency.
    This transport passes each body message on as the app sends it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def handle_async_request(self,
                                   request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        url = request.url
        scope = {
            "type": "http",
            "asgi": {
                "version": "3.0"
            },
            "http_version": "1.1",
            "method": request.method,
            "scheme": url.scheme,
            "path": url.path,
            "raw_path": url.raw_path.split(b"?")[0],
            "query_string": url.query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "server": (url.host, url.port or 80),
            "client": ("127.0.0.1", 50000),
        }
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        started: asyncio.Future[dict] = (
            asyncio.get_running_loop().create_future())
        body_sent = False
        closed = asyncio.Event()

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body}
            await closed.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                started.set_result(message)
            elif message["type"] == "http.response.body":
                await chunks.put(message.get("body", b""))

        async def run_app() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as err:
                if not started.done():
                    started.set_exception(err)
            finally:
                if not started.done():
                    started.set_exception(RuntimeError("no response"))
                await chunks.put(None)

        task = asyncio.create_task(run_app())
        start = await started

        class Stream(httpx.AsyncByteStream):

            async def __aiter__(self) -> AsyncIterator[bytes]:
                while (chunk := await chunks.get()) is not None:
                    yield chunk

            async def aclose(self) -> None:
                closed.set()
                await asyncio.wait([task], timeout=10)
                task.cancel()

        return httpx.Response(start["status"],
                              headers=start.get("headers", []),
                              stream=Stream())


def run(bench: ModuleType, app: Any, argv: list[str]) -> dict:
    args = bench.parse_args(argv)

    async def go() -> dict:
        transport = StreamingASGITransport(app)
        async with httpx.AsyncClient(transport=transport,
                                     base_url="http://test") as client:
            return await bench.benchmark(client, args)

    return asyncio.run(go())


def check(metrics: dict) -> None:
    assert metrics["completed"] == NUM_PROMPTS, metrics["errors"]
    assert metrics["failed"] == 0
    assert metrics["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert metrics["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    # Each prompt is INPUT_LEN tokens of text; the server adds BOS.
    assert metrics["input_lens"] == [INPUT_LEN + 1] * NUM_PROMPTS
    assert metrics["total_input_tokens"] == NUM_PROMPTS * (INPUT_LEN + 1)
    for name in SUMMARY_FIELDS:
        assert math.isfinite(metrics[name]), name
    assert metrics["duration"] > 0
    for name in LATENCIES:
        values = [metrics[f"{s}_{name}_ms"] for s in ("mean", "median", "p99")]
        assert all(math.isfinite(v) and v > 0 for v in values), (name, values)
        assert metrics[f"p99_{name}_ms"] >= metrics[f"median_{name}_ms"]
    assert metrics["mean_ttft_ms"] <= metrics["mean_e2el_ms"]
    for ttft, e2el, itls in zip(metrics["ttfts"], metrics["e2els"],
                                metrics["itls"]):
        assert 0 < ttft < e2el
        assert len(itls) >= 1 and all(x > 0 for x in itls)
        assert ttft + sum(itls) <= e2el
    assert all(text for text in metrics["generated_texts"])
    assert metrics["errors"] == [""] * NUM_PROMPTS


def test_defaults_match_vllm(bench: ModuleType) -> None:
    args = bench.parse_args(["--model", "m"])
    assert args.backend == "vllm"
    assert args.endpoint == "/v1/completions"
    assert bench.base_url(args) == "http://localhost:8000"
    assert args.dataset_name == "random"
    assert args.num_prompts == 1000
    assert args.random_input_len == 1024
    assert args.random_output_len == 128
    assert args.request_rate == float("inf")
    assert args.max_concurrency is None
    assert not args.ignore_eos
    assert args.tokenizer is None
    assert not args.count_empty_chunks
    with pytest.raises(SystemExit):
        bench.parse_args([])  # --model is required
    args = bench.parse_args(["--model", "m", "--base-url", "http://h:1"])
    assert bench.base_url(args) == "http://h:1"


def test_arrivals_are_seeded_poisson(bench: ModuleType) -> None:
    assert bench.arrival_gaps(3, float("inf"), 1.0, 0) == [0.0] * 3
    gaps = bench.arrival_gaps(4000, 50.0, 1.0, 7)
    assert gaps == bench.arrival_gaps(4000, 50.0, 1.0, 7)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.1)


def test_benchmark_against_the_server(
        bench: ModuleType, app: Any, stories260k_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    common = [
        "--model",
        str(stories260k_path), "--num-prompts",
        str(NUM_PROMPTS), "--random-input-len",
        str(INPUT_LEN), "--random-output-len",
        str(OUTPUT_LEN), "--ignore-eos", "--disable-tqdm"
    ]
    out = tmp_path / "serving.json"
    metrics = run(
        bench, app,
        common + ["--max-concurrency", "2", "--output-json",
                  str(out)])
    check(metrics)
    assert metrics["max_concurrency"] == 2
    assert metrics["request_rate"] == "inf"
    stdout = capsys.readouterr().out
    for line in ("Successful requests:", "Benchmark duration (s):",
                 "Output token throughput (tok/s):", "Mean TTFT (ms):",
                 "Median TPOT (ms):", "P99 ITL (ms):", "P99 E2EL (ms):"):
        assert line in stdout, line
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(metrics))

    # A finite, seeded Poisson rate.
    metrics = run(bench, app, common + ["--request-rate", "40", "--seed", "3"])
    check(metrics)
    assert metrics["request_rate"] == 40.0

    # Timing every chunk with a choice: the same counts here (each chunk of
    # stories260K's stream carries text).
    check(run(bench, app, common + ["--count-empty-chunks"]))


def test_http_errors_are_counted(bench: ModuleType, app: Any,
                                 stories260k_path: Path) -> None:
    args = bench.parse_args([
        "--model",
        str(stories260k_path), "--served-model-name", "no-such-model",
        "--num-prompts", "2", "--random-input-len", "4", "--random-output-len",
        "4", "--disable-tqdm"
    ])
    tokenizer = bench.get_tokenizer(args)
    request = bench.sample_random_requests(tokenizer, 1, 4, 4)[0]

    async def go() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport,
                                     base_url="http://test") as client:
            result = await bench.send_request(client, args, request, tokenizer)
            with pytest.raises(ValueError, match="Initial test run failed"):
                await bench.benchmark(client, args, tokenizer)
            return result

    result = asyncio.run(go())
    assert not result.success
    assert result.error.startswith("HTTP 404"), result.error
    results = [
        result,
        bench.RequestResult(success=True,
                            prompt_len=5,
                            output_tokens=3,
                            ttft=0.1,
                            latency=0.3,
                            itl=[0.1, 0.1])
    ]
    metrics = bench.calculate_metrics(results, 1.0)
    assert metrics["completed"] == 1 and metrics["failed"] == 1
    assert metrics["total_input_tokens"] == 5
    assert metrics["total_output_tokens"] == 3
    assert metrics["mean_tpot_ms"] == pytest.approx(100.0)
