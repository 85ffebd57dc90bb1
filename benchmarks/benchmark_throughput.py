"""Benchmark offline inference throughput, vLLM-style.

Examples (W1 of docs/performance.md, the nano-vllm benchmark):

    python benchmarks/benchmark_throughput.py --backend vllm \\
        --model benchmarks/configs/qwen3-0.6b --load-format dummy \\
        --dataset-name w1 --max-model-len 4096 --dtype bfloat16
    python benchmarks/benchmark_throughput.py --backend hf \\
        --model benchmarks/configs/qwen3-0.6b --load-format dummy \\
        --dataset-name w1 --max-model-len 4096 --dtype bfloat16

Random prompts: ``--dataset-name random --input-len 512 --output-len 128
--num-prompts 1000``. Every request ignores EOS, so the output length is
exactly ``max_tokens``.
"""

import argparse
import dataclasses
import importlib
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmark_utils import random_lengths

try:
    from vllm.engine.arg_utils import EngineArgs
except ImportError:  # the engine is still being written
    EngineArgs = None  # type: ignore[assignment,misc]

# W1: the nano-vllm benchmark (docs/performance.md).
W1_NUM_PROMPTS = 256
W1_PROMPT_TOKENS = 142_827
W1_OUTPUT_TOKENS = 133_966

# Random prompt ids are drawn below this (as vLLM's benchmarks do).
RANDOM_ID_LIMIT = 10_000

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model",
                    "tokenizer_config.json", "vocab.json")


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Result:
    elapsed_time: float
    num_requests: int
    total_prompt_tokens: int
    total_output_tokens: int
    note: str = ""  # how the backend ran the requests
    # Backend-specific figures for the report (start-up time, GPU memory).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def total_num_tokens(self) -> int:
        return self.total_prompt_tokens + self.total_output_tokens


# ------------------------------------------------------------- datasets --- #


def w1_requests(num_prompts: int = W1_NUM_PROMPTS) -> list[Request]:
    """Workload W1, in nano-vllm's bench.py order of random calls: every
    prompt (length, then ids) first, then every max_tokens."""
    rng = random.Random(0)  # same stream as random.seed(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
               for _ in range(num_prompts)]
    max_tokens = [rng.randint(100, 1024) for _ in range(num_prompts)]
    return [
        Request(p, m, temperature=0.6, top_p=1.0)
        for p, m in zip(prompts, max_tokens)
    ]


def random_requests(num_prompts: int,
                    input_len: int,
                    output_len: int,
                    range_ratio: float = 0.0,
                    seed: int = 0,
                    id_limit: int = RANDOM_ID_LIMIT) -> list[Request]:
    """Random prompt ids in [0, id_limit); lengths uniform in
    [len * (1 - range_ratio), len * (1 + range_ratio)]."""
    rng = random.Random(seed)
    lengths = random_lengths(num_prompts, input_len, output_len, range_ratio,
                             rng)
    return [
        Request([rng.randrange(id_limit) for _ in range(n_in)], n_out)
        for n_in, n_out in lengths
    ]


def warmup_prompts(num: int, id_limit: int) -> list[list[int]]:
    """Short prompts for the warm-up generate, unrelated to the timed ones
    (no prefix-cache hits)."""
    rng = random.Random(1234)
    return [[rng.randrange(id_limit) for _ in range(32)] for _ in range(num)]


# ------------------------------------------------------------- backends --- #


def run_vllm(args: argparse.Namespace, requests: list[Request],
             warmup: list[list[int]]) -> Result:
    from vllm import LLM, SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    detokenize = not args.disable_detokenize
    if not has_tokenizer(args.tokenizer or args.model):
        # e.g. benchmarks/configs/*: a config.json and nothing else.
        engine_args.skip_tokenizer_init = True
        detokenize = False
    start = time.perf_counter()
    if dataclasses.is_dataclass(engine_args):
        llm = LLM(**dataclasses.asdict(engine_args))
    else:
        llm = LLM(**vars(engine_args))
    _synchronize()
    startup = time.perf_counter() - start

    def params(r: Request) -> Any:
        return SamplingParams(n=args.n,
                              temperature=r.temperature,
                              top_p=r.top_p,
                              ignore_eos=True,
                              max_tokens=r.max_tokens,
                              detokenize=detokenize)

    if warmup:
        llm.generate(_token_prompts(warmup),
                     [params(Request(ids, 8)) for ids in warmup],
                     use_tqdm=False)
    prompts = _token_prompts([r.prompt_token_ids for r in requests])
    sampling_params = [params(r) for r in requests]
    _synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling_params, use_tqdm=True)
    _synchronize()
    elapsed = time.perf_counter() - start

    if len(outputs) != len(requests):
        raise RuntimeError(f"generate returned {len(outputs)} outputs for "
                           f"{len(requests)} prompts")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    note = ("vllm: no tokenizer files, skip_tokenizer_init=True"
            if engine_args.skip_tokenizer_init else "")
    extra = {"startup_time": startup, **gpu_memory_report(args)}
    print(f"Start-up (LLM(...) until ready): {startup:.1f} s")
    return Result(elapsed, len(requests), prompt_tokens, output_tokens, note,
                  extra)


def gpu_memory_report(args: argparse.Namespace) -> dict[str, float]:
    """Peak GPU memory of this process against gpu_memory_utilization."""
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    gib = float(1 << 30)
    stats = {
        "gpu_total_gib": total / gib,
        "gpu_budget_gib": total * args.gpu_memory_utilization / gib,
        # torch's allocator peak; the device-wide figure adds the CUDA
        # context, library workspaces and other processes.
        "peak_torch_reserved_gib": torch.cuda.max_memory_reserved() / gib,
        "device_used_at_end_gib": (total - free) / gib,
    }
    print("GPU memory: peak reserved by torch {peak_torch_reserved_gib:.2f} "
          "GiB, device in use at the end {device_used_at_end_gib:.2f} GiB, "
          "budget (gpu_memory_utilization x total) {gpu_budget_gib:.2f} of "
          "{gpu_total_gib:.2f} GiB".format(**stats))
    return stats


def run_hf(args: argparse.Namespace, requests: list[Request],
           warmup: list[list[int]]) -> Result:
    backend_hf = _import_sibling("backend_hf")
    temps = {(r.temperature, r.top_p) for r in requests}
    if len(temps) != 1:
        raise ValueError("the hf backend needs one temperature / top_p for "
                         "all requests")
    temperature, top_p = temps.pop()
    model = backend_hf.load_model(args.model,
                                  dtype=args.dtype,
                                  load_format=args.load_format,
                                  trust_remote_code=args.trust_remote_code,
                                  seed=_seed(args))
    run = backend_hf.run(model, [r.prompt_token_ids for r in requests],
                         [r.max_tokens for r in requests],
                         temperature=temperature,
                         top_p=top_p,
                         n=args.n,
                         batching=args.hf_batching,
                         max_batch_size=args.hf_max_batch_size,
                         seed=_seed(args),
                         warmup_prompts=warmup)
    note = f"hf: {run.mode}; dtype {model.dtype}"
    if run.generated_tokens != run.output_tokens:
        note += (f"; {run.generated_tokens - run.output_tokens} generated "
                 "tokens beyond their request's max_tokens not counted")
    return Result(run.elapsed, run.num_requests, run.prompt_tokens,
                  run.output_tokens, note)


# ---------------------------------------------------------------- utils --- #


def _import_sibling(name: str) -> Any:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def _token_prompts(prompts: list[list[int]]) -> list[Any]:
    return [{"prompt_token_ids": ids} for ids in prompts]


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _seed(args: argparse.Namespace) -> int:
    return 0 if args.seed is None else args.seed


def has_tokenizer(path: str) -> bool:
    """False for a local directory without tokenizer files; hub ids are
    assumed to have one."""
    if not os.path.isdir(path):
        return True
    return any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def vocab_size(model: str, trust_remote_code: bool = False) -> int | None:
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model,
                                            trust_remote_code=trust_remote_code)
        return int(config.get_text_config().vocab_size)
    except Exception:  # a model transformers does not know: no clamp
        return None


def environment() -> dict[str, str]:
    """Device name and library versions, for the report."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
    versions = {"device": device, "torch": torch.__version__}
    for name in ("transformers", "triton", "vllm"):
        try:
            module = importlib.import_module(name)
            versions[name] = str(getattr(module, "__version__", "unknown"))
        except ImportError:
            versions[name] = "not installed"
    return versions


# ----------------------------------------------------------------- main --- #


def _add_if_missing(parser: argparse.ArgumentParser, flag: str,
                    **kwargs: Any) -> None:
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kwargs)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the throughput of offline inference.")
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--dataset-name",
                        choices=["random", "w1"],
                        default="random",
                        help="random: --input-len/--output-len random ids; "
                        "w1: workload W1 of docs/performance.md (256 "
                        "prompts, seed 0, temperature 0.6)")
    parser.add_argument("--input-len",
                        type=int,
                        default=None,
                        help="prompt length (random dataset)")
    parser.add_argument("--output-len",
                        type=int,
                        default=None,
                        help="output length (random dataset)")
    parser.add_argument("--random-range-ratio",
                        type=float,
                        default=0.0,
                        help="lengths vary uniformly by this fraction")
    parser.add_argument("--num-prompts",
                        type=int,
                        default=None,
                        help="number of requests (default: 1000 for "
                        f"random, {W1_NUM_PROMPTS} for w1)")
    parser.add_argument("--n",
                        type=int,
                        default=1,
                        help="sequences generated per prompt")
    parser.add_argument("--num-warmup-prompts",
                        type=int,
                        default=4,
                        help="short prompts generated once before timing "
                        "(0: no warm-up)")
    parser.add_argument("--hf-max-batch-size",
                        type=int,
                        default=None,
                        help="hf backend: requests per batch (static "
                        "default 64; continuous: max requests per step)")
    parser.add_argument("--hf-batching",
                        choices=["auto", "continuous", "static"],
                        default="auto",
                        help="hf backend: auto = continuous batching on "
                        "CUDA, static batches on CPU")
    parser.add_argument("--disable-detokenize",
                        action="store_true",
                        help="vllm backend: do not detokenize outputs")
    parser.add_argument("--output-json",
                        type=str,
                        default=None,
                        help="write the results to this JSON file")
    if EngineArgs is not None:
        parser = EngineArgs.add_cli_args(parser)
    # The flags this script reads itself (EngineArgs normally has them).
    _add_if_missing(parser, "--model", type=str, required=True)
    _add_if_missing(parser, "--tokenizer", type=str, default=None)
    _add_if_missing(
        parser,
        "--dtype",
        type=str,
        default="auto",
        choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    _add_if_missing(parser, "--load-format", type=str, default="auto")
    _add_if_missing(parser, "--seed", type=int, default=0)
    _add_if_missing(parser, "--max-model-len", type=int, default=None)
    _add_if_missing(parser, "--trust-remote-code", action="store_true")
    return parser


def make_requests(args: argparse.Namespace, id_limit: int) -> list[Request]:
    if args.dataset_name == "w1":
        return w1_requests(args.num_prompts or W1_NUM_PROMPTS)
    return random_requests(args.num_prompts or 1000,
                           args.input_len,
                           args.output_len,
                           args.random_range_ratio,
                           seed=_seed(args),
                           id_limit=id_limit)


def check_args(parser: argparse.ArgumentParser,
               args: argparse.Namespace) -> None:
    if args.dataset_name == "random" and (args.input_len is None
                                          or args.output_len is None):
        parser.error("--dataset-name random needs --input-len and "
                     "--output-len")
    if args.backend == "vllm":
        if EngineArgs is None:
            parser.error("--backend vllm: vllm.engine.arg_utils.EngineArgs "
                         "is not importable")
        if args.hf_max_batch_size is not None:
            parser.error("--hf-max-batch-size is only for --backend hf")
    if args.n < 1:
        parser.error("--n must be >= 1")


def report(args: argparse.Namespace, result: Result,
           env: dict[str, str]) -> dict[str, Any]:
    elapsed = result.elapsed_time
    stats: dict[str, Any] = {
        "elapsed_time": elapsed,
        "num_requests": result.num_requests,
        "total_num_tokens": result.total_num_tokens,
        "total_prompt_tokens": result.total_prompt_tokens,
        "total_output_tokens": result.total_output_tokens,
        "requests_per_second": result.num_requests / elapsed,
        "tokens_per_second": result.total_num_tokens / elapsed,
        "output_tokens_per_second": result.total_output_tokens / elapsed,
    }
    print(f"Throughput: {stats['requests_per_second']:.2f} requests/s, "
          f"{stats['tokens_per_second']:.2f} total tokens/s, "
          f"{stats['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {result.total_prompt_tokens}")
    print(f"Total num output tokens:  {result.total_output_tokens}")
    print(f"Elapsed time: {elapsed:.2f} s")
    stats.update(backend=args.backend,
                 dataset_name=args.dataset_name,
                 model=args.model,
                 dtype=args.dtype,
                 n=args.n,
                 note=result.note,
                 **result.extra,
                 **env)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(stats, f, indent=4)
    return stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    vocab = vocab_size(args.model, args.trust_remote_code)
    id_limit = min(RANDOM_ID_LIMIT, vocab or RANDOM_ID_LIMIT)
    requests = make_requests(args, id_limit)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = sum(r.max_tokens for r in requests) * args.n
    print(f"Dataset {args.dataset_name}: {len(requests)} requests, "
          f"{prompt_tokens} prompt tokens, {output_tokens} output tokens "
          "requested")

    warmup = warmup_prompts(args.num_warmup_prompts, id_limit)
    if args.backend == "vllm":
        result = run_vllm(args, requests, warmup)
    else:
        result = run_hf(args, requests, warmup)
    if result.note:
        print(result.note)
    if (result.total_prompt_tokens != prompt_tokens
            or result.total_output_tokens != output_tokens):
        print(f"WARNING: counted {result.total_prompt_tokens} prompt / "
              f"{result.total_output_tokens} output tokens, expected "
              f"{prompt_tokens} / {output_tokens}")
    return report(args, result, env)


if __name__ == "__main__":
    main()
