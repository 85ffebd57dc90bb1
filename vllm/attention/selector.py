"""Chooses the attention backend once, at model construction."""
from vllm import envs
from vllm.attention.backends.abstract import AttentionBackend
from vllm.attention.backends.torch_sdpa import TorchSDPABackend
from vllm.logger import init_logger

logger = init_logger(__name__)

# name -> backend; VLLM_ATTENTION_BACKEND picks one by name.
_BACKENDS: dict[str, type[AttentionBackend]] = {
    TorchSDPABackend.name: TorchSDPABackend,
}


def get_attn_backend(head_size: int,
                     backend_name: str | None = None) -> type[AttentionBackend]:
    """The backend for a layer: ``backend_name``, else VLLM_ATTENTION_BACKEND,
    else the best one that supports the shape (today: the torch reference)."""
    name = backend_name or envs.VLLM_ATTENTION_BACKEND
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(f"Unknown attention backend {name!r} "
                             f"(VLLM_ATTENTION_BACKEND); available: "
                             f"{sorted(_BACKENDS)}.")
        return _BACKENDS[name]
    return TorchSDPABackend
