"""The GPU attention backend: CUDA kernels from ``csrc/`` for writing the KV cache
and for decodes, a Triton flash-attention kernel for prefills.

Per layer and step:

1. ``reshape_and_cache`` writes the step's keys/values into their cache slots
   (``slot_mapping``);
2. decodes (one query token, the first ``num_decodes`` sequences) run the CUDA
   paged-attention kernel, which splits long contexts over several thread blocks
   (flash-decoding) and reads each KV head once for all its query heads (GQA);
3. the other sequences (whole prompts, prompt chunks after cached context,
   prefix-cache hits) run ``paged_prefill_attention``, which reads every key,
   cached or new, through the block table with a causal mask.

Both kernels read only the paged cache, so chunked prefill and prefix caching
need nothing special, and the decode path is safe to capture in a CUDA graph.
"""
import torch

from vllm import _custom_ops as ops
from vllm.attention.backends.abstract import (AttentionBackend, AttentionImpl,
                                              AttentionMetadata)


class TritonAttentionBackend(AttentionBackend):
    name = "TRITON_ATTN"
    supported_head_sizes = (64, 80, 96, 128, 256)
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return TritonAttentionImpl

    @classmethod
    def unsupported_reason(cls, head_size: int, dtype: torch.dtype,
                           device: torch.device) -> str | None:
        """Why this backend cannot run a layer, or None when it can."""
        if device.type != "cuda":
            return f"it needs a CUDA device (the model is on {device})"
        if not ops.HAS_C:
            return "vllm._C (the CUDA kernels of csrc/) is not built"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if head_size not in cls.supported_head_sizes:
            return (f"head_size {head_size} is not one of "
                    f"{cls.supported_head_sizes}")
        if dtype not in cls.supported_dtypes:
            return f"dtype {dtype} is not supported"
        return None


class TritonAttentionImpl(AttentionImpl):

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        from vllm.attention.ops.triton_prefill_attention import (
            paged_prefill_attention)
        if kv_cache is None:
            raise RuntimeError(f"{TritonAttentionBackend.name} needs a KV "
                               "cache (the model runner binds one).")
        m = attn_metadata
        num_tokens = m.num_actual_tokens
        q = query.view(num_tokens, self.num_heads, self.head_size)
        k = key.view(num_tokens, self.num_kv_heads, self.head_size)
        v = value.view(num_tokens, self.num_kv_heads, self.head_size)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        ops.reshape_and_cache(k, v, key_cache, value_cache, m.slot_mapping)

        out = torch.empty(num_tokens,
                          self.num_heads,
                          self.head_size,
                          dtype=query.dtype,
                          device=query.device)
        nd = m.num_decodes  # decodes come first, one token each
        if nd > 0:
            ops.paged_attention_decode(out[:nd], q[:nd], key_cache, value_cache,
                                       m.block_tables[:nd], m.seq_lens[:nd],
                                       self.scale, m.max_seq_len)
        if nd < m.num_seqs:
            paged_prefill_attention(out[nd:], q[nd:], key_cache, value_cache,
                                    m.block_tables[nd:],
                                    m.query_start_loc[nd:] - nd,
                                    m.seq_lens[nd:], m.max_query_len,
                                    self.scale)
        return out.view(num_tokens, self.num_heads * self.head_size)
