"""Which of the decode GEMV kernel (csrc/gemv_kernels.cu) and cuBLAS runs a
linear layer of 1..4 rows.

At that size a linear layer only streams its weight from device memory, and
which of the two does it faster depends on the weight's shape and the GPU
(on an H200 cuBLAS is near copy speed on the 28672x4096 gate_up weight but
at ~75% on 4096x4096 ones). So the choice is measured, not guessed: the
first time a (N, K, dtype, rows) case is seen outside CUDA-graph capture,
both run on the layer's own tensors, timed with CUDA events, and the faster
is kept for the rest of the process. Timing needs a synchronize, which graph
capture forbids, so during capture a case never seen runs cuBLAS; the
capture code runs one eager pass at each batch size before capturing it
(worker/cuda_graph.py), which measures the decode cases first.

``VLLM_GEMV=0`` turns the GEMV off (read when a case is first seen).
"""
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vllm import _custom_ops as ops
from vllm import envs
from vllm.logger import init_logger

logger = init_logger(__name__)

MAX_ROWS = 4  # the kernel's limit
_DTYPES = (torch.float16, torch.bfloat16)

# The GEMV must beat cuBLAS by this factor: on a tie keep cuBLAS.
_MARGIN = 0.98
_WARMUP, _REPEATS = 3, 20

# (N, K, dtype, rows) -> whether the GEMV runs it.
_decisions: dict[tuple[int, int, torch.dtype, int], bool] = {}


def gemv_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMV kernel can compute ``F.linear(x, weight)``: 1..4
    rows (after flattening the leading dims) on CUDA, fp16/bf16, K a
    multiple of 8, a contiguous [N, K] weight. Cheap; measures nothing."""
    k = x.shape[-1]
    return (x.dtype in _DTYPES and weight.dtype == x.dtype and k > 0
            and k % 8 == 0 and 0 < x.numel() <= MAX_ROWS * k
            and weight.dim() == 2 and weight.shape[1] == k
            and weight.is_contiguous() and ops.kernels_usable(x, weight))


def use_gemv(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMV runs ``F.linear(x2d, weight)`` (x2d [M, K] and
    weight as ``gemv_supports`` accepts them): the cached choice, measured
    the first time this case is seen outside graph capture."""
    key = (weight.shape[0], weight.shape[1], weight.dtype, x2d.shape[0])
    choice = _decisions.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return False  # unmeasured: cuBLAS, and measure it later
        choice = _decisions[key] = _measure(x2d, weight)
    return choice


def gemv_linear(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x2d, weight)`` computed by the GEMV kernel."""
    out = torch.empty(x2d.shape[0],
                      weight.shape[0],
                      dtype=x2d.dtype,
                      device=x2d.device)
    ops.gemv(out, x2d, weight)
    return out


def _measure(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    if not envs.VLLM_GEMV:
        return False
    try:
        gemv_us, cublas_us = _median_times_us(
            [lambda: gemv_linear(x2d, weight), lambda: F.linear(x2d, weight)],
            x2d.device)
    except torch.cuda.OutOfMemoryError:
        # no room for the L2 flush buffer: keep cuBLAS rather than fail
        logger.warning("no memory to time GEMV vs cuBLAS; using cuBLAS")
        return False
    choice = gemv_us < _MARGIN * cublas_us
    n, k = weight.shape
    logger.info(
        "linear %dx%d %s, %d row(s): GEMV %.1f us, cuBLAS %.1f us -> %s", n, k,
        str(weight.dtype).removeprefix("torch."), x2d.shape[0], gemv_us,
        cublas_us, "GEMV" if choice else "cuBLAS")
    return choice


def _median_times_us(fns: list[Callable[[], object]],
                     device: torch.device) -> list[float]:
    """Median device time of each fn in microseconds, the calls of the
    different fns interleaved.

    A decode step reads every layer's weight once, so a weight is never in
    L2 when its layer runs: a write of twice the L2 size before each call
    evicts it here too (a 4096x4096 weight would otherwise fit in an
    H200's L2). The write also keeps the GPU busy while the call is
    launched, so launch overhead stays out of the times.
    """
    l2_bytes = getattr(torch.cuda.get_device_properties(device),
                       "L2_cache_size", 0)
    flush = torch.empty(max(2 * l2_bytes, 64 << 20),
                        dtype=torch.uint8,
                        device=device)
    times: list[list[float]] = [[] for _ in fns]
    pending = []
    for i in range(_WARMUP + _REPEATS):
        for j, fn in enumerate(fns):
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            if i >= _WARMUP:
                pending.append((j, start, end))
    torch.cuda.synchronize(device)
    for j, start, end in pending:
        times[j].append(start.elapsed_time(end) * 1e3)
    return [statistics.median(t) for t in times]
