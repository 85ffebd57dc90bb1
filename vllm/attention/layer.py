"""The Attention layer every model uses.

A model hands it q, k, v for the flattened batch; the layer reads the batch layout
from the forward context and delegates to the backend chosen at start-up. The model
runner binds ``kv_cache`` once the cache is allocated.
"""
import torch
from torch import nn

from vllm.attention.backends.abstract import AttentionBackend
from vllm.attention.selector import get_attn_backend
from vllm.forward_context import get_forward_context


class Attention(nn.Module):

    def __init__(self,
                 num_heads: int,
                 head_size: int,
                 scale: float,
                 num_kv_heads: int | None = None,
                 prefix: str = "",
                 attn_backend: type[AttentionBackend] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads}).")
        self.layer_name = prefix
        # Models are built under their device and dtype as torch defaults.
        self.backend = attn_backend or get_attn_backend(
            head_size, torch.get_default_dtype(), torch.get_default_device())
        self.impl = self.backend.get_impl_cls()(num_heads, head_size, scale,
                                                self.num_kv_heads)
        # [2, num_blocks, block_size, num_kv_heads, head_size]; None until the
        # model runner allocates the cache (and during the profiling run).
        self.kv_cache: torch.Tensor | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor) -> torch.Tensor:
        """query [T, H*D], key/value [T, Hkv*D] -> [T, H*D]."""
        attn_metadata = get_forward_context().attn_metadata
        return self.impl.forward(query, key, value, self.kv_cache,
                                 attn_metadata)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_size={self.head_size}, backend={self.backend.name}")
