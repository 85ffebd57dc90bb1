"""Step 3: profiling LLM.generate (torch.profiler + cProfile) on stories260K.

What you learn:

1. ``torch.profiler`` around one ``generate`` call: the torch ops that take
   the most self time (CPU always, CUDA kernels too when a GPU is present) and
   a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing);
2. ``cProfile`` of the host side: which Python functions of ``vllm/`` take
   the time (scheduler, input preparation, sampler, output processing...);
3. the engine's own numbers: per-request ``RequestOutput.metrics`` (time to
   first token, decode time) and the ``StatLogger`` of vllm/engine/metrics.py
   (throughput, KV usage: logged every 5 s when ``disable_log_stats=False``).

About ``VLLM_TORCH_PROFILER_DIR``: vllm/envs.py defines it (its comment names
``LLM.start_profile`` / ``stop_profile``), but this engine has NO
start_profile/stop_profile API yet, and nothing else reads the variable. This
script honours it itself: when set, the trace goes into that directory.

For GPU profiling of decode steps use benchmarks/profile_decode_step.py
(torch.profiler over N decode steps, top CUDA kernels, host time per step)
and ``bash benchmarks/run_gpu.sh profile`` (or ``profile-w2``).

Run:
    python my_debug_scripts/step3_profiling.py
    python my_debug_scripts/step3_profiling.py --num-prompts 8 --max-tokens 32 \\
        --trace /tmp/trace.json
    F5 in VSCode: configuration "Step3: profiling"
"""
import argparse
import cProfile
import io
import os
import pstats
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import vllm
from vllm import LLM, SamplingParams
from vllm.outputs import RequestOutput

DEFAULT_MODEL = (Path(__file__).resolve().parents[1].parent / "shared" /
                 "models" / "stories260K")
LOG_DIR = Path(__file__).resolve().parent / ".logs"
VLLM_DIR = str(Path(vllm.__file__).resolve().parent)
PROMPTS = [
    "Once upon a time", "The little dog", "Lily wanted to", "One day, Tom",
    "The sun was", "A big red ball", "Mom said", "In the park"
]


def default_trace_path() -> Path:
    """VLLM_TORCH_PROFILER_DIR when set (vLLM's convention), else .logs/."""
    directory = os.environ.get("VLLM_TORCH_PROFILER_DIR")
    base = Path(directory) if directory else LOG_DIR
    return base / f"step3_profiling.{time.strftime('%Y%m%d-%H%M%S')}.json"


@dataclass
class ProfileReport:
    trace_path: Path
    top_ops: list[tuple[str, float, int]]  # (name, self time us, calls)
    top_host_functions: list[tuple[str, float]]  # (file:line(func), cum s)
    num_generated_tokens: int
    generate_s: float


def make_prompts(num_prompts: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]


def torch_profile(llm: LLM, prompts: list[str], params: SamplingParams,
                  trace_path: Path,
                  top: int) -> tuple[list[tuple[str, float, int]], int, float]:
    """One generate call under torch.profiler; the top ops by self time."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    # record_shapes: the table can group by input shape (prefill vs decode);
    # with_stack off: stacks make the trace large and slow to write.
    with profile(activities=activities, record_shapes=True) as prof, \
            record_function("LLM.generate"):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    sort_key = ("self_cuda_time_total"
                if torch.cuda.is_available() else "self_cpu_time_total")
    print(prof.key_averages().table(sort_by=sort_key, row_limit=top))
    events = [e for e in prof.key_averages() if e.key != "LLM.generate"]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    top_ops = [(e.key, e.self_cpu_time_total, e.count) for e in events[:top]]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return top_ops, generated, elapsed


def host_profile(
        llm: LLM, prompts: list[str], params: SamplingParams,
        top: int) -> tuple[list[tuple[str, float]], list[RequestOutput]]:
    """One generate call under cProfile; the vllm/ functions with the most
    cumulative time (time in the function and everything it calls)."""
    profiler = cProfile.Profile()
    profiler.enable()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    # stats.stats: (file, line, name) -> (calls, ncalls, tottime, cumtime, ..)
    for (filename, line, name), value in stats.stats.items():  # type: ignore
        if filename.startswith(VLLM_DIR):
            where = f"{os.path.relpath(filename, Path(VLLM_DIR).parent)}:" \
                f"{line}({name})"
            rows.append((where, float(value[3])))
    rows.sort(key=lambda r: r[1], reverse=True)
    return rows[:top], outputs


def print_engine_metrics(outputs: list[RequestOutput]) -> None:
    """The engine's per-request timestamps (RequestOutput.metrics)."""
    print("engine metrics per request (RequestOutput.metrics):")
    for out in outputs:
        m = out.metrics
        if m is None or m.first_token_time is None or m.finished_time is None:
            continue
        ttft = m.first_token_time - m.arrival_time
        decode = m.finished_time - m.first_token_time
        n = len(out.outputs[0].token_ids)
        print(f"  request {out.request_id:>3s}: {len(out.prompt_token_ids):3d}"
              f" prompt tokens, {n:3d} generated, TTFT {1e3 * ttft:7.1f} ms, "
              f"decode {1e3 * decode:7.1f} ms"
              f" ({1e3 * decode / max(n - 1, 1):.2f} ms/token)")


def run(argv: list[str] | None = None) -> ProfileReport:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--trace",
                        type=Path,
                        default=None,
                        help="Chrome trace path (default: "
                        "$VLLM_TORCH_PROFILER_DIR or my_debug_scripts/.logs/)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    trace_path = args.trace or default_trace_path()

    if os.environ.get("VLLM_TORCH_PROFILER_DIR"):
        print("VLLM_TORCH_PROFILER_DIR is set; this engine has no "
              "LLM.start_profile/stop_profile yet, so this script writes "
              "the trace there itself.")
    # disable_log_stats=False: the engine's StatLogger runs (it logs at INFO
    # every 5 s, so a run this short may print nothing).
    llm = LLM(model=args.model,
              swap_space=0,
              num_gpu_blocks_override=256,
              disable_log_stats=False)
    prompts = make_prompts(args.num_prompts)
    params = SamplingParams(temperature=0.0,
                            max_tokens=args.max_tokens,
                            ignore_eos=True)
    # Warm-up: the first call pays one-time costs (lazy imports, allocator
    # growth, on CUDA kernel selection) that are not the steady state.
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)

    print("=" * 72)
    print(f"torch.profiler over LLM.generate({args.num_prompts} prompts, "
          f"max_tokens={args.max_tokens}), top {args.top} ops by self time:")
    top_ops, generated, elapsed = torch_profile(llm, prompts, params,
                                                trace_path, args.top)
    print("(LLM.generate's SELF time is the host's Python between torch ops: "
          "scheduling, batching, output processing)")
    print(f"Chrome trace written to {trace_path} (open in "
          "https://ui.perfetto.dev)")
    print(f"{generated} tokens in {elapsed:.3f} s under the profiler "
          f"({generated / elapsed:.0f} tokens/s; the profiler slows it)")

    print("=" * 72)
    print(f"cProfile of the host side: top {args.top} vllm/ functions by "
          "cumulative time")
    host_rows, outputs = host_profile(llm, prompts, params, args.top)
    for where, cumtime in host_rows:
        print(f"  {1e3 * cumtime:8.1f} ms  {where}")

    print("=" * 72)
    print_engine_metrics(outputs)
    stat_logger = llm.llm_engine.stat_logger
    print("engine StatLogger (vllm/engine/metrics.py): "
          f"{'on' if stat_logger is not None else 'off'}, logs every "
          f"{getattr(stat_logger, 'interval_s', 0):.0f} s at INFO")
    print("GPU profiling: benchmarks/profile_decode_step.py and "
          "`bash benchmarks/run_gpu.sh profile`")
    return ProfileReport(trace_path, top_ops, host_rows, generated, elapsed)


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
