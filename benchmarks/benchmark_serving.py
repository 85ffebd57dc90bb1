"""Benchmark online serving, vLLM-style: streamed requests to a running
OpenAI-compatible server (workload W3).

    vllm serve MODEL --port 8000 &
    python benchmarks/benchmark_serving.py --backend vllm --model MODEL \\
        --dataset-name random --random-input-len 512 --random-output-len 128 \\
        --num-prompts 1000 --request-rate inf --max-concurrency 64 --ignore-eos

Every request streams (``"stream": true`` with
``stream_options.include_usage``) and is timed on the client:

- TTFT: from sending the request to the first chunk whose text is not empty
  (with ``--count-empty-chunks``, the first completions chunk with a choice).
- ITL: the time between two consecutive chunks that carry text, one value per
  chunk. A chunk that carries several tokens gives one ITL, not one per token,
  so with such chunks the mean ITL is larger than the TPOT.
- TPOT: ``(E2E - TTFT) / (output tokens - 1)``, for requests of more than one
  output token.
- E2E: from sending the request to the end of the stream.
- Output tokens: ``completion_tokens`` of the final usage chunk; without one,
  the generated text re-encoded with ``--tokenizer``.

A request fails on an HTTP error status, an error event in the stream, a
transport error, or a stream without any text; failures are counted and
reported, they do not stop the run.

Random dataset: for each prompt, ids drawn uniformly from the tokenizer's
vocabulary (special tokens excluded) are decoded to text; the text is
re-encoded and cut or extended with more random ids, a few rounds, until it
encodes to exactly the asked-for number of tokens (without special tokens).
The text is sent. Input tokens are counted from the server's usage
(``prompt_tokens``, which includes a BOS token the server adds) when it
reports them, else from the dataset.
"""
import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np

from benchmark_utils import random_lengths

# A request may wait a long time at a high request rate.
REQUEST_TIMEOUT_S = 6 * 60 * 60
# Rounds of decode / re-encode for a random prompt of an exact length.
PROMPT_LEN_ROUNDS = 10
LATENCIES = ("ttft", "tpot", "itl", "e2el")
LATENCY_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass
class Request:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    generated_text: str = ""
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # E2E, seconds
    itl: list[float] = field(default_factory=list)  # seconds


# ------------------------------------------------------------- datasets --- #


def random_token_prompt(tokenizer: Any, length: int, rng: random.Random,
                        candidates: Sequence[int]) -> tuple[str, int]:
    """Text of ``length`` tokens (as ``tokenizer`` encodes it without special
    tokens) from random ids; returns (text, its token count)."""
    ids = [rng.choice(candidates) for _ in range(length)]
    text = tokenizer.decode(ids)
    for _ in range(PROMPT_LEN_ROUNDS):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == length:
            break
        if len(ids) > length:
            ids = ids[:length]
        else:
            ids += [rng.choice(candidates) for _ in range(length - len(ids))]
        text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def prompt_token_ids(tokenizer: Any) -> list[int]:
    """The ids random prompts are drawn from: not special, and decoding on
    their own to text without U+FFFD (a lone byte of a UTF-8 sequence would
    re-encode to other tokens)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    return [i for i, text in zip(ids, texts) if text and "\ufffd" not in text]


def sample_random_requests(tokenizer: Any,
                           num_prompts: int,
                           input_len: int,
                           output_len: int,
                           range_ratio: float = 0.0,
                           seed: int = 0) -> list[Request]:
    """``num_prompts`` random prompts; input and output lengths uniform in
    ``[len * (1 - range_ratio), len * (1 + range_ratio)]``."""
    rng = random.Random(seed)
    candidates = prompt_token_ids(tokenizer)
    requests = []
    for n_in, n_out in random_lengths(num_prompts, input_len, output_len,
                                      range_ratio, rng):
        text, prompt_len = random_token_prompt(tokenizer, n_in, rng, candidates)
        requests.append(Request(text, prompt_len, n_out))
    return requests


# ------------------------------------------------------------- requests --- #


def is_chat(args: argparse.Namespace) -> bool:
    return args.endpoint.rstrip("/").endswith("chat/completions")


def request_body(args: argparse.Namespace, request: Request) -> dict:
    body: dict[str, Any] = {
        "model": args.served_model_name or args.model,
        "temperature": args.temperature,
        "max_tokens": request.output_len,
        "stream": True,
        "stream_options": {
            "include_usage": True
        },
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if is_chat(args):
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def chunk_text(chunk: dict, chat: bool) -> str:
    """The text of one streamed chunk ("" for the usage chunk)."""
    text = ""
    for choice in chunk.get("choices") or []:
        if chat:
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def send_request(client: httpx.AsyncClient, args: argparse.Namespace,
                       request: Request, tokenizer: Any) -> RequestResult:
    """One streamed request, timed."""
    chat = is_chat(args)
    result = RequestResult(prompt_len=request.prompt_len)
    texts: list[str] = []
    usage: dict | None = None
    start = time.perf_counter()
    last = start
    started = False  # an output chunk has come
    try:
        async with client.stream("POST",
                                 args.endpoint,
                                 json=request_body(args, request)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:500]}"
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {chunk['error']}"
                    return result
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text = chunk_text(chunk, chat)
                if not (text or
                        (args.count_empty_chunks and chunk.get("choices"))):
                    continue
                if not started:
                    result.ttft = now - start
                    started = True
                else:
                    result.itl.append(now - last)
                last = now
                texts.append(text)
        result.latency = time.perf_counter() - start
    except Exception as err:  # counted as a failure, the run goes on
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.generated_text = "".join(texts)
    if not started:
        result.error = "the stream carried no text"
        return result
    if usage and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
    else:
        result.output_tokens = len(
            tokenizer.encode(result.generated_text, add_special_tokens=False))
    if usage and usage.get("prompt_tokens") is not None:
        result.prompt_len = int(usage["prompt_tokens"])
    result.success = True
    return result


def arrival_gaps(num: int, rate: float, burstiness: float,
                 seed: int) -> list[float]:
    """Seconds to wait before each request: 0 for an infinite rate, else
    gamma-distributed gaps of mean 1/rate (Poisson arrivals when
    burstiness is 1)."""
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(num)]


# -------------------------------------------------------------- metrics --- #


def _stats(values: Sequence[float]) -> dict[str, float]:
    """mean, median, std and p99 in ms (0 for no values)."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    return {
        "mean": float(np.mean(ms)),
        "median": float(np.median(ms)),
        "std": float(np.std(ms)),
        "p99": float(np.percentile(ms, 99)),
    }


def calculate_metrics(results: list[RequestResult],
                      duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    per_request = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                 if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    for name in LATENCIES:
        for stat, value in _stats(per_request[name]).items():
            metrics[f"{stat}_{name}_ms"] = value
    return metrics


def print_report(metrics: dict[str, Any]) -> None:
    width = 50

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{label:<40}{text:<10}")

    print(" Serving Benchmark Result ".center(width, "="))
    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    if metrics["max_concurrency"] is not None:
        row("Maximum request concurrency:", metrics["max_concurrency"])
    row("Benchmark duration (s):", metrics["duration"])
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", metrics["request_throughput"])
    row("Output token throughput (tok/s):", metrics["output_throughput"])
    row("Total token throughput (tok/s):", metrics["total_token_throughput"])
    for name in LATENCIES:
        title, short = LATENCY_TITLES[name]
        print(title.center(width, "-"))
        row(f"Mean {short} (ms):", metrics[f"mean_{name}_ms"])
        row(f"Median {short} (ms):", metrics[f"median_{name}_ms"])
        row(f"P99 {short} (ms):", metrics[f"p99_{name}_ms"])
    print("=" * width)


# ------------------------------------------------------------ benchmark --- #


def get_tokenizer(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(args.tokenizer or args.model,
                                         trust_remote_code=False)


async def benchmark(client: httpx.AsyncClient,
                    args: argparse.Namespace,
                    tokenizer: Any = None) -> dict[str, Any]:
    """Run the benchmark through ``client`` (its base URL is the server's),
    print the report, write ``--output-json``; return the metrics."""
    if args.backend == "openai-chat" and not is_chat(args):
        raise ValueError("--backend openai-chat needs --endpoint "
                         "/v1/chat/completions")
    if args.count_empty_chunks and is_chat(args):
        raise ValueError("--count-empty-chunks is for /v1/completions")
    if tokenizer is None:
        tokenizer = get_tokenizer(args)
    requests = sample_random_requests(tokenizer, args.num_prompts,
                                      args.random_input_len,
                                      args.random_output_len,
                                      args.random_range_ratio, args.seed)

    print("Starting initial single prompt test run...")
    test = await send_request(client, args, requests[0], tokenizer)
    if not test.success:
        raise ValueError("Initial test run failed - check the server, "
                         f"--model and --endpoint. Error: {test.error}")
    print("Initial test run completed. Starting main benchmark run...")
    print(f"Traffic request rate: {args.request_rate}, burstiness: "
          f"{args.burstiness}, max concurrency: {args.max_concurrency}")

    gaps = arrival_gaps(len(requests), args.request_rate, args.burstiness,
                        args.seed)
    limit = (asyncio.Semaphore(args.max_concurrency)
             if args.max_concurrency else None)
    pbar = None
    if not args.disable_tqdm:
        from tqdm import tqdm
        pbar = tqdm(total=len(requests))

    async def limited(request: Request) -> RequestResult:
        if limit is None:
            result = await send_request(client, args, request, tokenizer)
        else:
            async with limit:
                result = await send_request(client, args, request, tokenizer)
        if pbar is not None:
            pbar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for request, gap in zip(requests, gaps):
        if gap > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(limited(request)))
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    if pbar is not None:
        pbar.close()

    metrics = calculate_metrics(results, duration)
    rate = args.request_rate
    metrics.update({
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "endpoint": args.endpoint,
        "model_id": args.model,
        "tokenizer_id": args.tokenizer or args.model,
        "dataset_name": args.dataset_name,
        "num_prompts": args.num_prompts,
        "request_rate": rate if rate != float("inf") else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "ignore_eos": args.ignore_eos,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "e2els": [r.latency for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    })
    print_report(metrics)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"Wrote {args.output_json}")
    return metrics


# ------------------------------------------------------------------ CLI --- #


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the online serving throughput and latency "
        "of an OpenAI-compatible server.")
    parser.add_argument("--backend",
                        choices=["vllm", "openai", "openai-chat"],
                        default="vllm",
                        help="all speak the OpenAI API; the endpoint decides "
                        "between completions and chat")
    parser.add_argument("--base-url",
                        default=None,
                        help="server URL (default http://HOST:PORT)")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint",
                        default="/v1/completions",
                        help="/v1/completions or /v1/chat/completions")
    parser.add_argument("--model",
                        required=True,
                        help="the served model name (and the default "
                        "tokenizer)")
    parser.add_argument("--served-model-name",
                        default=None,
                        help="the name sent in requests, if not --model")
    parser.add_argument("--tokenizer",
                        default=None,
                        help="builds the prompts and counts output tokens "
                        "when the server sends no usage (default: --model)")
    parser.add_argument("--dataset-name", choices=["random"], default="random")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--random-input-len", type=int, default=1024)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio",
                        type=float,
                        default=0.0,
                        help="lengths uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--request-rate",
                        type=float,
                        default=float("inf"),
                        help="requests per second; inf sends them all at "
                        "once, otherwise Poisson arrivals of this mean rate")
    parser.add_argument("--burstiness",
                        type=float,
                        default=1.0,
                        help="gamma shape of the arrival gaps (1: Poisson)")
    parser.add_argument("--max-concurrency",
                        type=int,
                        default=None,
                        help="at most this many requests in flight")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos",
                        action="store_true",
                        help="generate exactly max_tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--count-empty-chunks",
                        action="store_true",
                        help="(not vLLM's) time every completions chunk with "
                        "a choice, even one with empty text: for a tokenizer "
                        "that cannot decode the model's ids (dummy weights "
                        "with a stand-in tokenizer)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = make_parser().parse_args(argv)
    if args.request_rate <= 0:
        raise SystemExit("--request-rate must be positive")
    if args.burstiness <= 0:
        raise SystemExit("--burstiness must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("--max-concurrency must be at least 1")
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be at least 1")
    return args


def base_url(args: argparse.Namespace) -> str:
    return args.base_url or f"http://{args.host}:{args.port}"


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    # No connection cap: --max-concurrency is the only limit.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url(args),
                                 timeout=REQUEST_TIMEOUT_S,
                                 limits=limits) as client:
        return await benchmark(client, args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    print(args)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    main(sys.argv[1:])
