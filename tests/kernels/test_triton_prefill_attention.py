"""The Triton prefill kernel against the torch reference backend.

On a GPU (marked ``cuda``): the full matrix of head sizes, dtypes, GQA ratios
and cache block sizes on batches that mix fresh prompts, chunks after cached
context and single-token rows. Skipped without triton.

Without a GPU, Triton's interpreter runs the same tests on CPU tensors with
shorter sequences (``TRITON_INTERPRET`` must be set before triton is
imported; triton 3.6's interpreter needs numpy < 2.4)::

    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_prefill_attention.py

Every cache slot that holds no token (padding columns of the block tables,
the tail of each sequence's last block) is NaN, and so is ``out`` before the
call: a read of a wrong slot or a row left unwritten fails the test.
"""
import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton",
                             reason="triton is not installed (GPU installs)")

from vllm.attention.backends.abstract import AttentionMetadata  # noqa: E402
from vllm.attention.backends.torch_sdpa import TorchSDPAImpl  # noqa: E402
from vllm.attention.ops import triton_prefill_attention as ops  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = [] if INTERPRET else [pytest.mark.cuda]

# (cached context, query length) per sequence: fresh prompts, chunks after
# context, single-token rows, an empty chunk; lengths around tile edges.
if INTERPRET:
    MIXED = [(0, 40), (0, 1), (33, 7), (0, 17), (20, 1), (16, 16), (5, 15),
             (3, 1), (9, 0), (70, 33)]
    LENGTHS = [1, 7, 15, 16, 17, 40]
else:
    MIXED = [(0, 1000), (0, 1), (513, 7), (0, 17), (100, 1), (16, 16), (0, 513),
             (1000, 15), (7, 100), (3, 1), (15, 17), (0, 16), (200, 0),
             (300, 129)]
    LENGTHS = [1, 7, 15, 16, 17, 100, 513, 1000]

HEAD_SIZES = [64, 80, 96, 128, 256]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


@dataclass
class Batch:
    query: torch.Tensor  # [T, H, D], a strided view into a fused QKV buffer
    kv_cache: torch.Tensor  # [2, N, block_size, Hkv, D], NaN where no token
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    scale: float


def make_batch(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int,
               head_size: int, block_size: int, dtype: torch.dtype,
               seed: int) -> Batch:
    """Random queries and cache for sequences given as (context, query len);
    each sequence's blocks are scattered over the cache in random order."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [context + query_len for context, query_len in seqs]
    query_lens = [query_len for _, query_len in seqs]
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # + 2 unused, + 1 all-NaN block
    nan_block = num_blocks - 1
    physical = torch.randperm(num_blocks - 1, generator=gen).tolist()
    # Padding columns point at the NaN block.
    block_tables = torch.full((len(seqs), max(blocks_per_seq) + 1),
                              nan_block,
                              dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor(physical[:n])
        physical = physical[n:]

    kv_cache = torch.randn(2,
                           num_blocks,
                           block_size,
                           num_kv_heads,
                           head_size,
                           generator=gen)
    kv_cache[:, nan_block] = float("nan")
    for b, n in enumerate(seq_lens):
        if n % block_size:
            kv_cache[:, block_tables[b, n // block_size], n % block_size:] = \
                float("nan")

    num_tokens = sum(query_lens)
    # Larger queries make sharper softmax rows (a harder test of rescaling).
    qkv = 2 * torch.randn(
        num_tokens, num_heads + 2 * num_kv_heads, head_size, generator=gen)
    query = qkv.to(dtype).to(DEVICE)[:, :num_heads]
    query_start_loc = torch.tensor([0] + query_lens,
                                   dtype=torch.int32).cumsum(0).to(torch.int32)
    return Batch(query=query,
                 kv_cache=kv_cache.to(dtype).to(DEVICE),
                 block_tables=block_tables.to(DEVICE),
                 query_start_loc=query_start_loc.to(DEVICE),
                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(DEVICE),
                 max_query_len=max(query_lens),
                 scale=head_size**-0.5)


def reference(batch: Batch) -> torch.Tensor:
    """TorchSDPAImpl in float32 on the same (rounded) inputs: [T, H, D]."""
    num_tokens, num_heads, head_size = batch.query.shape
    kv_cache = batch.kv_cache.float().nan_to_num(0.0)
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    seq_lens = batch.seq_lens.tolist()
    query_starts = batch.query_start_loc.tolist()
    # The slots of this step's tokens: the reference writes the K/V there,
    # so it is handed exactly what the cache holds.
    block_tables = batch.block_tables.tolist()
    slots = []
    for b, seq_len in enumerate(seq_lens):
        query_len = query_starts[b + 1] - query_starts[b]
        for pos in range(seq_len - query_len, seq_len):
            block = block_tables[b][pos // block_size]
            slots.append(block * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    metadata = AttentionMetadata(num_actual_tokens=num_tokens,
                                 num_decodes=0,
                                 max_query_len=batch.max_query_len,
                                 max_seq_len=max(seq_lens),
                                 query_start_loc=batch.query_start_loc,
                                 seq_lens=batch.seq_lens,
                                 block_tables=batch.block_tables,
                                 slot_mapping=slot_mapping)
    key = kv_cache[0].view(-1, num_kv_heads, head_size)[slot_mapping]
    value = kv_cache[1].view(-1, num_kv_heads, head_size)[slot_mapping]
    impl = TorchSDPAImpl(num_heads, head_size, batch.scale, num_kv_heads)
    out = impl.forward(batch.query.float().reshape(num_tokens, -1),
                       key.reshape(num_tokens, -1),
                       value.reshape(num_tokens, -1), kv_cache, metadata)
    return out.view(num_tokens, num_heads, head_size)


def run_kernel(batch: Batch, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.full(batch.query.shape,
                         float("nan"),
                         dtype=batch.query.dtype,
                         device=DEVICE)
    ops.paged_prefill_attention(out, batch.query, batch.kv_cache[0],
                                batch.kv_cache[1], batch.block_tables,
                                batch.query_start_loc, batch.seq_lens,
                                batch.max_query_len, batch.scale)
    return out


def check(batch: Batch, out: torch.Tensor) -> None:
    ref = reference(batch)
    assert not torch.isnan(out).any(), "rows left unwritten or NaN read"
    assert out.dtype == batch.query.dtype
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < tolerance(batch.query.dtype), f"relative error {err:.2e}"


def skip_if_unsupported_here(dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        # It multiplies the raw uint16 storage of bf16 tiles.
        pytest.skip("Triton's interpreter has no bf16 tl.dot")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_head_sizes_and_dtypes(head_size: int, dtype: torch.dtype) -> None:
    skip_if_unsupported_here(dtype)
    batch = make_batch(MIXED,
                       num_heads=8,
                       num_kv_heads=2,
                       head_size=head_size,
                       block_size=16,
                       dtype=dtype,
                       seed=head_size)
    check(batch, run_kernel(batch))


@pytest.mark.parametrize("queries_per_kv", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_gqa_and_block_sizes(block_size: int, queries_per_kv: int) -> None:
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    num_kv_heads = 1 if INTERPRET else 2
    batch = make_batch(MIXED,
                       num_heads=num_kv_heads * queries_per_kv,
                       num_kv_heads=num_kv_heads,
                       head_size=128,
                       block_size=block_size,
                       dtype=dtype,
                       seed=block_size + queries_per_kv)
    check(batch, run_kernel(batch))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_batches(dtype: torch.dtype) -> None:
    """Random mixes of prompt, chunk and single-token rows, random shapes."""
    skip_if_unsupported_here(dtype)
    rng = random.Random(int(dtype.itemsize))
    for _ in range(3):
        seqs = [(rng.choice([0, 0] + LENGTHS), rng.choice(LENGTHS))
                for _ in range(rng.randint(1, 6))]
        num_kv_heads = rng.choice([1, 2])
        batch = make_batch(seqs,
                           num_heads=num_kv_heads * rng.choice([1, 2, 4, 8]),
                           num_kv_heads=num_kv_heads,
                           head_size=rng.choice(HEAD_SIZES),
                           block_size=rng.choice([8, 16, 32]),
                           dtype=dtype,
                           seed=rng.randrange(1000))
        check(batch, run_kernel(batch))


@pytest.mark.parametrize(
    "block_m, block_n, block_size",
    [
        (16, 16, 32),  # several key tiles per cache block
        (32, 64, 8),  # several cache blocks per key tile
        (64, 32, 16),  # BLOCK_N < BLOCK_M: two masked tiles per diagonal
    ])
def test_tile_shapes(monkeypatch: pytest.MonkeyPatch, block_m: int,
                     block_n: int, block_size: int) -> None:
    config = ops.TileConfig(block_m, block_n, num_warps=4, num_stages=2)
    monkeypatch.setattr(ops, "tile_config", lambda *args: config)
    batch = make_batch(MIXED,
                       num_heads=4,
                       num_kv_heads=2,
                       head_size=80,
                       block_size=block_size,
                       dtype=torch.float16,
                       seed=block_m + block_n)
    check(batch, run_kernel(batch))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_query_len", [1, 64])
def test_short_queries(max_query_len: int, dtype: torch.dtype) -> None:
    """Decode-like rows only (query length 1, from position 0 on), and short
    chunks after long contexts (16-bit: the BLOCK_M = 64 configuration)."""
    skip_if_unsupported_here(dtype)
    long = LENGTHS[-1]
    seqs = [(0, 1), (1, 1), (16, 1), (long, 1), (31, 1)]
    if max_query_len > 1:
        seqs += [(long, 7), (long + 3, 64), (5, 17), (0, 33)]
    batch = make_batch(seqs,
                       num_heads=8,
                       num_kv_heads=2,
                       head_size=128,
                       block_size=16,
                       dtype=dtype,
                       seed=max_query_len)
    assert batch.max_query_len == max_query_len
    check(batch, run_kernel(batch))


def test_strided_out_and_other_out_dtype() -> None:
    """``out`` may be a strided view and of another dtype than the query."""
    batch = make_batch(MIXED,
                       num_heads=4,
                       num_kv_heads=2,
                       head_size=64,
                       block_size=16,
                       dtype=torch.float16,
                       seed=7)
    buffer = torch.full((batch.query.shape[0], 6, 64),
                        float("nan"),
                        dtype=torch.float32,
                        device=DEVICE)
    out = buffer[:, 1:5]
    run_kernel(batch, out)
    assert torch.isnan(buffer[:, [0, 5]]).all(), "wrote outside out"
    ref = reference(batch)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"relative error {err:.2e}"


def test_supported_and_checks() -> None:
    assert ops.supported(128, torch.bfloat16)
    assert ops.supported(80, torch.float32)
    assert not ops.supported(72, torch.float16)
    assert not ops.supported(512, torch.float16)
    assert not ops.supported(128, torch.float64)
    batch = make_batch([(0, 4)], 2, 1, 64, 16, torch.float16, seed=0)
    with pytest.raises(ValueError, match="int32"):
        ops.paged_prefill_attention(torch.empty_like(batch.query), batch.query,
                                    batch.kv_cache[0], batch.kv_cache[1],
                                    batch.block_tables.long(),
                                    batch.query_start_loc, batch.seq_lens,
                                    batch.max_query_len, batch.scale)
