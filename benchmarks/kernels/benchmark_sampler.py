"""Micro-benchmark of one sampling step as the engine runs it:
``SamplingState.prepare``, ``Sampler`` and ``SamplerOutput.to_host`` on
random logits, for a few mixes of sampling parameters.

    python benchmarks/kernels/benchmark_sampler.py
    python benchmarks/kernels/benchmark_sampler.py --batch-size 256 \\
        --vocab-size 151936 --output-json sampler.json

Defaults: batch 256, bf16 logits of Qwen3's vocabulary (151,936) on CUDA;
without a GPU, float32 logits of a 32,000-token vocabulary on the CPU. Each
row has a prompt of ``--prompt-len`` and an output of ``--output-len``
random token ids (what the penalties read).

A step is timed from before ``prepare`` (host work: the parameters and
token histories that changed, as tensors) to after the sampled ids reached
the host (the step's one device-to-host copy); then every output grows by
its sampled token, as in decoding, and ``--replace-per-step`` sequences
finish and are replaced by new ones (0: the batch never changes). One
``SamplingState`` lives across all the steps of a config, as in the engine;
the "stateless prepare" row builds every tensor at every step with
``SamplingMetadata.prepare`` instead. The ``Sampler`` replays its launches
as CUDA graphs when a step repeats the one before (``LaunchGraphs``), as
in the engine without ``enforce_eager``; the "no CUDA graphs" row launches
them at every step. Steps are timed with CUDA events (on
CPU: ``time.perf_counter``) after warm-up steps, the configs taking turns
(``--rounds``: the host's speed drifts by tens of percent within a minute,
and the ratios to greedy should not); the table shows the median and the
10th / 90th percentiles of the repeats, the host time of ``prepare``
alone, that of the ``Sampler`` call (on a GPU: CUDA events around its
launches, the device time of its kernels when the host keeps ahead of
them), the host time of that call ("launch": on a GPU, its launches) and
of ``to_host`` (copies, wait, lists). The engine runs ``prepare`` while the
GPU still computes the model's forward pass, so on a GPU the host part is
partly hidden in a real step.
"""
import argparse
import dataclasses
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
from vllm.model_executor.sampling_state import SamplingState
from vllm.sampling_params import SamplingParams

# One seeded row in this many in the all-features mix.
SEEDED_EVERY = 16


def greedy(row: int, vocab_size: int) -> SamplingParams:
    return SamplingParams(temperature=0.0)


def top_k_top_p(row: int, vocab_size: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_k=50, top_p=0.95)


def top_p_only(row: int, vocab_size: int) -> SamplingParams:
    # No top_k: the nucleus is normalised over the whole vocabulary.
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


def all_features_top_k_top_p(row: int, vocab_size: int) -> SamplingParams:
    # Every feature at once: the draw then uses the sorted largest logits.
    return dataclasses.replace(all_features(row, vocab_size),
                               top_k=50,
                               top_p=0.95)


# name -> (the parameters of row i, whether the engine's SamplingState
# keeps them between steps, whether the Sampler may replay its launches as
# CUDA graphs, as in the engine without enforce_eager)
CONFIGS: dict[str, tuple[Callable[[int, int], SamplingParams], bool, bool]] = {
    "greedy": (greedy, True, True),
    "temperature + top_k + top_p": (top_k_top_p, True, True),
    "temperature + top_p (no top_k)": (top_p_only, True, True),
    "all features": (all_features, True, True),
    "all features, no CUDA graphs": (all_features, True, False),
    "all features, stateless prepare": (all_features, False, True),
    "all features + top_k + top_p": (all_features_top_k_top_p, True, True),
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


class ConfigBench:
    """One config's sequences, state and timings: ``measure`` runs timed
    steps, and may be called several times, in turn with other configs
    (``--rounds``), so that each sees the same host speed."""

    def __init__(self, make_params: Callable[[int, int], SamplingParams],
                 keep_state: bool, cuda_graphs: bool, args: argparse.Namespace,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.args, self.device = args, device
        self.make_params, self.keep_state = make_params, keep_state
        self.rng = random.Random(0)
        self.next_id = 0
        self.seqs = [self.new_sequence() for _ in range(args.batch_size)]
        self.logits = (
            torch.randn(args.batch_size, args.vocab_size, device=device) *
            3).to(dtype)
        self.sampler = Sampler(cuda_graphs=cuda_graphs)
        self.state = SamplingState(device)
        self.cache = TokenHistoryCache()
        self.use_cuda = device.type == "cuda"
        # Events record on this stream, named: without it each record asks
        # which device is current, host time that would count in the step.
        self.stream = torch.cuda.current_stream(
            device) if self.use_cuda else None
        self.step_ms: list[float] = []
        self.prepare_ms: list[float] = []
        # The Sampler call alone: on CUDA, events around its launches (the
        # device time of its kernels, when the host launches them faster
        # than they run); on CPU, its time.
        self.sampler_times: list[tuple[Any, Any]] = []
        # Host time of the Sampler call (its launches) and of to_host (the
        # copies, the wait for the device, the lists).
        self.launch_ms: list[float] = []
        self.to_host_ms: list[float] = []
        for _ in range(args.warmup):
            self.next_step(self.step())
        if args.profile:
            profile_steps(lambda: self.next_step(self.step()), self.use_cuda)
        if self.use_cuda:
            torch.cuda.synchronize()
        for times in (self.prepare_ms, self.sampler_times, self.launch_ms,
                      self.to_host_ms):
            times.clear()

    def new_sequence(
        self
    ) -> tuple[int, SamplingParams, torch.Generator | None, list[int],
               list[int]]:
        args, vocab = self.args, self.args.vocab_size
        self.next_id += 1
        p = self.make_params(self.next_id, vocab)
        # The engine keeps one host generator per seeded request across
        # steps.
        generator = (None if p.seed is None else torch.Generator().manual_seed(
            p.seed))
        prompt = [self.rng.randrange(vocab) for _ in range(args.prompt_len)]
        output = [self.rng.randrange(vocab) for _ in range(args.output_len)]
        return self.next_id, p, generator, prompt, output

    def prepare(self) -> SamplingMetadata:
        seq_ids, params, generators, prompts, outputs = map(
            list, zip(*self.seqs))
        vocab = self.args.vocab_size
        if self.keep_state:
            return self.state.prepare(seq_ids, params, generators, outputs,
                                      prompts, vocab)
        return SamplingMetadata.prepare(params,
                                        generators,
                                        outputs,
                                        prompts,
                                        vocab_size=vocab,
                                        device=self.device,
                                        history_cache=self.cache)

    def step(self) -> list[int]:
        use_cuda = self.use_cuda
        t0 = time.perf_counter()
        metadata = self.prepare()
        # Host time of prepare alone (its copies are asynchronous).
        self.prepare_ms.append((time.perf_counter() - t0) * 1e3)
        before: Any = torch.cuda.Event(
            enable_timing=True) if use_cuda else time.perf_counter()
        if use_cuda:
            before.record(self.stream)
        t1 = time.perf_counter()
        out = self.sampler(self.logits, metadata)
        self.launch_ms.append((time.perf_counter() - t1) * 1e3)
        after: Any = torch.cuda.Event(
            enable_timing=True) if use_cuda else time.perf_counter()
        if use_cuda:
            after.record(self.stream)
        self.sampler_times.append((before, after))
        if self.keep_state:
            self.state.sampled(out.sampled_token_ids)
        t2 = time.perf_counter()
        sampled = out.to_host()[0]
        self.to_host_ms.append((time.perf_counter() - t2) * 1e3)
        return sampled

    def next_step(self, sampled: list[int]) -> None:
        for seq, token in zip(self.seqs, sampled):
            seq[4].append(token)
        for _ in range(self.args.replace_per_step):
            self.seqs[self.rng.randrange(
                self.args.batch_size)] = (self.new_sequence())

    def measure(self, num_steps: int) -> None:
        for _ in range(num_steps):
            if self.use_cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                sampled = self.step()
                end.record(self.stream)
                torch.cuda.synchronize()
                self.step_ms.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                sampled = self.step()
                self.step_ms.append((time.perf_counter() - t0) * 1e3)
            self.next_step(sampled)

    def result(self) -> dict[str, Any]:
        step_ms = self.step_ms
        sampler_ms = [(before.elapsed_time(after) if self.use_cuda else
                       (after - before) * 1e3)
                      for before, after in self.sampler_times]
        return {
            "median_ms": statistics.median(step_ms),
            "p10_ms": percentile(step_ms, 0.1),
            "p90_ms": percentile(step_ms, 0.9),
            "prepare_host_median_ms": statistics.median(self.prepare_ms),
            "sampler_median_ms": statistics.median(sampler_ms),
            "sampler_host_median_ms": statistics.median(self.launch_ms),
            "to_host_median_ms": statistics.median(self.to_host_ms),
        }


def bench_config(make_params: Callable[[int, int], SamplingParams],
                 keep_state: bool, cuda_graphs: bool, args: argparse.Namespace,
                 device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """One config alone: warm-up, then ``args.repeats`` timed steps."""
    bench = ConfigBench(make_params, keep_state, cuda_graphs, args, device,
                        dtype)
    bench.measure(args.repeats)
    return bench.result()


def profile_steps(run_step: Callable[[], None], use_cuda: bool) -> None:
    """Ten steps under torch.profiler: the ops that take the most host time
    (launches included) and, on CUDA, the most device time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if use_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(10):
            run_step()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=20))
    if use_cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=12))


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
    parser.add_argument("--replace-per-step",
                        type=int,
                        default=0,
                        help="sequences that finish and are replaced by new "
                        "ones after each step")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds",
                        type=int,
                        default=None,
                        help="the repeats of each config run in this many "
                        "turns, the configs taking turns (default: 5 on "
                        "CUDA, 1 on CPU)")
    parser.add_argument("--configs",
                        nargs="+",
                        choices=list(CONFIGS),
                        default=list(CONFIGS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--output-json", type=str, default=None)
    parser.add_argument("--profile",
                        action="store_true",
                        help="also print a torch.profiler table of ten "
                        "steps of each config")
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
    if args.rounds is None:
        args.rounds = 5 if on_gpu else 1
    args.rounds = max(1, min(args.rounds, args.repeats))
    dtype = getattr(torch, args.dtype)
    if "greedy" not in args.configs:
        args.configs.insert(0, "greedy")  # the reference of the ratios

    env = environment()
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    print(f"batch {args.batch_size}, vocab {args.vocab_size}, {args.dtype} "
          f"logits on {device}, prompt {args.prompt_len} + output "
          f"{args.output_len} tokens per row, {args.replace_per_step} "
          f"sequences replaced per step, {args.repeats} repeats after "
          f"{args.warmup} warm-up steps")

    benches = {
        name: ConfigBench(*CONFIGS[name], args, device, dtype)
        for name in args.configs
    }
    # Round-robin: every config's steps spread over the same stretch of
    # time, so a host that speeds up or slows down moves them all alike.
    for i in range(args.rounds):
        for bench in benches.values():
            bench.measure(args.repeats * (i + 1) // args.rounds -
                          args.repeats * i // args.rounds)
    results = {name: bench.result() for name, bench in benches.items()}
    base = results["greedy"]["median_ms"]
    for result in results.values():
        result["vs_greedy"] = result["median_ms"] / base

    header = (f"{'config':<32}{'median ms':>11}{'p10 ms':>9}{'p90 ms':>9}"
              f"{'prepare ms':>12}{'sampler ms':>12}{'launch ms':>11}"
              f"{'to_host ms':>12}{'x greedy':>10}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<32}{r['median_ms']:>11.3f}{r['p10_ms']:>9.3f}"
              f"{r['p90_ms']:>9.3f}{r['prepare_host_median_ms']:>12.3f}"
              f"{r['sampler_median_ms']:>12.3f}"
              f"{r['sampler_host_median_ms']:>11.3f}"
              f"{r['to_host_median_ms']:>12.3f}{r['vs_greedy']:>10.2f}")
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
