"""Micro-benchmark of one sampling step: ``SamplingMetadata.prepare`` plus
``Sampler`` on random logits, for a few mixes of sampling parameters.

    python benchmarks/kernels/benchmark_sampler.py
    python benchmarks/kernels/benchmark_sampler.py --batch-size 256 \\
        --vocab-size 151936 --output-json sampler.json

Defaults: batch 256, bf16 logits of Qwen3's vocabulary (151,936) on CUDA;
without a GPU, float32 logits of a 32,000-token vocabulary on the CPU. Each
row has a prompt of ``--prompt-len`` and an output of ``--output-len``
random token ids (what the penalties read).

A step is timed from before ``prepare`` (host work: turning the requests'
parameters and token histories into tensors) to after the sampler's last
kernel, then every output grows by one token, as in decoding. ``prepare``
gets a ``TokenHistoryCache``, as the engine's should (the "no history cache"
row converts every history at every step). Steps are timed with CUDA events (on CPU: ``time.perf_counter``) after warm-up
steps; the table shows the median and the 10th / 90th percentiles of the
repeats, and the host time of ``prepare`` alone. The engine runs ``prepare``
while the GPU still computes the model's forward pass, so on a GPU the host
part is partly hidden in a real step.
"""
import argparse
import importlib
import json
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm.model_executor.layers.sampler import Sampler
from vllm.model_executor.sampling_metadata import (SamplingMetadata,
                                                   TokenHistoryCache)
from vllm.sampling_params import SamplingParams

# One seeded row in this many in the all-features mix.
SEEDED_EVERY = 16


def greedy(row: int, vocab_size: int) -> SamplingParams:
    return SamplingParams(temperature=0.0)


def top_k_top_p(row: int, vocab_size: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_k=50, top_p=0.95)


def top_p_only(row: int, vocab_size: int) -> SamplingParams:
    # No top_k: the nucleus needs a full sort of the vocabulary.
    return SamplingParams(temperature=0.8, top_p=0.95)


def all_features(row: int, vocab_size: int) -> SamplingParams:
    rng = random.Random(row)
    return SamplingParams(
        temperature=0.8,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.1,
        logit_bias={rng.randrange(vocab_size): 2.0
                    for _ in range(8)},
        min_p=0.05,
        top_n_sigma=1.0,
        logprobs=5,
        seed=row if row % SEEDED_EVERY == 0 else None,
    )


# name -> (the parameters of row i, whether prepare gets a history cache)
CONFIGS: dict[str, tuple[Callable[[int, int], SamplingParams], bool]] = {
    "greedy": (greedy, True),
    "temperature + top_k + top_p": (top_k_top_p, True),
    "temperature + top_p (full sort)": (top_p_only, True),
    "all features": (all_features, True),
    "all features, no history cache": (all_features, False),
}


def environment() -> dict[str, str]:
    """Device name, library versions and commit, for the report."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
    info = {"device": device, "torch": torch.__version__}
    for name in ("triton", "vllm"):
        try:
            module = importlib.import_module(name)
            info[name] = str(getattr(module, "__version__", "unknown"))
        except ImportError:
            info[name] = "not installed"
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_config(make_params: Callable[[int, int], SamplingParams],
                 use_cache: bool, args: argparse.Namespace,
                 device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    batch, vocab = args.batch_size, args.vocab_size
    params = [make_params(row, vocab) for row in range(batch)]
    # The engine keeps one generator per seeded request across steps.
    generators: list[torch.Generator | None] = [
        None if p.seed is None else torch.Generator(device).manual_seed(p.seed)
        for p in params
    ]
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)]
               for _ in range(batch)]
    outputs = [[rng.randrange(vocab) for _ in range(args.output_len)]
               for _ in range(batch)]
    logits = (torch.randn(batch, vocab, device=device) * 3).to(dtype)
    sampler = Sampler()
    cache = TokenHistoryCache() if use_cache else None

    def prepare() -> SamplingMetadata:
        return SamplingMetadata.prepare(params,
                                        generators,
                                        outputs,
                                        prompts,
                                        vocab_size=vocab,
                                        device=device,
                                        history_cache=cache)

    prepare_ms: list[float] = []

    def step() -> torch.Tensor:
        t0 = time.perf_counter()
        metadata = prepare()
        # Host time of prepare alone (its copies are asynchronous).
        prepare_ms.append((time.perf_counter() - t0) * 1e3)
        return sampler(logits, metadata).sampled_token_ids

    def next_tokens() -> None:
        for output in outputs:
            output.append(rng.randrange(vocab))

    use_cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
        next_tokens()
    if use_cuda:
        torch.cuda.synchronize()
    prepare_ms.clear()

    step_ms: list[float] = []
    for _ in range(args.repeats):
        if use_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            step_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
        next_tokens()
    return {
        "median_ms": statistics.median(step_ms),
        "p10_ms": percentile(step_ms, 0.1),
        "p90_ms": percentile(step_ms, 0.9),
        "prepare_host_median_ms": statistics.median(prepare_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--vocab-size",
                        type=int,
                        default=None,
                        help="default: 151936 on CUDA, 32000 on CPU")
    parser.add_argument("--dtype",
                        choices=["bfloat16", "float16", "float32"],
                        default=None,
                        help="logits dtype; default: bfloat16 on CUDA, "
                        "float32 on CPU")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--configs",
                        nargs="+",
                        choices=list(CONFIGS),
                        default=list(CONFIGS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--output-json", type=str, default=None)
    args = parser.parse_args()

    device = torch.device(args.device
                          or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.vocab_size is None:
        args.vocab_size = 151_936 if on_gpu else 32_000
    if args.dtype is None:
        args.dtype = "bfloat16" if on_gpu else "float32"
    if args.warmup is None:
        args.warmup = 10 if on_gpu else 2
    if args.repeats is None:
        args.repeats = 50 if on_gpu else 5
    dtype = getattr(torch, args.dtype)
    if "greedy" not in args.configs:
        args.configs.insert(0, "greedy")  # the reference of the ratios

    env = environment()
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    print(f"batch {args.batch_size}, vocab {args.vocab_size}, {args.dtype} "
          f"logits on {device}, prompt {args.prompt_len} + output "
          f"{args.output_len} tokens per row, {args.repeats} repeats after "
          f"{args.warmup} warm-up steps")

    results = {
        name: bench_config(*CONFIGS[name], args, device, dtype)
        for name in args.configs
    }
    base = results["greedy"]["median_ms"]
    for result in results.values():
        result["vs_greedy"] = result["median_ms"] / base

    header = (f"{'config':<32}{'median ms':>11}{'p10 ms':>9}{'p90 ms':>9}"
              f"{'prepare ms':>12}{'x greedy':>10}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<32}{r['median_ms']:>11.3f}{r['p10_ms']:>9.3f}"
              f"{r['p90_ms']:>9.3f}{r['prepare_host_median_ms']:>12.3f}"
              f"{r['vs_greedy']:>10.2f}")
    if "all features" in results:
        print("all features / greedy: "
              f"{results['all features']['vs_greedy']:.2f}x")

    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {
                    "environment": env,
                    "args": vars(args),
                    "results": results
                },
                f,
                indent=2)


if __name__ == "__main__":
    main()
