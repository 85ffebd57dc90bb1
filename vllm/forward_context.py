"""The forward context: how attention layers receive the batch's metadata.

The model runner wraps each forward pass in ``set_forward_context(attn_metadata)``;
``Attention`` layers read it with ``get_forward_context()``. Models never see
blocks, batching or the backend.
"""
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_forward_context: "ForwardContext | None" = None


@dataclass
class ForwardContext:
    # The backend's metadata for this batch; None during the profiling run,
    # when no KV cache exists yet.
    attn_metadata: Any


def get_forward_context() -> ForwardContext:
    if _forward_context is None:
        raise RuntimeError(
            "No forward context is set: the model must be called inside "
            "vllm.forward_context.set_forward_context(...)")
    return _forward_context


@contextmanager
def set_forward_context(attn_metadata: Any) -> Iterator[ForwardContext]:
    """Make ``attn_metadata`` visible to attention layers; nesting is an error."""
    global _forward_context
    if _forward_context is not None:
        raise RuntimeError("set_forward_context() does not nest")
    _forward_context = ForwardContext(attn_metadata)
    try:
        yield _forward_context
    finally:
        _forward_context = None
