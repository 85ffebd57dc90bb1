"""Shared helpers of the CUDA kernel tests (tests/kernels/)."""
import pytest
import torch

from vllm import _custom_ops as ops

# Marks of every kernel test: a GPU, and vllm._C built for it.
KERNEL_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not ops.HAS_C,
        reason="vllm._C is not built; on a machine with a CUDA torch and "
        "nvcc run `pip install --no-build-isolation -e .`"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The bound on ||out - ref|| / ||ref|| (reference in float32) per dtype.
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# Element-wise tolerances of a kernel against the same torch math on the
# GPU: a couple of units in the last place of the dtype.
ELEM_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2.5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32 (NaN when out has NaNs)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poisoned(shape: tuple[int, ...] | torch.Size,
             dtype: torch.dtype) -> torch.Tensor:
    """A NaN-filled CUDA tensor: an element the kernel fails to write shows
    up as NaN in the comparison."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device="cuda")
