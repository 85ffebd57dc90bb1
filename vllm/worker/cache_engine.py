"""Allocates the paged KV cache: one tensor per attention layer."""
import torch

from vllm.attention.backends.abstract import AttentionBackend
from vllm.config import CacheConfig, ModelConfig


def kv_cache_block_bytes(model_config: ModelConfig,
                         cache_config: CacheConfig) -> int:
    """Bytes of one block across all layers (keys and values)."""
    elem = torch.empty((), dtype=model_config.dtype).element_size()
    per_layer = (2 * cache_config.block_size * model_config.num_kv_heads *
                 model_config.head_size * elem)
    return per_layer * model_config.num_layers


class CacheEngine:

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 backend: type[AttentionBackend], num_blocks: int,
                 device: torch.device) -> None:
        shape = backend.get_kv_cache_shape(num_blocks, cache_config.block_size,
                                           model_config.num_kv_heads,
                                           model_config.head_size)
        # Zeros, not empty: attention multiplies masked-out (zero-weight)
        # slots by their values, and 0 * NaN from stale memory would be NaN.
        self.kv_caches = [
            torch.zeros(shape, dtype=model_config.dtype, device=device)
            for _ in range(model_config.num_layers)
        ]
