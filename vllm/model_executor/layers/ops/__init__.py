"""Triton kernels of the sampler's passes over the whole vocabulary.

``sampling_kernels`` imports triton; this package does not, so a CPU-only
install (no triton) can import it and ask ``get_sampling_kernels()`` first.
"""
import functools
import importlib.util
from types import ModuleType


@functools.cache
def get_sampling_kernels() -> ModuleType | None:
    """The ``sampling_kernels`` module, or None where triton is not
    installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from vllm.model_executor.layers.ops import sampling_kernels
    return sampling_kernels
