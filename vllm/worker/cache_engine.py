"""Allocates the paged KV cache (one tensor per attention layer) and the CPU
swap space, and copies blocks between them (swaps, copy-on-write)."""
import torch

from vllm.attention.backends.abstract import AttentionBackend
from vllm.config import CacheConfig, ModelConfig

_GiB = 1 << 30


def kv_cache_block_bytes(model_config: ModelConfig,
                         cache_config: CacheConfig) -> int:
    """Bytes of one block across all layers (keys and values)."""
    elem = torch.empty((), dtype=model_config.dtype).element_size()
    per_layer = (2 * cache_config.block_size * model_config.num_kv_heads *
                 model_config.head_size * elem)
    return per_layer * model_config.num_layers


def num_cpu_swap_blocks(model_config: ModelConfig,
                        cache_config: CacheConfig) -> int:
    """Blocks that fit in swap_space GiB of CPU memory."""
    block_bytes = kv_cache_block_bytes(model_config, cache_config)
    return int(cache_config.swap_space * _GiB) // block_bytes


class CacheEngine:

    def __init__(self,
                 model_config: ModelConfig,
                 cache_config: CacheConfig,
                 backend: type[AttentionBackend],
                 num_blocks: int,
                 device: torch.device,
                 num_cpu_blocks: int = 0) -> None:

        def shape(n: int) -> tuple[int, ...]:
            return backend.get_kv_cache_shape(n, cache_config.block_size,
                                              model_config.num_kv_heads,
                                              model_config.head_size)

        # One block more than the scheduler hands out: padding rows of CUDA
        # graphs write their keys and values there.
        self.pad_block = num_blocks
        # Zeros, not empty: attention multiplies masked-out (zero-weight)
        # slots by their values, and 0 * NaN from stale memory would be NaN.
        self.kv_caches = [
            torch.zeros(shape(num_blocks + 1),
                        dtype=model_config.dtype,
                        device=device) for _ in range(model_config.num_layers)
        ]
        pin = device.type == "cuda"
        self.cpu_caches = [
            torch.zeros(
                shape(num_cpu_blocks), dtype=model_config.dtype, pin_memory=pin)
            for _ in range(model_config.num_layers)
        ] if num_cpu_blocks else []

    @staticmethod
    def _copy(src: list[torch.Tensor], dst: list[torch.Tensor],
              mapping: list[tuple[int, int]]) -> None:
        if not mapping:
            return
        src_ids = torch.tensor([s for s, _ in mapping])
        dst_ids = torch.tensor([d for _, d in mapping])
        for src_cache, dst_cache in zip(src, dst):
            # [2, num_blocks, ...]: blocks are dimension 1
            blocks = src_cache[:, src_ids.to(src_cache.device)]
            dst_cache[:, dst_ids.to(dst_cache.device)] = blocks.to(
                dst_cache.device, non_blocking=True)

    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        """Copy (device block, CPU block) pairs to the CPU."""
        self._copy(self.kv_caches, self.cpu_caches, mapping)

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        """Copy (CPU block, device block) pairs back to the device."""
        self._copy(self.cpu_caches, self.kv_caches, mapping)

    def copy_blocks(self, mapping: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy (source, destination) device blocks. All
        sources are read before any destination is written."""
        self._copy(self.kv_caches, self.kv_caches, mapping)
