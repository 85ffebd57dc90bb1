from vllm.attention.backends.abstract import (AttentionBackend, AttentionImpl,
                                              AttentionMetadata)
from vllm.attention.layer import Attention

__all__ = [
    "Attention", "AttentionBackend", "AttentionImpl", "AttentionMetadata"
]
