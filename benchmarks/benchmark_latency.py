"""Benchmark the latency of one batch, vLLM-style (workload W2 at batch 1).

    python benchmarks/benchmark_latency.py --model benchmarks/configs/llama-3-8b \\
        --load-format dummy --dtype bfloat16 --input-len 128 --output-len 256 \\
        --batch-size 1
    python benchmarks/benchmark_latency.py --backend hf ...   (the same with HF)

Each iteration generates ``--output-len`` tokens (EOS ignored) for
``--batch-size`` random prompts of ``--input-len`` ids below 10,000. Prints the
average and p10/25/50/75/90/99 latencies as vLLM's script does, then the time
per output token and the memory bandwidth that implies: every decode step reads
all weights once plus the KV cache of the context so far, so
(weight bytes + mean KV bytes per step) / (time per step), against the device's
copy bandwidth measured in the same run (a 1 GiB device-to-device copy,
bytes read + written). ``--profile`` writes a torch profiler trace of one
iteration to ``--profile-dir``.
"""
import argparse
import dataclasses
import json
import random
import time
from typing import Any

import numpy as np
import torch

from benchmark_throughput import _import_sibling, environment, vocab_size
from vllm.engine.arg_utils import EngineArgs

PERCENTILES = (10, 25, 50, 75, 90, 99)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of
    20 copies of 1 GiB."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for i in range(23):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() / float(np.median(times))


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Key + value bytes of one token over all layers."""
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size //
                                                     config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads",
                       config.num_attention_heads)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * elem


def make_vllm_runner(args: argparse.Namespace,
                     prompts: list[list[int]]) -> tuple[Any, Any, Any]:
    """(run one batch, the model, its HF config) for this engine."""
    from vllm import LLM, SamplingParams
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.skip_tokenizer_init = True
    llm = LLM(**dataclasses.asdict(engine_args))
    params = SamplingParams(temperature=0.0,
                            max_tokens=args.output_len,
                            ignore_eos=True,
                            detokenize=False,
                            n=args.n)
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def run() -> None:
        llm.generate(inputs, params, use_tqdm=False)

    runner = llm.llm_engine.executor.worker.model_runner
    return run, runner.model, llm.llm_engine.model_config.hf_config


def make_hf_runner(args: argparse.Namespace,
                   prompts: list[list[int]]) -> tuple[Any, Any, Any]:
    """(run one batch, the model, its config) for HF transformers (eager
    ``generate``, greedy, EOS kept away by ``min_new_tokens``)."""
    backend_hf = _import_sibling("backend_hf")
    model = backend_hf.load_model(args.model,
                                  dtype=args.dtype,
                                  load_format=args.load_format,
                                  seed=args.seed or 0)
    input_ids = torch.tensor(prompts, device=model.device)

    def run() -> None:
        model.generate(input_ids,
                       max_new_tokens=args.output_len,
                       min_new_tokens=args.output_len,
                       do_sample=False,
                       pad_token_id=0)

    return run, model, model.config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-iters-warmup", type=int, default=10)
    parser.add_argument("--num-iters", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-dir", default="./latency_profile")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--n", type=int, default=1)
    parser = EngineArgs.add_cli_args(parser)
    args = parser.parse_args(argv)

    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    rng = random.Random(0)
    id_limit = min(10_000, vocab_size(args.model) or 10_000)
    prompts = [[rng.randrange(id_limit) for _ in range(args.input_len)]
               for _ in range(args.batch_size)]
    make = make_vllm_runner if args.backend == "vllm" else make_hf_runner
    run, model, config = make(args, prompts)

    def timed() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.num_iters_warmup):
        timed()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            timed()
        path = f"{args.profile_dir}.{args.backend}.json"
        prof.export_chrome_trace(path)
        print(f"Profiler trace: {path}")
    latencies = np.array([timed() for _ in range(args.num_iters)])

    stats: dict[str, Any] = {
        "backend": args.backend,
        "avg_latency": float(latencies.mean()),
        "latencies": latencies.tolist(),
        "percentiles": {
            str(p): float(np.percentile(latencies, p))
            for p in PERCENTILES
        },
        **env,
    }
    print(f"Avg latency: {stats['avg_latency']:.4f} seconds")
    for p in PERCENTILES:
        print(f"{p}% percentile latency: {stats['percentiles'][str(p)]:.4f} "
              "seconds")

    # Per output token (the prompt's prefill is included, amortised).
    step = stats["avg_latency"] / args.output_len
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    mean_context = args.input_len + (args.output_len - 1) / 2
    kv_bytes = (args.batch_size * args.n * mean_context *
                kv_bytes_per_token(config, dtype))
    stats.update(ms_per_output_token=step * 1e3,
                 output_tokens_per_second=args.batch_size * args.n / step,
                 weight_bytes=weight_bytes,
                 kv_bytes_per_step=kv_bytes,
                 achieved_bandwidth=(weight_bytes + kv_bytes) / step)
    print(f"Per output token: {step * 1e3:.2f} ms "
          f"({stats['output_tokens_per_second']:.1f} tokens/s); "
          f"weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.3f} GB "
          f"per step -> {stats['achieved_bandwidth'] / 1e12:.3f} TB/s")
    if torch.cuda.is_available():
        bandwidth = copy_bandwidth()
        stats.update(copy_bandwidth=bandwidth,
                     fraction_of_copy_bandwidth=stats["achieved_bandwidth"] /
                     bandwidth)
        print(f"Device copy bandwidth {bandwidth / 1e12:.3f} TB/s: achieved "
              f"{100 * stats['fraction_of_copy_bandwidth']:.1f}% of it")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(stats, f, indent=4)
    return stats


if __name__ == "__main__":
    main()
