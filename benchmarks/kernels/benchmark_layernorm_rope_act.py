"""Micro-benchmark of the small fused kernels (csrc/): ``rms_norm``,
``fused_add_rms_norm``, ``rotary_embedding`` and ``silu_and_mul``, each
against the torch code of its layer (``RMSNorm``, ``RotaryEmbedding``,
``SiluAndMul``), which is what runs without vllm._C.

    python benchmarks/kernels/benchmark_layernorm_rope_act.py
    python benchmarks/kernels/benchmark_layernorm_rope_act.py \\
        --num-tokens 1 256 8192 --dtype float16

Shapes are those of Qwen3-0.6B (hidden 1024, heads 16 / 8 / 128,
intermediate 3072) and Llama-3-8B (hidden 4096, heads 32 / 8 / 128,
intermediate 14336), for decode-like (1, 256 tokens) and prefill-like
(4096 tokens) batches. Each op is timed with CUDA events around single
calls after warm-up calls (median of the repeats); the rotary inputs are
the strided q/k slices of a fused qkv output, as in the models. GB/s counts
the bytes each op must read and write once. Needs a CUDA GPU and vllm._C
(pip install --no-build-isolation -e .).
"""
import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from kernel_bench_utils import require_kernels, time_op

from vllm import _custom_ops as ops
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import get_rope


@dataclass
class Model:
    name: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate: int


MODELS = [
    Model("Qwen3-0.6B", 1024, 16, 8, 128, 3072),
    Model("Llama-3-8B", 4096, 32, 8, 128, 14336),
]


def bench_model(model: Model, num_tokens: int, dtype: torch.dtype, warmup: int,
                repeats: int) -> list[tuple[str, float, float, int]]:
    """[(op, kernel us, torch us, bytes moved)] for one model and size."""
    es = torch.empty(0, dtype=dtype).element_size()
    t, h = num_tokens, model.hidden
    rows = []

    def add(op: str, kernel: Callable[[], object],
            reference: Callable[[], object], num_bytes: int) -> None:
        kernel_us = time_op(kernel, warmup, repeats)
        torch_us = time_op(reference, warmup, repeats)
        rows.append((op, kernel_us, torch_us, num_bytes))

    norm = RMSNorm(h).to(device="cuda", dtype=dtype)
    w = norm.weight
    x = torch.randn(t, h, dtype=dtype, device="cuda")
    residual = torch.randn(t, h, dtype=dtype, device="cuda")
    out = torch.empty_like(x)
    add("rms_norm", lambda: ops.rms_norm(out, x, w, 1e-6),
        lambda: norm._forward_torch(x), (2 * t * h + h) * es)
    # in place: each call adds x into residual again, in the same time
    add("fused_add_rms_norm",
        lambda: ops.fused_add_rms_norm(x, residual, w, 1e-6),
        lambda: norm._forward_torch(x, residual), (4 * t * h + h) * es)

    with torch.device("cuda"):
        rope = get_rope(model.head_size, model.head_size, 40960, 1e6, None,
                        True, dtype)
    cache = rope.cos_sin_cache
    q_size = model.num_heads * model.head_size
    kv_size = model.num_kv_heads * model.head_size
    qkv = torch.randn(t, q_size + 2 * kv_size, dtype=dtype, device="cuda")
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    pos = torch.randint(0, 4096, (t, ), device="cuda")
    d = model.head_size
    add("rotary_embedding",
        lambda: ops.rotary_embedding(pos, q, k, d, cache, True),
        lambda: rope._forward_torch(pos, q, k),
        2 * t * (q_size + kv_size) * es + t * d * cache.element_size())

    act = SiluAndMul()
    inter = model.intermediate
    gate_up = torch.randn(t, 2 * inter, dtype=dtype, device="cuda")
    act_out = torch.empty(t, inter, dtype=dtype, device="cuda")
    add("silu_and_mul", lambda: ops.silu_and_mul(act_out, gate_up),
        lambda: act._forward_torch(gate_up), 3 * t * inter * es)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype",
                        choices=["bfloat16", "float16", "float32"],
                        default="bfloat16")
    parser.add_argument("--num-tokens",
                        type=int,
                        nargs="+",
                        default=[1, 256, 4096])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    require_kernels("benchmark_layernorm_rope_act")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{args.dtype}, median of {args.repeats} after {args.warmup} "
          "warm-up calls")
    header = (f"{'model':<11} {'tokens':>6} {'op':<19} {'kernel us':>10} "
              f"{'GB/s':>7} {'torch us':>9} {'speedup':>8}")
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for model in MODELS:
            for num_tokens in args.num_tokens:
                for op, kernel_us, torch_us, nbytes in bench_model(
                        model, num_tokens, dtype, args.warmup, args.repeats):
                    print(
                        f"{model.name:<11} {num_tokens:>6} {op:<19} "
                        f"{kernel_us:>10.1f} {nbytes / kernel_us / 1e3:>7.0f} "
                        f"{torch_us:>9.1f} {torch_us / kernel_us:>7.1f}x")


if __name__ == "__main__":
    main()
