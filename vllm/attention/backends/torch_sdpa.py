"""The reference attention backend: plain torch over the paged KV cache.

Runs on any device and is the one every faster backend is tested against. New
keys/values are written into their cache slots, then each sequence's whole context
is gathered from its blocks and attended with ``scaled_dot_product_attention``.
Decodes (one query token) and prefills (a chunk of tokens) are two padded batches.
"""
import torch
import torch.nn.functional as F

from vllm.attention.backends.abstract import (AttentionBackend, AttentionImpl,
                                              AttentionMetadata)


class TorchSDPABackend(AttentionBackend):
    name = "TORCH_SDPA"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return TorchSDPAImpl


def write_to_paged_cache(key: torch.Tensor, value: torch.Tensor,
                         kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, Hkv, D] at their slots of kv_cache [2, N, bs, Hkv, D]."""
    num_kv_heads, head_size = key.shape[1:]
    kv_cache[0].view(-1, num_kv_heads, head_size)[slot_mapping] = key
    kv_cache[1].view(-1, num_kv_heads, head_size)[slot_mapping] = value


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor,
                   max_len: int) -> torch.Tensor:
    """cache [N, bs, Hkv, D], block_tables [B, nb] -> [B, Hkv, max_len, D]."""
    batch, block_size = block_tables.shape[0], cache.shape[1]
    # Only the blocks that hold the longest context: tables may be wider.
    num_blocks = -(-max_len // block_size)
    blocks = cache[block_tables[:, :num_blocks]]  # [B, nb, bs, Hkv, D]
    context = blocks.view(batch, -1, *cache.shape[2:])[:, :max_len]
    return context.transpose(1, 2)


class TorchSDPAImpl(AttentionImpl):

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        m = attn_metadata
        num_tokens = m.num_actual_tokens
        q = query.view(num_tokens, self.num_heads, self.head_size)
        k = key.view(num_tokens, self.num_kv_heads, self.head_size)
        v = value.view(num_tokens, self.num_kv_heads, self.head_size)
        if kv_cache is not None:
            write_to_paged_cache(k, v, kv_cache, m.slot_mapping)

        out = torch.empty_like(q)
        nd = m.num_decodes
        # decode: one query per sequence, attends to its whole context
        if nd > 0:
            k_ctx, v_ctx = self._context(kv_cache, k, v, m, 0, nd)
            mask = _positions(m.max_seq_len, q)[None, :] < m.seq_lens[:nd, None]
            out[:nd] = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2),  # [nd, H, 1, D]
                k_ctx,
                v_ctx,
                attn_mask=mask[:, None, None, :],
                scale=self.scale,
                enable_gqa=True).squeeze(2)
        # prefill: chunks of several tokens, causal within the chunk
        if nd < m.num_seqs:
            out[nd:] = self._prefill(q, k, v, kv_cache, m)
        return out.view(num_tokens, self.num_heads * self.head_size)

    def _context(self, kv_cache: torch.Tensor | None, k: torch.Tensor,
                 v: torch.Tensor, m: AttentionMetadata, start: int,
                 end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values of sequences [start, end): [B', Hkv, L, D] each."""
        if kv_cache is not None:
            tables = m.block_tables[start:end]
            return (gather_context(kv_cache[0], tables, m.max_seq_len),
                    gather_context(kv_cache[1], tables, m.max_seq_len))
        # profiling run: no cache, a sequence's context is its new tokens
        k_pad, _ = _pad_by_sequence(k, m, start, end)
        v_pad, _ = _pad_by_sequence(v, m, start, end)
        return k_pad.transpose(1, 2), v_pad.transpose(1, 2)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor | None,
                 m: AttentionMetadata) -> torch.Tensor:
        nd, num_seqs = m.num_decodes, m.num_seqs
        q_pad, valid = _pad_by_sequence(q, m, nd, num_seqs)  # [P, Lq, H, D]
        k_ctx, v_ctx = self._context(kv_cache, k, v, m, nd, num_seqs)
        seq_lens = m.seq_lens[nd:]
        query_lens = m.query_start_loc[nd + 1:] - m.query_start_loc[nd:-1]
        # Query i of a sequence sits at absolute position
        # (seq_len - query_len) + i and sees keys at positions <= its own.
        q_pos = (seq_lens - query_lens)[:, None] + _positions(
            q_pad.shape[1], q)[None, :]  # [P, Lq]
        k_pos = _positions(k_ctx.shape[2], q)  # [L]
        mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [P, Lq, L]
        out = F.scaled_dot_product_attention(q_pad.transpose(1, 2),
                                             k_ctx,
                                             v_ctx,
                                             attn_mask=mask[:, None],
                                             scale=self.scale,
                                             enable_gqa=True)
        return out.transpose(1, 2)[valid]  # [T_prefill, H, D]


def _positions(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=torch.int32)


def _pad_by_sequence(x: torch.Tensor, m: AttentionMetadata, start: int,
                     end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of sequences [start, end) of x [T, ...] -> [B', Lq, ...] padded,
    plus the [B', Lq] mask of real tokens (row-major order = token order)."""
    starts = m.query_start_loc[start:end]
    lens = m.query_start_loc[start + 1:end + 1] - starts
    max_len = m.max_query_len
    idx = starts[:, None] + _positions(max_len, x)[None, :]  # [B', Lq]
    valid = _positions(max_len, x)[None, :] < lens[:, None]
    idx = torch.where(valid, idx, 0)
    return x[idx.long()], valid
