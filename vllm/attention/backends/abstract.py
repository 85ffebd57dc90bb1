"""The attention-backend interface every backend implements."""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One batch's layout, shared by every attention layer of a forward pass.

    The batch is flattened: ``T`` tokens from ``B`` sequences, sequences with a
    single query token ("decodes") first, then the longer ones ("prefills",
    possibly a chunk of a prompt after cached context). Built on the host by the
    model runner; tensors live on the model's device.
    """
    num_actual_tokens: int  # T
    num_decodes: int  # sequences whose query length is 1 (they come first)
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, context + new tokens per sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionImpl(ABC):
    """Computes attention for one layer and writes its new K/V to the cache."""

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """query [T, H*D], key/value [T, Hkv*D] -> output [T, H*D].

        ``kv_cache`` is None only in the profiling run: then every sequence's
        context is exactly its new tokens.
        """


class AttentionBackend(ABC):
    """A named family of attention kernels and the KV-cache layout they use."""

    name: str

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]:
        ...

    @classmethod
    def unsupported_reason(cls, head_size: int, dtype: torch.dtype,
                           device: torch.device) -> str | None:
        """Why this backend cannot run a layer of this shape, or None."""
        return None

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int) -> tuple[int, ...]:
        # [K/V, block, slot in block, kv head, head dim]
        return (2, num_blocks, block_size, num_kv_heads, head_size)
