"""Attention kernels for the GPU fast path.

``triton_prefill_attention``: causal flash attention of a batch of prompt
chunks over the paged KV cache (chunked prefill, prefix-cache hits, whole
prompts). It imports triton; this package does not, so a CPU-only install
(no triton) can import ``vllm.attention.ops`` and ask ``has_triton()`` first.
"""
import importlib.util


def has_triton() -> bool:
    """Whether triton is installed (the Triton kernels need it and CUDA)."""
    return importlib.util.find_spec("triton") is not None
