"""Profile decode steps of workload W1 or W2: where the GPU time and the host
time go.

    python benchmarks/profile_decode_step.py --model benchmarks/configs/qwen3-0.6b \\
        --load-format dummy --max-model-len 4096 --dtype bfloat16
    python benchmarks/profile_decode_step.py --workload w2 \\
        --model benchmarks/configs/llama-3-8b --load-format dummy \\
        --max-model-len 4096 --dtype bfloat16

Adds W1's 256 requests (``--workload w2``: one request of 128 random prompt
ids, greedy), steps the engine until every prompt is prefilled (every
sequence decoding), runs ``--warmup-steps`` more, then:

1. ``torch.profiler`` over ``--steps`` decode steps: the top GPU kernels with
   their share of the GPU time, and the wall time per step (GPU busy time
   over wall time shows how much the host leaves the GPU idle); a Chrome trace
   goes to ``--trace``;
2. ``cProfile`` over the same number of steps: the host functions that take
   the most time per step.
"""
import argparse
import cProfile
import dataclasses
import io
import pstats
import random
import sys
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmark_throughput import environment, w1_requests
from vllm import LLM, SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.engine.arg_utils import EngineArgs


def build_engine(args: argparse.Namespace) -> Any:
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.skip_tokenizer_init = True
    llm = LLM(**dataclasses.asdict(engine_args))
    engine = llm.llm_engine
    if args.workload == "w2":
        # Enough tokens for every profiled step, as in benchmark_latency.
        steps = 3 * args.steps + args.warmup_steps + 8
        prompt = [random.Random(0).randrange(10_000) for _ in range(128)]
        engine.add_request(
            "0", {"prompt_token_ids": prompt},
            SamplingParams(temperature=0.0,
                           ignore_eos=True,
                           max_tokens=steps,
                           detokenize=False,
                           output_kind=RequestOutputKind.FINAL_ONLY))
        return engine
    for i, r in enumerate(w1_requests()):
        engine.add_request(
            str(i), {"prompt_token_ids": r.prompt_token_ids},
            SamplingParams(temperature=r.temperature,
                           ignore_eos=True,
                           max_tokens=r.max_tokens,
                           detokenize=False,
                           output_kind=RequestOutputKind.FINAL_ONLY))
    return engine


def all_decoding(engine: Any) -> bool:
    running = engine.scheduler.running
    return (not engine.scheduler.waiting and len(running) > 0
            and all(s.num_uncomputed_tokens <= 1 for g in running
                    for s in g.seqs))


def timed_steps(engine: Any, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["w1", "w2"], default="w1")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--trace", default="decode_step_trace.json")
    parser.add_argument("--top", type=int, default=15)
    parser = EngineArgs.add_cli_args(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_decode_step.py profiles GPU kernels: it needs CUDA.")
    print(" | ".join(f"{k} {v}" for k, v in environment().items()))

    engine = build_engine(args)
    prefill_steps = 0
    while not all_decoding(engine):
        engine.step()
        prefill_steps += 1
    for _ in range(args.warmup_steps):
        engine.step()
    batch = sum(len(g.seqs) for g in engine.scheduler.running)
    print(f"{prefill_steps} steps to prefill; profiling {args.steps} decode "
          f"steps of {batch} sequences")
    plain = timed_steps(engine, args.steps)

    with profile(
            activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = timed_steps(engine, args.steps)
    prof.export_chrome_trace(args.trace)
    kernels = [
        e for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA or (
            getattr(e, "self_device_time_total", 0) > 0 and e.key.startswith(
                ("void", "triton", "ampere", "sm90", "nvjet", "cutlass")))
    ]
    gpu_total = sum(e.self_device_time_total for e in kernels)
    print(f"\nDecode step: {plain * 1e3:.2f} ms without the profiler, "
          f"{wall * 1e3:.2f} ms with it; GPU busy "
          f"{gpu_total / args.steps / 1e3:.2f} ms per step "
          f"({100 * gpu_total / 1e3 / (wall * 1e3 * args.steps):.0f}% of the "
          f"wall time)")
    print(f"\n{'kernel':<70} {'ms/step':>8} {'share':>6} {'calls':>6}")
    for e in sorted(kernels,
                    key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"{e.key[:70]:<70} "
              f"{e.self_device_time_total / args.steps / 1e3:8.3f} "
              f"{100 * e.self_device_time_total / gpu_total:5.1f}% "
              f"{e.count // args.steps:6d}")
    print(f"Chrome trace: {args.trace}")

    host = cProfile.Profile()
    host.enable()
    timed_steps(engine, args.steps)
    host.disable()
    out = io.StringIO()
    pstats.Stats(host, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"\nHost time, {args.steps} decode steps (cProfile, tottime):")
    print(out.getvalue())


if __name__ == "__main__":
    main()
