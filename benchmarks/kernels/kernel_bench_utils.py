"""What the kernel micro-benchmarks share: the start-up check and the timer."""
import statistics
import sys
from collections.abc import Callable

import torch

from vllm import _custom_ops as ops


def require_kernels(name: str) -> None:
    """Exit with a message unless a GPU and the built vllm._C are there."""
    if not torch.cuda.is_available():
        sys.exit(f"{name}: needs a CUDA GPU (torch.cuda.is_available() is "
                 "False).")
    if not ops.HAS_C:
        sys.exit(f"{name}: vllm._C is not built; run `pip install "
                 "--no-build-isolation -e .` with a CUDA torch and nvcc.")


def time_op(fn: Callable[[], object],
            warmup: int,
            repeats: int,
            flush: bool = False) -> float:
    """Median time of fn() in microseconds, with CUDA events; ``flush``
    overwrites 256 MiB before each call so its inputs are not in L2."""
    scratch = torch.empty(256 * 2**20, dtype=torch.uint8,
                          device="cuda") if flush else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if scratch is not None:
            scratch.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)
