"""paged_attention_decode against the reference backend's math (the context
gathered from the paged cache with torch_sdpa.gather_context, then
scaled_dot_product_attention), computed in float32."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.kernels.utils import (DTYPES, KERNEL_MARKS, REL_TOL, poisoned,
                                 rel_err)
from vllm import _custom_ops as ops
from vllm.attention.backends.abstract import AttentionMetadata
from vllm.attention.backends.torch_sdpa import TorchSDPAImpl, gather_context

pytestmark = KERNEL_MARKS

HEAD_SIZES = [64, 80, 96, 128, 256]
BLOCK_SIZES = [8, 16, 32]


class PagedCache:
    """A random paged KV cache holding the given sequences in shuffled
    blocks. Every slot that belongs to no sequence (spare blocks, the tail
    of each last block, and where padded block-table entries point) is
    NaN, so a kernel that reads past a sequence's end produces NaN."""

    def __init__(self, seq_lens: list[int], num_kv_heads: int, head_size: int,
                 block_size: int, dtype: torch.dtype) -> None:
        self.seq_lens = seq_lens
        self.block_size = block_size
        blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq) + 2
        self.kv_cache = torch.randn(2,
                                    num_blocks,
                                    block_size,
                                    num_kv_heads,
                                    head_size,
                                    dtype=dtype,
                                    device="cuda")
        perm = torch.randperm(num_blocks).tolist()
        spare = perm[-1]  # never owned: padding entries point here
        max_blocks = max(blocks_per_seq + [1]) + 1
        tables = torch.full((len(seq_lens), max_blocks),
                            spare,
                            dtype=torch.int32)
        owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        start = 0
        for b, n in enumerate(seq_lens):
            blocks = perm[start:start + blocks_per_seq[b]]
            start += blocks_per_seq[b]
            tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            tokens = torch.arange(n)
            slots = tables[b, tokens // block_size].long() * block_size + (
                tokens % block_size)
            owned[slots] = True
        flat = self.kv_cache.view(2, num_blocks * block_size, num_kv_heads,
                                  head_size)
        flat[:, ~owned.cuda()] = float("nan")
        self.block_tables = tables.cuda()
        self.seq_lens_t = torch.tensor(seq_lens,
                                       dtype=torch.int32,
                                       device="cuda")


def reference_decode(query: torch.Tensor, cache: PagedCache,
                     scale: float) -> torch.Tensor:
    """[B, H, D] float32; rows of empty sequences are zero."""
    out = torch.zeros(query.shape, dtype=torch.float32, device="cuda")
    kv = cache.kv_cache.float()
    with sdpa_kernel(SDPBackend.MATH):  # plain float32 math
        for b, n in enumerate(cache.seq_lens):
            if n == 0:
                continue
            table = cache.block_tables[b:b + 1]
            k = gather_context(kv[0], table, n)  # [1, Hkv, n, D]
            v = gather_context(kv[1], table, n)
            q = query[b:b + 1].float().unsqueeze(2)  # [1, H, 1, D]
            out[b] = F.scaled_dot_product_attention(
                q, k, v, scale=scale, enable_gqa=True).squeeze(2)[0]
    return out


def run_decode(query: torch.Tensor,
               cache: PagedCache,
               scale: float,
               max_seq_len: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = poisoned(query.shape, query.dtype)
    if max_seq_len is None:
        max_seq_len = max(cache.seq_lens)
    ops.paged_attention_decode(out, query, cache.kv_cache[0], cache.kv_cache[1],
                               cache.block_tables, cache.seq_lens_t, scale,
                               max_seq_len)
    return out


def check(out: torch.Tensor, ref: torch.Tensor, seq_lens: list[int],
          dtype: torch.dtype) -> None:
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert out[b].eq(0).all(), f"row {b} (empty) is not zero"
            continue
        err = rel_err(out[b], ref[b])
        assert err < REL_TOL[dtype], (f"row {b} (seq_len {n}): relative "
                                      f"error {err:.2e}")


def _mixed_lengths(block_size: int) -> list[int]:
    return [
        0, 1, block_size - 1, block_size, block_size + 1, 37, 511, 512, 513,
        1000, 2049
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("queries_per_kv", [1, 2, 4, 8])
def test_decode_shapes(dtype: torch.dtype, head_size: int, block_size: int,
                       queries_per_kv: int):
    torch.manual_seed(head_size * 100 + block_size + queries_per_kv)
    num_kv_heads = 2
    seq_lens = _mixed_lengths(block_size)
    cache = PagedCache(seq_lens, num_kv_heads, head_size, block_size, dtype)
    query = torch.randn(len(seq_lens),
                        num_kv_heads * queries_per_kv,
                        head_size,
                        dtype=dtype,
                        device="cuda")
    scale = head_size**-0.5
    out = run_decode(query, cache, scale)
    check(out, reference_decode(query, cache, scale), seq_lens, dtype)


@pytest.mark.parametrize("batch_size", [1, 3, 17, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 8), (32, 8), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_batch_sizes(batch_size: int, num_heads: int, num_kv_heads: int,
                            dtype: torch.dtype):
    """Random lengths up to 2100: partition sizes 512 down to 64 all occur
    (the op picks them from the grid size; batch 1 with 8 kv heads: 64)."""
    torch.manual_seed(batch_size)
    seq_lens = torch.randint(1, 2100, (batch_size, )).tolist()
    if batch_size > 2:
        seq_lens[1] = 0
    cache = PagedCache(seq_lens, num_kv_heads, 128, 16, dtype)
    query = torch.randn(batch_size, num_heads, 128, dtype=dtype, device="cuda")
    out = run_decode(query, cache, 128**-0.5)
    check(out, reference_decode(query, cache, 128**-0.5), seq_lens, dtype)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(3, 1), (10, 2), (7, 1),
                                                    (12, 1), (16, 1), (40, 8),
                                                    (64, 4)])
def test_decode_irregular_gqa(num_heads: int, num_kv_heads: int):
    """Query groups that are not a power of two, or larger than one CTA's
    tile of 8 heads (ragged tiles, several CTAs per kv head)."""
    torch.manual_seed(num_heads)
    seq_lens = [5, 300, 1025, 0]
    cache = PagedCache(seq_lens, num_kv_heads, 128, 16, torch.bfloat16)
    query = torch.randn(len(seq_lens),
                        num_heads,
                        128,
                        dtype=torch.bfloat16,
                        device="cuda")
    out = run_decode(query, cache, 0.1)
    check(out, reference_decode(query, cache, 0.1), seq_lens, torch.bfloat16)


@pytest.mark.parametrize("max_seq_len", [300, 512, 4096, 40960, 400_000])
def test_decode_max_seq_len_is_an_upper_bound(max_seq_len: int):
    """With CUDA graphs max_seq_len is max_model_len: most partitions of
    the grid then have nothing to do. 400,000 gives more partitions than
    the in-kernel merge takes: the reduce kernel merges. A second call gives
    the same output (the merge's arrival counters were reset)."""
    torch.manual_seed(max_seq_len)
    seq_lens = [300, 1, 0, 129, 17]
    cache = PagedCache(seq_lens, 2, 64, 16, torch.bfloat16)
    query = torch.randn(len(seq_lens),
                        4,
                        64,
                        dtype=torch.bfloat16,
                        device="cuda")
    out = run_decode(query, cache, 0.125, max_seq_len=max_seq_len)
    check(out, reference_decode(query, cache, 0.125), seq_lens, torch.bfloat16)
    assert torch.equal(run_decode(query, cache, 0.125, max_seq_len), out)


def test_decode_all_empty_sequences_write_zeros():
    cache = PagedCache([0, 0, 0], 2, 128, 16, torch.bfloat16)
    query = torch.randn(3, 8, 128, dtype=torch.bfloat16, device="cuda")
    for max_seq_len in (0, 1, 5000):
        out = run_decode(query, cache, 1.0, max_seq_len=max_seq_len)
        assert out.eq(0).all()


def test_decode_strided_query_and_out():
    """query as a slice of a fused [B, (H + 2 Hkv) * D] tensor (read in
    place), also at an unaligned offset (copied by the op), and out as a
    strided view."""
    torch.manual_seed(7)
    seq_lens = [33, 700, 1]
    num_heads, num_kv_heads, head_size = 8, 2, 96
    cache = PagedCache(seq_lens, num_kv_heads, head_size, 32, torch.float16)
    # 8 spare columns keep the row stride a multiple of 16 bytes
    fused = torch.randn(3, (num_heads + 2 * num_kv_heads) * head_size + 8,
                        dtype=torch.float16,
                        device="cuda")
    for offset in (0, 1):
        query = fused[:, offset:offset + num_heads * head_size].view(
            3, num_heads, head_size)
        out_buf = poisoned((3, num_heads + 1, head_size), torch.float16)
        out = out_buf[:, 1:]
        run_decode(query, cache, 0.3, out=out)
        check(out, reference_decode(query, cache, 0.3), seq_lens, torch.float16)
        assert out_buf[:, 0].isnan().all()  # nothing written outside out


def test_decode_matches_torch_sdpa_backend():
    """reshape_and_cache + paged_attention_decode, as a CUDA backend would
    run them, against TorchSDPAImpl on the same decode batch."""
    torch.manual_seed(11)
    num_heads, num_kv_heads, head_size, block_size = 16, 8, 128, 16
    context = [17, 600, 1, 2047]  # tokens already cached
    seq_lens = [n + 1 for n in context]
    dtype = torch.bfloat16
    cache = PagedCache(seq_lens, num_kv_heads, head_size, block_size, dtype)
    # the NaN poison is for the kernel alone; the reference reads padding
    cache.kv_cache.nan_to_num_(0.0)
    batch = len(seq_lens)
    positions = torch.tensor(context, device="cuda")
    slots = (cache.block_tables[torch.arange(batch, device="cuda"),
                                positions // block_size].long() * block_size +
             positions % block_size)
    metadata = AttentionMetadata(num_actual_tokens=batch,
                                 num_decodes=batch,
                                 max_query_len=1,
                                 max_seq_len=max(seq_lens),
                                 query_start_loc=torch.arange(batch + 1,
                                                              dtype=torch.int32,
                                                              device="cuda"),
                                 seq_lens=cache.seq_lens_t,
                                 block_tables=cache.block_tables,
                                 slot_mapping=slots)
    q = torch.randn(batch, num_heads * head_size, dtype=dtype, device="cuda")
    k = torch.randn(batch, num_kv_heads * head_size, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    scale = head_size**-0.5
    impl = TorchSDPAImpl(num_heads, head_size, scale, num_kv_heads)
    kv_ref = cache.kv_cache.clone()
    ref = impl.forward(q, k, v, kv_ref, metadata)

    kv = cache.kv_cache
    ops.reshape_and_cache(k.view(batch, num_kv_heads, head_size),
                          v.view(batch, num_kv_heads, head_size), kv[0], kv[1],
                          slots)
    assert torch.equal(kv, kv_ref)
    out = poisoned((batch, num_heads, head_size), dtype)
    ops.paged_attention_decode(out, q.view(batch, num_heads,
                                           head_size), kv[0], kv[1],
                               cache.block_tables, cache.seq_lens_t, scale,
                               max(seq_lens))
    assert rel_err(out.view(batch, -1), ref) < 1e-2


def test_decode_rejects_bad_inputs():
    cache = PagedCache([10], 1, 64, 16, torch.float16)
    query = torch.randn(1, 2, 64, dtype=torch.float16, device="cuda")

    def decode(query: torch.Tensor, kv: torch.Tensor,
               block_tables: torch.Tensor) -> None:
        ops.paged_attention_decode(torch.empty_like(query), query, kv[0], kv[1],
                                   block_tables, cache.seq_lens_t, 1.0, 10)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float16, device="cuda")

    with pytest.raises(RuntimeError, match="head size 72"):
        decode(zeros(1, 2, 72), zeros(2, 2, 16, 1, 72), cache.block_tables)
    with pytest.raises(RuntimeError, match="block size 64"):
        decode(query, zeros(2, 2, 64, 1, 64), cache.block_tables)
    with pytest.raises(RuntimeError, match="block_tables must be Int"):
        decode(query, cache.kv_cache, cache.block_tables.long())
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        decode(zeros(1, 3, 64), zeros(2, 2, 16, 2, 64), cache.block_tables)
    with pytest.raises(RuntimeError, match="key_cache must be Half"):
        decode(query, cache.kv_cache.float(), cache.block_tables)
