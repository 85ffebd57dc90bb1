"""Causal flash attention for prompt chunks over the paged KV cache (Triton).

One kernel serves whole prompts, chunks of a prompt after cached context
(chunked prefill, prefix-cache hits) and single-token rows, in one batch. The
K/V of every token a query may see, old and new, are already in the cache.

The algorithm (the forward pass of FlashAttention-2):

1. A program owns ``BLOCK_M`` consecutive queries of one sequence for one
   query head (GQA: query head ``h`` reads kv head ``h // (H // Hkv)``).
2. It walks the sequence's keys in tiles of ``BLOCK_N``. Key ``pos`` lives in
   slot ``pos % block_size`` of cache block ``block_tables[b, pos //
   block_size]``: each K/V tile is gathered row by row through the block
   table, so ``BLOCK_N`` and the cache block size are independent.
3. Online softmax, per query row, in fp32: with ``s = q @ k^T * scale`` for the
   tile, the running maximum ``m`` and sum ``l`` are updated,
   ``m' = max(m, rowmax(s))``, ``p = exp(s - m')``,
   ``l = l * exp(m - m') + rowsum(p)``, and the unnormalised output is
   rescaled the same way, ``acc = acc * exp(m - m') + p @ v``. After the last
   tile, ``out = acc / l``: exact softmax without ever holding a whole row.
   (Exponentials are base 2, with ``log2(e)`` folded into the scale.)
4. Causality: query ``i`` of a sequence with ``seq_len - query_len`` cached
   tokens sits at position ``seq_len - query_len + i`` and sees keys at
   positions up to its own. Key tiles entirely before the program's first
   query need no mask; the one or two tiles crossing the diagonal are masked;
   tiles entirely after its last query are never loaded.

Launch grid: ``(cdiv(max_query_len, BLOCK_M), num_seqs, num_heads)``; programs
past the end of a shorter sequence return at once.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))


def supported(head_size: int, dtype: torch.dtype) -> bool:
    """Whether :func:`paged_prefill_attention` handles this head size and
    dtype. Head sizes that are not a power of two are padded to the next one
    (masked), so 80 costs as much as 128."""
    return (dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 32 <= head_size <= 256 and head_size % 16 == 0)


@dataclass(frozen=True)
class TileConfig:
    """How a launch tiles the work (see :func:`tile_config`)."""
    block_m: int  # queries per program
    block_n: int  # keys per step of the inner loop
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads


def tile_config(head_size: int, dtype: torch.dtype,
                max_query_len: int) -> TileConfig:
    """Tile sizes and launch parameters, chosen for sm_90 (H100/H200).

    16-bit inputs run on the tensor cores (wgmma), where a warpgroup of 4
    warps computes 64 query rows: ``BLOCK_M`` 128 takes 8 warps, 64 takes 4
    (used when no sequence has more than 64 queries, to waste fewer rows).
    ``BLOCK_N`` is 64; three stages of K/V prefetch (cp.async) hide the
    latency of the block-table gather. Head dim 128: about 185 registers and
    98 KB of shared memory (of 227). Head dim 256 takes 64 x 32 tiles, 8
    warps (they split the 64 x 256 fp32 accumulator) and two stages: about
    170 registers, 98 KB. None of these configurations spills (ptxas for
    sm_90, triton 3.6).

    fp32 inputs (``input_precision="ieee"``: exact fp32 products, no TF32)
    run on the CUDA cores, where Triton keeps whole operand rows in
    registers; 16 x 16 tiles (32 x 32 for head dim <= 64) avoid spills.
    This path exists for exact parity tests, not speed.
    """
    head_dim = triton.next_power_of_2(head_size)
    if dtype == torch.float32:
        block = 32 if head_dim <= 64 else 16
        return TileConfig(block, block, num_warps=4, num_stages=1)
    if head_dim >= 256:
        return TileConfig(64, 32, num_warps=8, num_stages=2)
    if max_query_len <= 64:
        return TileConfig(64, 64, num_warps=4, num_stages=3)
    return TileConfig(128, 64, num_warps=8, num_stages=3)


@triton.jit
def _attend_key_tile(
    acc,  # [BLOCK_M, HEAD_DIM_PAD] fp32: unnormalised output so far
    m_i,  # [BLOCK_M] fp32: running row maximum of the scores
    l_i,  # [BLOCK_M] fp32: running row sum of exp2(score - m_i)
    q,  # [BLOCK_M, HEAD_DIM_PAD]
    q_pos,  # [BLOCK_M]: absolute positions of the queries
    k_cache_ptr,  # K cache + offset of the kv head
    v_cache_ptr,  # V cache + offset of the kv head
    block_table_ptr,  # this sequence's row of the block table
    start_n,  # position of the tile's first key
    seq_len,
    scale_log2,
    stride_kv_block,
    stride_kv_slot,
    offs_n,
    offs_d,
    d_valid,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Folds keys [start_n, start_n + BLOCK_N) into the running softmax."""
    k_pos = start_n + offs_n
    k_valid = k_pos < seq_len
    # Gather: key position -> cache block (block table) -> slot in the cache.
    block_ids = tl.load(block_table_ptr + k_pos // BLOCK_SIZE,
                        mask=k_valid,
                        other=0)
    slot_offsets = (block_ids.to(tl.int64) * stride_kv_block +
                    (k_pos % BLOCK_SIZE) * stride_kv_slot)
    kv_offsets = slot_offsets[:, None] + offs_d[None, :]
    kv_mask = k_valid[:, None] & d_valid[None, :]
    k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if CAUSAL_MASK:
        # Keys past a query's position (which include every key past
        # seq_len for a real query) get no weight. Rows past the end of
        # the sequence are padding: computed, never stored.
        s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    # Every real row has a visible key in the first tile it sees, so m_new
    # is finite and no exp2(-inf - -inf) = NaN can occur.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated so far
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype),
                 v,
                 acc * alpha[:, None],
                 input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale_log2,  # softmax scale * log2(e)
    queries_per_kv,  # H // Hkv
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_kv_block,
    stride_kv_slot,
    stride_kv_head,
    stride_block_table,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two (tile shapes must be)
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # The first grid axis is launched fastest: take query tiles last first,
    # so the tiles with the most keys start early and cheap ones fill the tail.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first = m_block * BLOCK_M  # this program's first query, within the seq.
    if first >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # cached tokens before this chunk

    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_valid = offs_m < query_len
    d_valid = offs_d < HEAD_DIM
    q_pos = context_len + offs_m

    tokens = (q_start + offs_m).to(tl.int64)
    q_offsets = (tokens[:, None] * stride_q_token + head * stride_q_head +
                 offs_d[None, :])
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    kv_head_offset = (head // queries_per_kv) * stride_kv_head
    k_head_ptr = k_cache_ptr + kv_head_offset
    v_head_ptr = v_cache_ptr + kv_head_offset
    # Keys before `diagonal` precede every query of this program: no mask.
    # Keys from `diagonal` to `kv_end` (the last query's position + 1) cross
    # the causal diagonal: masked. Keys past `kv_end` are not visited.
    diagonal = (context_len + first) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, context_len + first + BLOCK_M)
    for start_n in range(0, diagonal, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(  # CAUSAL_MASK=False
            acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, block_table_ptr,
            start_n, seq_len, scale_log2, stride_kv_block, stride_kv_slot,
            offs_n, offs_d, d_valid, BLOCK_SIZE, False, DOT_PRECISION)
    for start_n in range(diagonal, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(  # CAUSAL_MASK=True
            acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, block_table_ptr,
            start_n, seq_len, scale_log2, stride_kv_block, stride_kv_slot,
            offs_n, offs_d, d_valid, BLOCK_SIZE, True, DOT_PRECISION)

    out = acc / l_i[:, None]
    out_offsets = (tokens[:, None] * stride_out_token + head * stride_out_head +
                   offs_d[None, :])
    tl.store(out_ptr + out_offsets,
             out.to(out_ptr.dtype.element_ty),
             mask=q_mask)


def paged_prefill_attention(out: torch.Tensor, query: torch.Tensor,
                            key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int,
                            scale: float) -> None:
    """Causal attention of a batch of query chunks over the paged KV cache.

    Args:
        out: ``[T, H, D]``, written (every row of every sequence); its dtype
            may differ from the inputs'.
        query: ``[T, H, D]``; the head dim must be contiguous, the token
            stride is free (a view into a fused QKV tensor is fine).
        key_cache, value_cache: ``[N, block_size, Hkv, D]`` (one half of the
            ``[2, N, block_size, Hkv, D]`` cache), same strides, query's
            dtype. They already hold the K/V of every token of every
            sequence, including this step's.
        block_tables: ``[B, max_blocks]`` int32, the cache blocks of each
            sequence in order.
        query_start_loc: ``[B + 1]`` int32, cumulative query lengths starting
            at 0: sequence ``b``'s queries are tokens
            ``query_start_loc[b] .. query_start_loc[b + 1] - 1``.
        seq_lens: ``[B]`` int32, cached context + query tokens; query ``i``
            sits at position ``seq_len - query_len + i``.
        max_query_len: the longest query length (host int: sizes the grid).
        scale: softmax scale, usually ``D ** -0.5``.
    """
    num_tokens, num_heads, head_size = query.shape
    num_seqs = seq_lens.shape[0]
    _check_inputs(out, query, key_cache, value_cache, block_tables,
                  query_start_loc, seq_lens)
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return
    config = tile_config(head_size, query.dtype, max_query_len)
    grid = (triton.cdiv(max_query_len, config.block_m), num_seqs, num_heads)
    _paged_prefill_kernel[grid](
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale * _LOG2E,
        num_heads // key_cache.shape[2],
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_size,
        HEAD_DIM_PAD=triton.next_power_of_2(head_size),
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _check_inputs(out: torch.Tensor, query: torch.Tensor,
                  key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                  seq_lens: torch.Tensor) -> None:
    """Shape, dtype and layout checks (host only: no device sync)."""
    if query.dim() != 3 or out.shape != query.shape:
        raise ValueError(f"query and out must be [T, H, D] alike, got "
                         f"{tuple(query.shape)} and {tuple(out.shape)}")
    num_heads, head_size = query.shape[1:]
    if not supported(head_size, query.dtype):
        raise ValueError(f"unsupported head size {head_size} or dtype "
                         f"{query.dtype}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError("key_cache and value_cache must be "
                         "[N, block_size, Hkv, D] alike")
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_size or num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads of size {head_size} do "
                         f"not fit a cache of {num_kv_heads} kv heads of size "
                         f"{key_cache.shape[3]}")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache must have equal strides")
    if not (key_cache.dtype == value_cache.dtype == query.dtype):
        raise ValueError("query, key_cache and value_cache must share a dtype")
    if any(t.stride(-1) != 1 for t in (out, query, key_cache)):
        raise ValueError("the head dimension must be contiguous")
    index_tensors = {
        "block_tables": block_tables,
        "query_start_loc": query_start_loc,
        "seq_lens": seq_lens,
    }
    for name, t in index_tensors.items():
        if t.dtype != torch.int32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be int32 with a contiguous last "
                             f"dimension, got {t.dtype}, {t.stride()}")
    if (block_tables.shape[0] != seq_lens.shape[0]
            or query_start_loc.shape[0] != seq_lens.shape[0] + 1):
        raise ValueError("block_tables, query_start_loc and seq_lens "
                         "disagree on the number of sequences")
    if seq_lens.shape[0] > 65535:
        raise ValueError("at most 65535 sequences per call (grid axis 1)")
