"""Micro-benchmark of the decode GEMV (``ops.gemv``, csrc/gemv_kernels.cu)
against ``F.linear`` (cuBLAS) on Llama-3-8B's linear layers at 1..4 rows.

    python benchmarks/kernels/benchmark_gemv.py
    python benchmarks/kernels/benchmark_gemv.py --rows 1 --dtype float16

At these sizes a linear layer only has to read its weight once, so each
time is turned into bandwidth (weight bytes / time) and compared with a
device-to-device copy measured first (bytes read plus written / time): "% copy"
is how close the op gets to streaming the weight at copy speed. Each op is
timed with CUDA events around single calls, after warm-up calls, with
256 MiB overwritten before each call so that the weight comes from device
memory as in a decode step (where the other layers' weights evict it from
L2); median of the repeats. The last column is what ``linear()``
(layers/linear.py) picks for the case after its own measurement (the
lm_head is listed for reference: logits_processor.py calls F.linear). Needs a
CUDA GPU and vllm._C (pip install --no-build-isolation -e .).
"""
import argparse

import torch
import torch.nn.functional as F
from kernel_bench_utils import require_kernels, time_op

from vllm import _custom_ops as ops
from vllm.model_executor.layers import gemv_tuning

# name -> (N, K) of the weight [N, K], Llama-3-8B, one GPU.
SHAPES = {
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
}


def copy_bandwidth(warmup: int, repeats: int) -> float:
    """Device-to-device copy of 1 GiB, in GB/s (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_op(lambda: dst.copy_(src), warmup, repeats)
    return 2 * src.numel() / us / 1e3


def bench_case(w: torch.Tensor, m: int, warmup: int,
               repeats: int) -> tuple[float, float, str]:
    """(cuBLAS us, gemv us, linear()'s pick) for m rows times weight w."""
    n, k = w.shape
    x = torch.randn(m, k, dtype=w.dtype, device="cuda")
    out = torch.empty(m, n, dtype=w.dtype, device="cuda")
    cublas_us = time_op(lambda: F.linear(x, w), warmup, repeats, flush=True)
    gemv_us = time_op(lambda: ops.gemv(out, x, w), warmup, repeats, flush=True)
    picked = "GEMV" if gemv_tuning.use_gemv(x, w) else "cuBLAS"
    return cublas_us, gemv_us, picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype",
                        choices=["bfloat16", "float16"],
                        default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    require_kernels("benchmark_gemv")
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(args.warmup, args.repeats)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{args.dtype}, median of {args.repeats} after {args.warmup} "
          f"warm-up calls; device copy {copy_gbs:.0f} GB/s")
    header = (f"{'layer':<13} {'N':>6} {'K':>6} {'M':>2} {'floor us':>9} "
              f"{'cuBLAS us':>10} {'GB/s':>6} {'% copy':>6} "
              f"{'gemv us':>8} {'GB/s':>6} {'% copy':>6} {'speedup':>8} "
              f"{'linear()':>8}")
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            weight = torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5
            nbytes = weight.numel() * weight.element_size()
            floor_us = nbytes / copy_gbs / 1e3  # the weight at copy speed
            for m in args.rows:
                cublas_us, gemv_us, picked = bench_case(weight, m, args.warmup,
                                                        args.repeats)
                cells = []
                for us, width in ((cublas_us, 10), (gemv_us, 8)):
                    gbs = nbytes / us / 1e3
                    cells.append(f"{us:>{width}.1f} {gbs:>6.0f} "
                                 f"{100 * gbs / copy_gbs:>5.0f}%")
                print(f"{name:<13} {n:>6} {k:>6} {m:>2} {floor_us:>9.1f} "
                      f"{cells[0]} {cells[1]} "
                      f"{cublas_us / gemv_us:>7.2f}x {picked:>8}")


if __name__ == "__main__":
    main()
