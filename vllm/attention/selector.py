"""Chooses the attention backend once, at model construction."""
import torch

from vllm import envs
from vllm.attention.backends.abstract import AttentionBackend
from vllm.attention.backends.torch_sdpa import TorchSDPABackend
from vllm.attention.backends.triton_attn import TritonAttentionBackend

# name -> backend; VLLM_ATTENTION_BACKEND picks one by name.
_BACKENDS: dict[str, type[AttentionBackend]] = {
    TorchSDPABackend.name: TorchSDPABackend,
    TritonAttentionBackend.name: TritonAttentionBackend,
}


def get_attn_backend(head_size: int,
                     dtype: torch.dtype,
                     device: torch.device,
                     backend_name: str | None = None) -> type[AttentionBackend]:
    """The backend for a layer: ``backend_name``, else VLLM_ATTENTION_BACKEND,
    else TRITON_ATTN when it supports the layer, else the torch reference."""
    name = backend_name or envs.VLLM_ATTENTION_BACKEND
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(f"Unknown attention backend {name!r} "
                             f"(VLLM_ATTENTION_BACKEND); available: "
                             f"{sorted(_BACKENDS)}.")
        backend = _BACKENDS[name]
        reason = backend.unsupported_reason(head_size, dtype, device)
        if reason is not None:
            raise ValueError(f"Attention backend {name} cannot run this "
                             f"model: {reason}.")
        return backend
    if TritonAttentionBackend.unsupported_reason(head_size, dtype,
                                                 device) is None:
        return TritonAttentionBackend
    return TorchSDPABackend
