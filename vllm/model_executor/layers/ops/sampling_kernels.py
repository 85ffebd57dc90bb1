"""Triton kernels for the sampler's passes over the whole vocabulary.

They read [N, V] logits (any float dtype, computed in float32; columns
contiguous, rows at any stride) in tiles of ``_TILE`` columns (the next
tile's load is issued before the current one is used, to keep bytes in
flight). A sampling step is two launches over (row, chunk of
``_CHUNK_TILES`` tiles), so that every SM has work:

- ``_stats_kernel``: each logit is edited where it is read (``_edit``:
  logit_bias, then the repetition, frequency and presence penalties from the
  token counts that ``SamplingState`` keeps on the device); per chunk, the
  max, count, sum and sum of squares of the edited logits (each row's max
  and σ: top-nσ and min_p thresholds) and, for logprobs, the max and
  sum(exp) of the raw ones and the maximum of each segment of ``_SEGMENT``
  raw logits.
- ``_draw_kernel``: each chunk's best score x - T log q over the kept
  (edited) logits, with Gumbel noise made in the kernel (Philox); greedy
  rows take the argmax. With a threshold rule (top-nσ, min_p) the stats
  pass also stores each segment's edited max, and the draw reads only the
  segments that reach the row's threshold (greedy rows: its max), a few
  per row; otherwise every segment. A seeded row's noise is keyed by its
  step's key and depends only on that key and the token id
  (``seeded_log_q`` gives the same noise at any token ids), so which
  segments a draw reads never changes its token. The last chunk of a row
  to finish (an atomic count) then finishes the row (``_finish_row``): the
  best chunk's token, then its logprob and rank and the top-k logprobs,
  read from the few segments whose maxima say they matter, and what a
  ``StepRecord`` asks for the next step (the token into the penalty
  counts, a seeded row's next key). What the host reads (tokens,
  logprobs) is written into views of one buffer: one copy.

``sample`` runs them; ``topk_logprobs`` runs ``_stats_kernel`` and
``_finish_kernel`` (``_finish_row`` of each row) for given tokens. The
intermediate results live in a buffer reused by the next call of the same
shape (``_workspace``). Also: ``edit`` (the same edits in place on a float32 copy,
for the top-k/top-p path, which sorts with torch), ``row_stats`` (each
row's max and σ) and ``mark_tokens`` (``SamplingState``'s counts and seen
bits).

Import it only where triton is installed (``ops.get_sampling_kernels``).
"""
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from vllm.model_executor.layers.ops.launch_graphs import LaunchGraphs
from vllm.model_executor.sampling_metadata import KEY_MASK, KEY_STEP

if TYPE_CHECKING:
    from vllm.model_executor.sampling_metadata import (LogitBias, PenaltyCounts,
                                                       StepRecord)

# Columns a program reads per step (8 per thread with 4 warps), seen as
# [_TILE // _SEGMENT, _SEGMENT] where segments are reduced. Larger tiles
# need over 200 registers a thread: two programs per SM, too few to hide
# the latency of the loads (1,024 measured faster than 2,048 and 512).
_TILE = 1024
_SEGMENT = 128
_NUM_WARPS = 4
# Tiles of one (row, chunk) program: 16,384 columns, about 10 programs per
# row of a 150k vocabulary.
_CHUNK_TILES = 16
# The count of larger logits (a token's rank) looks at _COUNT_WINDOW
# segment maxima at a time (sorting more costs registers in every program
# of the draw) and reads the logits of _SEGMENT_BLOCK segments at a time.
_SEGMENT_BLOCK = 32
_COUNT_WINDOW = tl.constexpr(256)
# Bias entries a program counts at once to find its first one.
_BIAS_BLOCK = tl.constexpr(64)
# Past this k, top-k logprobs come from torch.topk: the segments holding
# them would cover most of the row.
_MAX_KERNEL_TOP_K = 64
# Per (row, chunk) statistics: edited max, finite count, sum and sum of
# squares (shifted by the row's first logit), raw max, raw sum(exp(x - max)).
_NUM_STATS = 6
# exp(x) is computed as exp2(x * log2(e)) (one instruction with ftz).
_LOG2E = tl.constexpr(1.4426950408889634)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


# triton.cdiv and triton.next_power_of_2 are constexpr functions, a few
# microseconds a call from Python: these are plain integer arithmetic.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _columns_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------ jit helpers
@triton.jit
def _load(x_row, cols, vocab_size):
    """Logits at ``cols`` in float32, -inf past the row."""
    x = tl.load(x_row + cols, mask=cols < vocab_size, other=float("-inf"))
    if x.dtype == tl.bfloat16:
        # bf16 is the high half of a float32: one instruction a logit (the
        # conversion takes two for every other one).
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(
            tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _edit_params(row, bias_starts_ptr, row_slots_ptr, presence_ptr,
                 frequency_ptr, repetition_ptr, HAS_BIAS: tl.constexpr,
                 HAS_PENALTIES: tl.constexpr):
    """Row ``row``'s range of bias entries, its slot of the counts (-1: no
    penalties) and its presence, frequency and repetition penalties (the
    last with its reciprocal, see ``_penalise``)."""
    # Tensors even without bias: they are carried through the tile loops.
    bias_lo = row.to(tl.int64) * 0
    bias_hi = bias_lo
    if HAS_BIAS:
        bias_lo = tl.load(bias_starts_ptr + row)
        bias_hi = tl.load(bias_starts_ptr + row + 1)
    slot = -1
    presence = 0.0
    frequency = 0.0
    repetition = 1.0
    if HAS_PENALTIES:
        slot = tl.load(row_slots_ptr + row)
        presence = tl.load(presence_ptr + row)
        frequency = tl.load(frequency_ptr + row)
        repetition = tl.load(repetition_ptr + row)
    inverse = tl.math.div_rn(1.0, repetition)
    return bias_lo, bias_hi, slot, presence, frequency, (repetition, inverse)


@triton.jit
def _bias_column(bias_keys_ptr, entry, bias_hi, row_start):
    """The column of the row's bias entry ``entry``; past the row's last
    entry, a column no tile reaches."""
    return tl.load(bias_keys_ptr + entry, mask=entry < bias_hi,
                   other=1 << 62) - row_start


@triton.jit
def _first_bias_entry(bias_keys_ptr, bias_lo, bias_hi, row_start, first_col,
                      HAS_BIAS: tl.constexpr):
    """``_edit``'s bias entry and its column for tiles from column
    ``first_col`` on: the entries before it are counted in one load of the
    row's first ``_BIAS_BLOCK`` (a program in the middle of a row does not
    wait for them one after another; ``_add_bias`` walks past any more)."""
    entry = bias_lo
    next_col = bias_lo
    if HAS_BIAS:
        block = tl.arange(0, _BIAS_BLOCK)
        cols = _bias_column(bias_keys_ptr, bias_lo + block, bias_hi, row_start)
        entry += tl.sum((cols < first_col).to(tl.int64), axis=0)
        next_col = _bias_column(bias_keys_ptr, entry, bias_hi, row_start)
    return entry, next_col


@triton.jit
def _add_bias(x, cols, start, stop, row_start, bias_keys_ptr, bias_values_ptr,
              entry, next_col, bias_hi):
    """``_edit``'s logit_bias. The row's bias entries are sorted by column
    and tiles come in column order, so a tile looks only at its own: one
    comparison for a tile without any."""
    while next_col < stop:
        if next_col >= start:
            x = tl.where(cols == next_col, x + tl.load(bias_values_ptr + entry),
                         x)
        entry += 1
        next_col = _bias_column(bias_keys_ptr, entry, bias_hi, row_start)
    return x, entry, next_col


@triton.jit
def _seen_bits(seen_row, runs, cols, start, vocab_size):
    """Whether the seen bit of each of ``cols`` is set. ``cols`` come in
    runs of 8 from a multiple of 8 (a thread's columns), ``runs`` (any
    shape) their first columns // 8: one word load per run. ``start``, a
    multiple of 32 at or before the first run, is the base of the addresses
    (a scalar, no 64-bit arithmetic per run)."""
    runs = tl.reshape(runs, [runs.numel]) - start // 8
    # (Bits of columns past the row are never set.)
    word = tl.load(seen_row + start // 32 + (runs >> 2),
                   mask=runs * 8 < vocab_size - start,
                   other=0)
    # Each column's bit in place in the word: one instruction a bit, not a
    # shift and a mask (the masks are the same every tile).
    bits = word[:, None] & ((1 << tl.arange(0, 8))[None, :] <<
                            ((runs & 3) * 8)[:, None])
    return tl.reshape(bits != 0, cols.shape)


@triton.jit
def _penalise(x, count, presence, frequency, repetition):
    """``sampler.apply_penalties`` on seen logits ``x`` with output counts
    ``count`` (float32): x / r if x > 0 else x * r, then minus the
    frequency and presence penalties; ``repetition`` = (r, 1 / r rounded).

    x / r is the product by 1 / r corrected by one fused remainder step:
    the correctly rounded quotient that torch's IEEE division gives, while
    x / r is finite and |x| >= 2^-100 (below, the last bit may differ).
    With r >= 1, x / r <= x * r for x >= 0 and x * r <= x / r for x <= 0,
    so the penalised logit is the smaller of the two (rounding keeps the
    order); with r < 1, the larger. The NaN quotient of x = +-inf is
    ignored: x * r is then right."""
    r, inverse = repetition
    q = x * inverse
    quotient = tl.fma(tl.fma(q, -r, x), inverse, q)
    product = x * r
    x = tl.where(r >= 1.0, tl.minimum(quotient, product),
                 tl.maximum(quotient, product))
    # min(count, 1): 1.0 where the count is > 0 (counts are >= 0).
    return x - frequency * count - presence * tl.minimum(count, 1.0)


@triton.jit
def _penalise_seen(x, cols, runs, start, vocab_size, seen_row, counts_row,
                   presence, frequency, repetition):
    """``_edit``'s penalties, from the row's seen bits and counts."""
    seen = _seen_bits(seen_row, runs, cols, start, vocab_size)
    # A count is > 0 only where the bit is set: the counts are read only
    # there, and the other logits are kept as they are.
    count = tl.load(counts_row + cols, mask=seen)
    return tl.where(
        seen, _penalise(x, count.to(tl.float32), presence, frequency,
                        repetition), x)


@triton.jit
def _edit(x, cols, runs, start, stop, row_start, vocab_size, bias_keys_ptr,
          bias_values_ptr, entry, next_col, bias_hi, slot, seen_ptr,
          seen_stride, counts_ptr, presence, frequency, repetition,
          HAS_BIAS: tl.constexpr, HAS_PENALTIES: tl.constexpr):
    """The logits ``x`` at columns ``cols`` (within [start, stop), not
    necessarily all of them; ``runs``: see ``_seen_bits``) after the row's
    logit_bias and penalties: ``sampler.apply_logit_bias`` then
    ``sampler.apply_penalties``, the same arithmetic. -> the edited logits,
    and the bias entry (and its column) the next tile starts from."""
    if HAS_BIAS:
        x, entry, next_col = _add_bias(x, cols, start, stop, row_start,
                                       bias_keys_ptr, bias_values_ptr, entry,
                                       next_col, bias_hi)
    if HAS_PENALTIES:
        if slot >= 0:
            x = _penalise_seen(x, cols, runs, start, vocab_size,
                               seen_ptr + slot * seen_stride,
                               counts_ptr + slot * vocab_size, presence,
                               frequency, repetition)
    return x, entry, next_col


@triton.jit
def _by_thread(x, ROWS: tl.constexpr, SEGMENT: tl.constexpr):
    """``x`` [ROWS, SEGMENT] as [ROWS, SEGMENT // 8, 8], each thread's 8
    columns on the last axis."""
    return tl.reshape(x, [ROWS, SEGMENT // 8, 8])


@triton.jit
def _segment_max(x, ROWS: tl.constexpr, SEGMENT: tl.constexpr):
    """The max of each row of ``x`` [ROWS, SEGMENT], reduced over each
    thread's columns first: then it is laid out as [ROWS, SEGMENT // 8]
    tensors are, one element a thread (not 8, as [ROWS, SEGMENT] ones)."""
    return tl.max(tl.max(_by_thread(x, ROWS, SEGMENT), axis=2), axis=1)


@triton.jit
def _tiles_seen(seen_row, chunk_start, vocab_size, TILE: tl.constexpr,
                CHUNK_TILES: tl.constexpr):
    """Bit t: whether tile t of the chunk from ``chunk_start`` has a seen
    bit set (one reduction a chunk, not one a tile)."""
    words = (chunk_start // 32 + tl.arange(0, CHUNK_TILES)[:, None] *
             (TILE // 32) + tl.arange(0, TILE // 32)[None, :])
    seen = tl.reduce_or(tl.load(seen_row + words,
                                mask=words * 32 < vocab_size,
                                other=0),
                        axis=1) != 0
    return tl.sum(tl.where(seen, 1 << tl.arange(0, CHUNK_TILES), 0), axis=0)


@triton.jit
def _stats_kernel(x_ptr, row_stride, vocab_size, bias_keys_ptr, bias_values_ptr,
                  bias_starts_ptr, row_slots_ptr, seen_ptr, seen_stride,
                  counts_ptr, presence_ptr, frequency_ptr, repetition_ptr,
                  stats_ptr, num_chunks, segment_max_ptr,
                  edited_segment_max_ptr, num_segments, STATS: tl.constexpr,
                  SIGMA: tl.constexpr, SEGMENTS: tl.constexpr,
                  LOGPROBS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_PENALTIES: tl.constexpr, TILE: tl.constexpr,
                  SEGMENT: tl.constexpr, CHUNK_TILES: tl.constexpr):
    """One chunk of a row: with ``STATS``, the max of the edited logits,
    (``SIGMA``) the count, sum and sum of squares of the finite ones and
    (``SEGMENTS``) each segment's edited max at ``edited_segment_max_ptr``;
    with ``LOGPROBS``, the raw logits' max and sum(exp(x - max)), and each
    segment's max at ``segment_max_ptr``."""
    ROWS: tl.constexpr = TILE // SEGMENT
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * row_stride
    chunk_start = chunk * (CHUNK_TILES * TILE)
    end = tl.minimum(vocab_size, chunk_start + CHUNK_TILES * TILE)
    bias_lo, bias_hi, slot, presence, frequency, repetition = _edit_params(
        row, bias_starts_ptr, row_slots_ptr, presence_ptr, frequency_ptr,
        repetition_ptr, HAS_BIAS, HAS_PENALTIES)
    # A tile as [ROWS, SEGMENT]: segment r of the tile is its row r.
    cols = (tl.arange(0, ROWS)[:, None] * SEGMENT +
            tl.arange(0, SEGMENT)[None, :])
    # cols // 8 of each thread's 8 columns (``_seen_bits``).
    runs = (tl.arange(0, ROWS)[:, None] * (SEGMENT // 8) +
            tl.arange(0, SEGMENT // 8)[None, :])
    # The chunk's segment maxima, segment r of tile t at [r, t], stored
    # after the last tile: no stores (nor exchanges between warps to make
    # them) per tile.
    tiles = tl.arange(0, CHUNK_TILES)[None, :]
    segment_maxima = tl.full([ROWS, CHUNK_TILES], float("-inf"), tl.float32)
    edited_segment_maxima = segment_maxima
    # Sums of x - shift, with the row's first logit as the shift: a logit
    # lies within a few σ of the mean, so E[d²] - E[d]² cancels little.
    first = tl.load(x_row).to(tl.float32)
    shift = tl.where(tl.abs(first) < float("inf"), first, 0.0)
    count = tl.zeros([ROWS, SEGMENT], tl.float32)
    total = tl.zeros([ROWS, SEGMENT], tl.float32)
    squares = tl.zeros([ROWS, SEGMENT], tl.float32)
    # Per row of the tile (segment): the raw max so far, and per lane the
    # sum of exp(raw - that max), rescaled when it grows: no reduction
    # across warps per tile. The max is kept scaled by log2(e) too, and at
    # least -FLT_MAX there, so that no difference is inf - inf.
    raw_max = tl.full([ROWS], float("-inf"), tl.float32)
    scaled_max = tl.full([ROWS], -_FLT_MAX, tl.float32)
    sum_exp = tl.zeros([ROWS, SEGMENT // 8, 8], tl.float32)
    row_start = row.to(tl.int64) * vocab_size
    entry, next_col = _first_bias_entry(bias_keys_ptr, bias_lo, bias_hi,
                                        row_start, chunk_start, HAS_BIAS)
    # A penalised row's seen bits and counts, and which of the chunk's
    # tiles have a bit set: the others skip the penalties.
    tiles_seen = 0
    if STATS and HAS_PENALTIES:
        seen_row = seen_ptr + slot * seen_stride
        counts_row = counts_ptr + slot * vocab_size
        if slot >= 0:
            tiles_seen = _tiles_seen(seen_row, chunk_start, vocab_size, TILE,
                                     CHUNK_TILES)
    x_next = _load(x_row + chunk_start, cols, end - chunk_start)
    for tile in range(CHUNK_TILES):
        start = chunk_start + tile * TILE
        raw = x_next
        x_next = _load(x_row + start + TILE, cols, end - start - TILE)
        if LOGPROBS:
            segment_max = _segment_max(raw, ROWS, SEGMENT)
            segment_maxima = tl.where(tiles == tile, segment_max[:, None],
                                      segment_maxima)
            raw_max = tl.maximum(raw_max, segment_max)
            scaled = tl.maximum(raw_max * _LOG2E, -_FLT_MAX)
            sum_exp = (sum_exp * tl.exp2(scaled_max - scaled)[:, None, None] +
                       tl.exp2(
                           _by_thread(raw, ROWS, SEGMENT) * _LOG2E -
                           scaled[:, None, None]))
            scaled_max = scaled
        if STATS:
            # ``_edit``, its parts called here: the row's pointers are
            # computed once, and the tiles without a seen bit skip the
            # penalties.
            x = raw
            if HAS_BIAS:
                x, entry, next_col = _add_bias(x, start + cols, start,
                                               start + TILE, row_start,
                                               bias_keys_ptr, bias_values_ptr,
                                               entry, next_col, bias_hi)
            if HAS_PENALTIES:
                if (tiles_seen >> tile) & 1:
                    x = _penalise_seen(x, start + cols, start // 8 + runs,
                                       start, vocab_size, seen_row, counts_row,
                                       presence, frequency, repetition)
            edited_segment_maxima = tl.where(
                tiles == tile,
                _segment_max(x, ROWS, SEGMENT)[:, None], edited_segment_maxima)
            if SIGMA:
                # Only the finite logits count: predicated sums.
                finite = tl.abs(x) < float("inf")
                d = x - shift
                count = tl.where(finite, count + 1.0, count)
                total = tl.where(finite, total + d, total)
                squares = tl.where(finite, squares + d * d, squares)
    segments = (chunk * (CHUNK_TILES * ROWS) + tiles * ROWS +
                tl.arange(0, ROWS)[:, None])
    at = row.to(tl.int64) * num_segments + segments
    if LOGPROBS:
        tl.store(segment_max_ptr + at,
                 segment_maxima,
                 mask=segments < num_segments)
    if SEGMENTS:
        tl.store(edited_segment_max_ptr + at,
                 edited_segment_maxima,
                 mask=segments < num_segments)
    out = stats_ptr + (row.to(tl.int64) * num_chunks + chunk) * 6
    tl.store(out, tl.max(tl.max(edited_segment_maxima, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(count, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(total, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(squares, axis=1), axis=0))
    # The chunk's raw max, and sum(exp(x - it)).
    chunk_max = tl.max(raw_max, axis=0)
    rescale = tl.exp2(scaled_max - tl.maximum(chunk_max * _LOG2E, -_FLT_MAX))
    tl.store(out + 4, chunk_max)
    tl.store(out + 5,
             tl.sum(tl.sum(tl.sum(sum_exp, axis=2), axis=1) * rescale, axis=0))


@triton.jit
def _row_stats_of(stats_ptr, row, num_chunks, CHUNKS_POW2: tl.constexpr):
    """A row's edited max and σ, and raw max and log(sum(exp(x - max))),
    from its chunks' statistics."""
    chunks = tl.arange(0, CHUNKS_POW2)
    mask = chunks < num_chunks
    at = stats_ptr + (row.to(tl.int64) * num_chunks + chunks) * 6
    edited_max = tl.max(tl.load(at, mask=mask, other=float("-inf")), axis=0)
    n = tl.sum(tl.load(at + 1, mask=mask, other=0.0), axis=0)
    mean = tl.sum(tl.load(at + 2, mask=mask, other=0.0), axis=0) / n
    variance = tl.maximum(
        tl.sum(tl.load(at + 3, mask=mask, other=0.0), axis=0) / n - mean * mean,
        0.0)
    chunk_max = tl.load(at + 4, mask=mask, other=float("-inf"))
    raw_max = tl.max(chunk_max, axis=0)
    scale = tl.where(chunk_max == float("-inf"), 0.0,
                     tl.exp(chunk_max - raw_max))
    sum_exp = tl.sum(tl.load(at + 5, mask=mask, other=0.0) * scale, axis=0)
    return edited_max, tl.sqrt(variance), raw_max, tl.log(sum_exp)


@triton.jit
def _count_above(x_row, vocab_size, segment_max_row, num_segments, value,
                 SEGMENT: tl.constexpr, BLOCK: tl.constexpr,
                 WINDOW: tl.constexpr):
    """How many logits of the row are > ``value``, reading only the
    segments whose max is. ``WINDOW`` segments at a time (the next window's
    maxima load while this one is counted): those whose max is > value are
    sorted first, then read ``BLOCK`` at a time. A sampled token is usually
    among the largest logits: a block or none per window, where a loop
    over every block of segments waits for memory at each."""
    window = tl.arange(0, WINDOW)
    above = tl.zeros([BLOCK, SEGMENT], tl.int32)
    max_next = tl.load(segment_max_row + window,
                       mask=window < num_segments,
                       other=float("-inf"))
    for start in range(0, num_segments, WINDOW):
        look = max_next > value
        after = start + WINDOW + window
        max_next = tl.load(segment_max_row + after,
                           mask=after < num_segments,
                           other=float("-inf"))
        num_look = tl.sum(look.to(tl.int32), axis=0)
        if num_look > 0:
            order = tl.sort(tl.where(look, window, WINDOW + window))
            for first in range(0, num_look, BLOCK):
                i = first + tl.arange(0, BLOCK)
                picked = start + tl.gather(order, tl.minimum(i, WINDOW - 1), 0)
                cols = picked[:, None] * SEGMENT + tl.arange(0,
                                                             SEGMENT)[None, :]
                read = (i < num_look)[:, None] & (cols < vocab_size)
                x = tl.load(x_row + cols, mask=read,
                            other=float("-inf")).to(tl.float32)
                above += (x > value).to(tl.int32)
    return tl.sum(tl.sum(above, axis=1), axis=0)


@triton.jit
def _top_k(x_row, vocab_size, segment_max_row, num_segments, k, row_max,
           log_sum, ids_out, logprobs_out, SEGMENT: tl.constexpr,
           NUM_SEGMENTS_POW2: tl.constexpr, K_POW2: tl.constexpr):
    """The ``k`` largest logits of the row, most likely first: their ids at
    ``ids_out`` and log probabilities at ``logprobs_out``. They lie in the
    k segments with the largest maxima (up to ties), so only those are
    read."""
    segments = tl.arange(0, NUM_SEGMENTS_POW2)
    segment_max = tl.load(segment_max_row + segments,
                          mask=segments < num_segments,
                          other=float("-inf"))
    free = segments < num_segments
    slots = tl.arange(0, K_POW2)
    picked = tl.full([K_POW2], -1, tl.int32)
    for i in range(k):
        top = tl.max(tl.where(free, segment_max, float("-inf")), axis=0)
        best = tl.min(tl.where(free & (segment_max == top), segments,
                               NUM_SEGMENTS_POW2),
                      axis=0)
        picked = tl.where(slots == i, best, picked)
        free = free & (segments != best)
    cols = picked[:, None] * SEGMENT + tl.arange(0, SEGMENT)[None, :]
    valid = (picked[:, None] >= 0) & (cols < vocab_size)
    x = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
    for i in range(k):
        top = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=1), axis=0)
        col = tl.min(tl.min(tl.where(valid & (x == top), cols, vocab_size),
                            axis=1),
                     axis=0)
        tl.store(ids_out + i, col.to(tl.int64))
        # Rounded as log_softmax is: (x - max) - log(sum(exp(x - max))).
        tl.store(logprobs_out + i, (top - row_max) - log_sum)
        valid = valid & (cols != col)


@triton.jit
def _log_q(r0, r1, r2, r3, ROWS: tl.constexpr, COLS: tl.constexpr):
    """log q, q ~ Exp(1), [ROWS, COLS] from Philox's four outputs for
    [ROWS, COLS // 4] counters: column 4 c + j of a row takes output j of
    its counter c."""
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [ROWS, COLS])
    # u in (0, 1), never 0 or 1: q = -log u is finite and positive.
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return tl.log(-tl.log(u))


# ------------------------------------------------------------------ sample
@triton.jit
def _read_segments(x_row, b, first_segment, order, num_read, num_segments,
                   vocab_size, CANDIDATES: tl.constexpr, ROWS: tl.constexpr,
                   SEGMENT: tl.constexpr, CHUNK_SEGMENTS: tl.constexpr):
    """Block ``b`` of the chunk's segments to read: the ``ROWS`` segments
    from the ``b``-th (of ``order`` with ``CANDIDATES``, else of the
    chunk), their columns [ROWS, SEGMENT] and logits. Past ``num_read``, a
    segment past the row (num_segments), its logits -inf."""
    i = b + tl.arange(0, ROWS)
    if CANDIDATES:
        segments = first_segment + tl.gather(
            order, tl.minimum(i, CHUNK_SEGMENTS - 1), 0)
    else:
        segments = first_segment + i
    segments = tl.where(i < num_read, segments, num_segments)
    cols = segments[:, None] * SEGMENT + tl.arange(0, SEGMENT)[None, :]
    return segments, cols, _load(x_row, cols, vocab_size)


@triton.jit(do_not_specialize=["k"])
def _draw_kernel(x_ptr, row_stride, vocab_size, temperature_ptr, threshold_ptr,
                 top_n_sigma_ptr, min_p_ptr, seeded_keys_ptr, seeded_index_ptr,
                 seed_ptr, bias_keys_ptr, bias_values_ptr, bias_starts_ptr,
                 row_slots_ptr, seen_ptr, seen_stride, counts_ptr, presence_ptr,
                 frequency_ptr, repetition_ptr, stats_ptr, num_chunks,
                 edited_segment_max_ptr, num_segments, best_ptr, best_col_ptr,
                 arrivals_ptr, token_ptr, segment_max_ptr, k, lp_ids_ptr,
                 lp_values_ptr, lp_stride, ranks_ptr, lp_stats_ptr,
                 next_keys_ptr, HAS_THRESHOLD: tl.constexpr,
                 TOP_N_SIGMA: tl.constexpr, MIN_P: tl.constexpr,
                 HAS_SEEDED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_PENALTIES: tl.constexpr, LOGPROBS: tl.constexpr,
                 TOP_K: tl.constexpr, RECORD_COUNTS: tl.constexpr,
                 RECORD_KEYS: tl.constexpr, KEY_STEP: tl.constexpr,
                 KEY_MASK: tl.constexpr, TILE: tl.constexpr,
                 SEGMENT: tl.constexpr, SEGMENT_BLOCK: tl.constexpr,
                 CHUNK_TILES: tl.constexpr, NUM_SEGMENTS_POW2: tl.constexpr,
                 K_POW2: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    """One chunk of a row: the best score x - T log q over its kept edited
    logits, and its column (the first of equal ones). The row's last chunk
    to finish then finishes the row (``_finish_row``: its token, logprobs
    and ``StepRecord``), counted at ``arrivals_ptr`` (zero before and after
    a launch).

    With a top-nσ or min_p rule (each segment's edited max then comes from
    ``_stats_kernel``) it reads only the segments whose max reaches the
    row's threshold: a row truncated by top-nσ or min_p, or a greedy one,
    keeps few logits, so most of its chunks read none. Else every segment
    of the chunk. Either way in column order, blocks of ``TILE // SEGMENT``
    segments."""
    ROWS: tl.constexpr = TILE // SEGMENT
    CHUNK_SEGMENTS: tl.constexpr = CHUNK_TILES * ROWS
    CANDIDATES: tl.constexpr = TOP_N_SIGMA or MIN_P
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * row_stride
    first_segment = chunk * CHUNK_SEGMENTS
    temperature = tl.load(temperature_ptr + row)
    bias_lo, bias_hi, slot, presence, frequency, repetition = _edit_params(
        row, bias_starts_ptr, row_slots_ptr, presence_ptr, frequency_ptr,
        repetition_ptr, HAS_BIAS, HAS_PENALTIES)

    # The smallest logit the row keeps (sampler.py's rules, same formulas).
    threshold = float("-inf")
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + row)
    if TOP_N_SIGMA or MIN_P:
        row_max, sigma, _, _ = _row_stats_of(stats_ptr, row, num_chunks,
                                             CHUNKS_POW2)
        if TOP_N_SIGMA:
            n = tl.load(top_n_sigma_ptr + row)  # 0.0 is off
            threshold = tl.maximum(
                threshold, tl.where(n != 0.0, row_max - n * sigma,
                                    float("-inf")))
        if MIN_P:
            # x >= max + T log min_p (min_p = 0 is off).
            min_p = tl.load(min_p_ptr + row)
            threshold = tl.maximum(
                threshold,
                tl.where(min_p > 0.0, row_max + temperature * tl.log(min_p),
                         float("-inf")))

    # The segments to read: with CANDIDATES, the chunk's segment indices
    # sorted kept-first (in column order), num_read of them kept; else the
    # first num_read segments of the chunk (``order`` unused).
    order = 0
    if CANDIDATES:
        # A greedy row's argmax lies in the segments holding its max. Only
        # the segments are chosen by it: the logits read are compared with
        # the threshold alone, as without CANDIDATES.
        read_from = tl.where(temperature > 0.0, threshold,
                             tl.maximum(threshold, row_max))
        index = tl.arange(0, CHUNK_SEGMENTS)
        segment_max = tl.load(edited_segment_max_ptr +
                              row.to(tl.int64) * num_segments + first_segment +
                              index,
                              mask=first_segment + index < num_segments,
                              other=float("-inf"))
        keep = segment_max >= read_from
        num_read = tl.sum(keep.to(tl.int32), axis=0)
        order = tl.sort(tl.where(keep, index, CHUNK_SEGMENTS + index))
    else:
        num_read = tl.minimum(CHUNK_SEGMENTS, num_segments - first_segment)

    # Philox counters: each logit's noise depends only on the seed, its row
    # and its column (counter column // 4, output column % 4); a seeded row
    # has its own key and counts from 0.
    row_counter = row.to(tl.int64) * tl.cdiv(vocab_size, TILE) * (TILE // 4)
    key = tl.load(seed_ptr)
    if HAS_SEEDED:
        seeded_index = tl.load(seeded_index_ptr + row)
        if seeded_index >= 0:
            key = tl.load(seeded_keys_ptr + seeded_index)
            row_counter = row_counter * 0
    counter_cols = tl.arange(0, SEGMENT // 4)[None, :]
    # Per lane: the best score so far and its column.
    best = tl.full([ROWS, SEGMENT], float("-inf"), tl.float32)
    best_col = tl.zeros([ROWS, SEGMENT], tl.int32) + first_segment * SEGMENT
    row_start = row.to(tl.int64) * vocab_size
    entry, next_col = _first_bias_entry(bias_keys_ptr, bias_lo, bias_hi,
                                        row_start, first_segment * SEGMENT,
                                        HAS_BIAS)
    # The next block's logits load while this one's are used.
    segments_next, cols_next, x_next = _read_segments(x_row, 0, first_segment,
                                                      order, num_read,
                                                      num_segments, vocab_size,
                                                      CANDIDATES, ROWS, SEGMENT,
                                                      CHUNK_SEGMENTS)
    for b in range(0, num_read, ROWS):
        segments, cols, x = segments_next, cols_next, x_next
        segments_next, cols_next, x_next = _read_segments(
            x_row, b + ROWS, first_segment, order, num_read, num_segments,
            vocab_size, CANDIDATES, ROWS, SEGMENT, CHUNK_SEGMENTS)
        read = segments < num_segments
        x, entry, next_col = _edit(
            x, cols, segments[:, None] * (SEGMENT // 8) +
            tl.arange(0, SEGMENT // 8)[None, :],
            tl.min(segments, axis=0) * SEGMENT,
            (tl.max(tl.where(read, segments, -1), axis=0) + 1) * SEGMENT,
            row_start, vocab_size, bias_keys_ptr, bias_values_ptr, entry,
            next_col, bias_hi, slot, seen_ptr, seen_stride, counts_ptr,
            presence, frequency, repetition, HAS_BIAS, HAS_PENALTIES)
        x = tl.where(x >= threshold, x, float("-inf"))
        # Truncated rows keep few logits: skip the noise of blocks without.
        if tl.max(tl.max(x, axis=1), axis=0) > float("-inf"):
            score = x  # greedy rows (T = 0) take the argmax
            if temperature > 0.0:
                r0, r1, r2, r3 = tl.randint4x(
                    key, row_counter + segments[:, None].to(tl.int64) *
                    (SEGMENT // 4) + counter_cols)
                # -inf logits stay -inf.
                score = x - temperature * _log_q(r0, r1, r2, r3, ROWS, SEGMENT)
            better = score > best  # strictly: the first of equal ones wins
            best = tl.where(better, score, best)
            best_col = tl.where(better, cols, best_col)
    top = tl.max(tl.max(best, axis=1), axis=0)
    at = row.to(tl.int64) * num_chunks + chunk
    tl.store(best_ptr + at, top)
    tl.store(
        best_col_ptr + at,
        tl.min(tl.min(tl.where(best == top, best_col, vocab_size), axis=1),
               axis=0))
    # Every thread's stores above are issued; the atomic (acq_rel, GPU
    # scope) orders them before the last chunk's loads of them.
    tl.debug_barrier()
    if tl.atomic_add(arrivals_ptr + row, 1) == num_chunks - 1:
        tl.store(arrivals_ptr + row, 0)  # ready for the next launch
        _finish_row(row, x_ptr, row_stride, vocab_size, best_ptr, best_col_ptr,
                    token_ptr, stats_ptr, num_chunks, segment_max_ptr,
                    num_segments, k, lp_ids_ptr, lp_values_ptr, lp_stride,
                    ranks_ptr, lp_stats_ptr, row_slots_ptr, counts_ptr,
                    seen_ptr, seen_stride, seeded_index_ptr, seeded_keys_ptr,
                    next_keys_ptr, True, LOGPROBS, TOP_K, RECORD_COUNTS,
                    RECORD_KEYS, KEY_STEP, KEY_MASK, SEGMENT, SEGMENT_BLOCK,
                    NUM_SEGMENTS_POW2, K_POW2, CHUNKS_POW2)


@triton.jit
def _finish_row(row, x_ptr, row_stride, vocab_size, best_ptr, best_col_ptr,
                token_ptr, stats_ptr, num_chunks, segment_max_ptr, num_segments,
                k, lp_ids_ptr, lp_values_ptr, lp_stride, ranks_ptr,
                lp_stats_ptr, row_slots_ptr, counts_ptr, seen_ptr, seen_stride,
                seeded_index_ptr, seeded_keys_ptr, next_keys_ptr,
                DRAWN: tl.constexpr, LOGPROBS: tl.constexpr,
                TOP_K: tl.constexpr, RECORD_COUNTS: tl.constexpr,
                RECORD_KEYS: tl.constexpr, KEY_STEP: tl.constexpr,
                KEY_MASK: tl.constexpr, SEGMENT: tl.constexpr,
                SEGMENT_BLOCK: tl.constexpr, NUM_SEGMENTS_POW2: tl.constexpr,
                K_POW2: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    """Row ``row``: with ``DRAWN``, the token of the best chunk's score (the
    first column of equal ones) into ``token_ptr``, else the token given
    there; with ``LOGPROBS``, its log probability and rank in column 0 of
    the logprobs, the top ``k`` (with ``TOP_K``) after it, and the row's
    raw max and log-sum (for a top-k computed elsewhere).

    ``StepRecord``: with ``RECORD_COUNTS``, a penalised row's token is
    added to its slot's count and seen bit (``mark_tokens``); with
    ``RECORD_KEYS``, a seeded row's key for its next step goes to
    ``next_keys_ptr`` (``step_keys``: one ``KEY_STEP`` more)."""
    x_row = x_ptr + row.to(tl.int64) * row_stride
    if DRAWN:
        chunks = tl.arange(0, CHUNKS_POW2)
        at = row.to(tl.int64) * num_chunks + chunks
        # From L2 (.cg): other programs of this launch may have just
        # written them (``_draw_kernel``).
        scores = tl.load(best_ptr + at,
                         mask=chunks < num_chunks,
                         other=float("-inf"),
                         cache_modifier=".cg")
        chunk_cols = tl.load(best_col_ptr + at,
                             mask=chunks < num_chunks,
                             other=vocab_size,
                             cache_modifier=".cg")
        top = tl.max(scores, axis=0)
        col = tl.min(tl.where(scores == top, chunk_cols, vocab_size), axis=0)
        col = tl.where(col < vocab_size, col, 0)  # a row of -inf: column 0
        tl.store(token_ptr + row, col.to(tl.int64))
        if RECORD_COUNTS:
            slot = tl.load(row_slots_ptr + row)
            if slot >= 0:
                tl.atomic_add(counts_ptr + slot * vocab_size + col, 1)
                # Bit 31 wraps to int32's sign bit, as in mark_tokens.
                bit = (tl.full([], 1, tl.int64) << (col % 32)).to(tl.int32)
                tl.atomic_or(seen_ptr + slot * seen_stride + col // 32, bit)
        if RECORD_KEYS:
            index = tl.load(seeded_index_ptr + row)
            if index >= 0:
                key = tl.load(seeded_keys_ptr + index)
                tl.store(next_keys_ptr + index, (key + KEY_STEP) & KEY_MASK)
    else:
        col = tl.load(token_ptr + row)
    if LOGPROBS:
        _, _, raw_max, log_sum = _row_stats_of(stats_ptr, row, num_chunks,
                                               CHUNKS_POW2)
        segment_max_row = segment_max_ptr + row.to(tl.int64) * num_segments
        chosen = tl.load(x_row + col).to(tl.float32)
        above = _count_above(x_row, vocab_size, segment_max_row, num_segments,
                             chosen, SEGMENT, SEGMENT_BLOCK, _COUNT_WINDOW)
        ids_out = lp_ids_ptr + row.to(tl.int64) * lp_stride
        logprobs_out = lp_values_ptr + row.to(tl.int64) * lp_stride
        tl.store(ids_out, col.to(tl.int64))
        # Rounded as log_softmax is: (x - max) - log(sum(exp(x - max))).
        tl.store(logprobs_out, (chosen - raw_max) - log_sum)
        tl.store(ranks_ptr + row, above.to(tl.int64) + 1)
        tl.store(lp_stats_ptr + 2 * row, raw_max)
        tl.store(lp_stats_ptr + 2 * row + 1, log_sum)
        if TOP_K:
            _top_k(x_row, vocab_size, segment_max_row, num_segments, k, raw_max,
                   log_sum, ids_out + 1, logprobs_out + 1, SEGMENT,
                   NUM_SEGMENTS_POW2, K_POW2)


@triton.jit(do_not_specialize=["k"])
def _finish_kernel(x_ptr, row_stride, vocab_size, token_ptr, stats_ptr,
                   num_chunks, num_segments, segment_max_ptr, k, lp_ids_ptr,
                   lp_values_ptr, lp_stride, ranks_ptr, lp_stats_ptr,
                   TOP_K: tl.constexpr, SEGMENT: tl.constexpr,
                   SEGMENT_BLOCK: tl.constexpr, NUM_SEGMENTS_POW2: tl.constexpr,
                   K_POW2: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    """``_finish_row`` of each row for the tokens given at ``token_ptr``:
    their logprobs (``topk_logprobs``)."""
    _finish_row(tl.program_id(0), x_ptr, row_stride, vocab_size, None, None,
                token_ptr, stats_ptr, num_chunks, segment_max_ptr, num_segments,
                k, lp_ids_ptr, lp_values_ptr, lp_stride, ranks_ptr,
                lp_stats_ptr, None, None, None, 0, None, None, None, False,
                True, TOP_K, False, False, 0, 0, SEGMENT, SEGMENT_BLOCK,
                NUM_SEGMENTS_POW2, K_POW2, CHUNKS_POW2)


def _edit_args(bias: "LogitBias | None",
               penalties: "PenaltyCounts | None") -> list:
    """The kernels' edit arguments, from bias_keys to repetition."""
    args: list = [None] * 3 if bias is None else [
        bias.keys, bias.values, bias.row_starts
    ]
    if penalties is None:
        return args + [None, None, 0, None, None, None, None]
    seen = penalties.seen
    return args + [
        penalties.row_slots, seen,
        seen.stride(0), penalties.counts, penalties.presence,
        penalties.frequency, penalties.repetition
    ]


def _output_buffer(num_rows: int, k: int | None,
                   device: torch.device) -> torch.Tensor:
    """The int64 buffer of ``_host_outputs``."""
    length = num_rows
    if k is not None:
        # [tokens | ranks | ids | values (two float32 per int64)]
        size = num_rows * (k + 1)
        length = 2 * num_rows + size + (size + 1) // 2
    return torch.empty(length, dtype=torch.int64, device=device)


def _host_outputs(buffer: torch.Tensor, num_rows: int,
                  k: int | None) -> tuple[torch.Tensor, ...]:
    """What the host reads of a step, as views of one int64 ``buffer``
    (one copy for ``HostCopy``): token ids [N] int64 and, with ``k``, the
    logprobs outputs: ids [N, k+1] int64, log probabilities [N, k+1]
    float32 and ranks [N] int64. Each view is made in one op."""
    if k is None:
        return (buffer, )
    size = num_rows * (k + 1)
    shape, strides = (num_rows, k + 1), (k + 1, 1)
    return (buffer[:num_rows], buffer.as_strided(shape, strides, 2 * num_rows),
            buffer.view(torch.float32).as_strided(shape, strides,
                                                  2 * (2 * num_rows + size)),
            buffer[num_rows:2 * num_rows])


@dataclass
class _Workspace:
    """The launches over logits of one shape [N, V]: the grid's chunks per
    row, the sizes the kernels take as constants, and the intermediate
    results on the device: per-chunk statistics [N, chunks, _NUM_STATS],
    raw and edited segment maxima [N, segments], each chunk's best score
    and its column [N, chunks], each row's raw max and log-sum [N, 2], per
    row the chunks of a ``_draw_kernel`` launch done so far (zeros, which
    the row's last chunk puts back) [N] int32, the unseeded rows' Philox
    key [1] int64, and ``sample``'s outputs (``_output_buffer``) by number
    of logprobs: a step's launches always take the same addresses, and
    ``sample`` returns a copy."""
    num_chunks: int
    num_segments: int
    chunks_pow2: int
    num_segments_pow2: int
    stats: torch.Tensor
    segment_max: torch.Tensor
    edited_segment_max: torch.Tensor
    best: torch.Tensor
    best_col: torch.Tensor
    lp_stats: torch.Tensor
    arrivals: torch.Tensor
    seed: torch.Tensor
    outputs: dict[int | None, torch.Tensor]

    def output_buffer(self, k: int | None) -> torch.Tensor:
        buffer = self.outputs.get(k)
        if buffer is None:
            buffer = self.outputs[k] = _output_buffer(self.arrivals.shape[0], k,
                                                      self.seed.device)
        return buffer


@functools.lru_cache(maxsize=4)
def _workspace(device: torch.device, num_rows: int,
               vocab_size: int) -> _Workspace:
    """The shape's ``_Workspace``, reused by every call of that shape: a
    step's host work is a few launches, no allocation. Launches run in
    order on the stream, so the next call's kernels never overwrite what an
    earlier one still reads (the wrappers return none of it)."""
    num_chunks = _cdiv(vocab_size, _CHUNK_TILES * _TILE)
    num_segments = _cdiv(vocab_size, _SEGMENT)
    shapes = [(num_rows, num_chunks, _NUM_STATS), (num_rows, num_segments),
              (num_rows, num_segments), (num_rows, num_chunks),
              (num_rows, num_chunks), (num_rows, 2)]
    sizes = [math.prod(shape) for shape in shapes]
    parts = torch.empty(sum(sizes), dtype=torch.float32,
                        device=device).split(sizes)
    stats, segment_max, edited_segment_max, best, best_col, lp_stats = (
        part.view(shape) for part, shape in zip(parts, shapes))
    return _Workspace(
        num_chunks=num_chunks,
        num_segments=num_segments,
        chunks_pow2=_next_power_of_2(num_chunks),
        num_segments_pow2=_next_power_of_2(num_segments),
        stats=stats,
        segment_max=segment_max,
        edited_segment_max=edited_segment_max,
        best=best,
        best_col=best_col.view(torch.int32),  # the same bytes
        lp_stats=lp_stats,
        arrivals=torch.zeros(num_rows, dtype=torch.int32, device=device),
        seed=torch.zeros(1, dtype=torch.int64, device=device),
        outputs={})


def _workspace_of(x: torch.Tensor) -> _Workspace:
    return _workspace(x.device, x.shape[0], x.shape[1])


def _stats(x: torch.Tensor,
           ws: _Workspace,
           bias: "LogitBias | None",
           penalties: "PenaltyCounts | None",
           stats: bool,
           sigma: bool,
           logprobs: bool,
           segments: bool = False) -> None:
    """Launch ``_stats_kernel`` on ``x`` (columns contiguous; ``ws`` its
    workspace): into ``ws.stats`` the per-chunk statistics [N, chunks,
    _NUM_STATS], with ``logprobs`` into ``ws.segment_max`` the raw segment
    maxima [N, segments] and with ``segments`` into
    ``ws.edited_segment_max`` the edited ones."""
    num_rows, vocab_size = x.shape
    _stats_kernel[(num_rows,
                   ws.num_chunks)](x,
                                   x.stride(0),
                                   vocab_size,
                                   *_edit_args(bias, penalties),
                                   ws.stats,
                                   ws.num_chunks,
                                   ws.segment_max if logprobs else None,
                                   ws.edited_segment_max if segments else None,
                                   ws.num_segments,
                                   STATS=stats,
                                   SIGMA=sigma,
                                   SEGMENTS=segments,
                                   LOGPROBS=logprobs,
                                   HAS_BIAS=bias is not None,
                                   HAS_PENALTIES=penalties is not None,
                                   TILE=_TILE,
                                   SEGMENT=_SEGMENT,
                                   CHUNK_TILES=_CHUNK_TILES,
                                   num_warps=_NUM_WARPS)


def _logprobs_args(ws: _Workspace, num_logprobs: int | None,
                   outputs: tuple[torch.Tensor, ...]) -> tuple[list, dict]:
    """The kernels' logprobs arguments (``segment_max_ptr``, then ``k`` to
    ``lp_stats_ptr``) and constants, for ``num_logprobs`` (None: none) into
    ``outputs`` (ids, log probabilities, ranks: see ``_host_outputs``)."""
    k = num_logprobs or 0
    ids, values, ranks = outputs or (None, None, None)
    args = [
        ws.segment_max if outputs else None, k, ids, values, k + 1, ranks,
        ws.lp_stats
    ]
    constants = dict(TOP_K=0 < k <= _MAX_KERNEL_TOP_K,
                     SEGMENT=_SEGMENT,
                     SEGMENT_BLOCK=_SEGMENT_BLOCK,
                     NUM_SEGMENTS_POW2=ws.num_segments_pow2,
                     K_POW2=_next_power_of_2(k),
                     CHUNKS_POW2=ws.chunks_pow2)
    return args, constants


def _top_k_elsewhere(x: torch.Tensor, ws: _Workspace, num_logprobs: int | None,
                     buffer: torch.Tensor) -> None:
    """Columns 1..k of the logprobs outputs in ``buffer`` from torch.topk,
    when k is past the kernels' (``_MAX_KERNEL_TOP_K``)."""
    if num_logprobs is None or num_logprobs <= _MAX_KERNEL_TOP_K:
        return
    _, ids, logprobs, _ = _host_outputs(buffer, x.shape[0], num_logprobs)
    values, top_ids = x.topk(num_logprobs, dim=-1)
    ids[:, 1:] = top_ids
    logprobs[:,
             1:] = ((values.float() - ws.lp_stats[:, :1]) - ws.lp_stats[:, 1:])


def _address(arg: torch.Tensor | int | None) -> int | None:
    """A launch argument as a key: a tensor by address. (Not
    ``isinstance(arg, torch.Tensor)``: Tensor's metaclass makes that check
    cost more than the rest of the key.)"""
    return arg if arg is None or isinstance(arg, int) else arg.data_ptr()


def sample(
    x: torch.Tensor,
    temperature: torch.Tensor,
    seed: int | None = None,
    threshold: torch.Tensor | None = None,
    top_n_sigma: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    seeded_keys: torch.Tensor | None = None,
    seeded_index: torch.Tensor | None = None,
    bias: "LogitBias | None" = None,
    penalties: "PenaltyCounts | None" = None,
    num_logprobs: int | None = None,
    record: "StepRecord | None" = None,
    graphs: LaunchGraphs | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]
           | None]:
    """Per row of ``x`` [N, V], after ``bias`` and ``penalties``, the argmax
    of x - T log q over the logits at or above the row's threshold, q ~
    Exp(1): a draw from softmax(x / T) over them. -> token ids [N] int64,
    and with ``num_logprobs`` = k the logprobs of the raw ``x``: ids
    [N, k+1] (the sampled token, then the top k), their log probabilities
    [N, k+1] float32 and the sampled tokens' ranks [N]. All of them are
    views of one buffer.

    ``temperature`` [N] float32; 0 takes the argmax (greedy rows). The
    threshold is the largest of ``threshold`` [N], top-nσ's (``top_n_sigma``
    [N], 0 is off) and min_p's (``min_p`` [N]); None: that rule is off. The
    noise of row i comes from Philox keyed by ``seed`` (None: one drawn by
    torch's CUDA generator) and each logit's position, or, where
    ``seeded_index[i]`` >= 0, that of
    ``seeded_log_q(seeded_keys[seeded_index[i]], token ids)``.

    ``record``: also does what it asks (the tokens into ``penalties``'
    counts, the seeded rows' next keys) and sets ``record.done``.
    ``graphs``: the launches run through it, keyed by every input (a CUDA
    graph replays them when they come again with the same ones).
    """
    x = _columns_contiguous(x)
    assert (seeded_keys is None) == (seeded_index is None)
    ws = _workspace_of(x)
    next_keys = None
    record_counts = False
    if record is not None and not record.done:
        next_keys = record.next_keys if seeded_keys is not None else None
        record_counts = penalties is not None
        record.done = True
    if seed is not None:
        ws.seed.fill_(seed)
    buffer = ws.output_buffer(num_logprobs)
    launch = functools.partial(_sample_launches, x, ws, buffer, temperature,
                               seed is None, threshold, top_n_sigma, min_p,
                               seeded_keys, seeded_index, bias, penalties,
                               num_logprobs, record_counts, next_keys)
    if graphs is None or not x.is_cuda:
        launch()
    else:
        # Everything the launches take: the workspace (kept alive with the
        # graph: its id stays its own), the logits' address, dtype and row
        # stride, and every other input (each of one dtype).
        graphs.run(
            (id(ws), x.data_ptr(), x.dtype, x.stride(0), seed
             is None, num_logprobs, record_counts,
             *map(_address,
                  (temperature, threshold, top_n_sigma, min_p, seeded_keys,
                   seeded_index, next_keys, *_edit_args(bias, penalties)))),
            launch,
            keep=ws)
    _top_k_elsewhere(x, ws, num_logprobs, buffer)
    # A copy: the next step's launches write into the same buffer.
    tokens, *outputs = _host_outputs(buffer.clone(), x.shape[0], num_logprobs)
    if not outputs:
        return tokens, None
    return tokens, (outputs[0], outputs[1], outputs[2])


def _sample_launches(x: torch.Tensor, ws: _Workspace, buffer: torch.Tensor,
                     temperature: torch.Tensor, draw_seed: bool,
                     threshold: torch.Tensor | None, top_n_sigma: torch.Tensor
                     | None, min_p: torch.Tensor | None,
                     seeded_keys: torch.Tensor | None,
                     seeded_index: torch.Tensor | None,
                     bias: "LogitBias | None",
                     penalties: "PenaltyCounts | None",
                     num_logprobs: int | None, record_counts: bool,
                     next_keys: torch.Tensor | None) -> None:
    """The launches of ``sample``, its outputs into ``buffer``
    (``_host_outputs``); with ``draw_seed``, the unseeded rows' Philox
    key first."""
    num_rows, vocab_size = x.shape
    if draw_seed:
        ws.seed.random_(1 << 32, 1 << 62)
    rules = top_n_sigma is not None or min_p is not None
    logprobs = num_logprobs is not None
    if rules or logprobs:
        # With a rule, the draw reads only the segments that reach it.
        _stats(x, ws, bias, penalties, rules, top_n_sigma is not None, logprobs,
               rules)
    tokens, *outputs = _host_outputs(buffer, num_rows, num_logprobs)
    lp_args, lp_constants = _logprobs_args(ws, num_logprobs, tuple(outputs))
    _draw_kernel[(num_rows,
                  ws.num_chunks)](x,
                                  x.stride(0),
                                  vocab_size,
                                  temperature,
                                  threshold,
                                  top_n_sigma,
                                  min_p,
                                  seeded_keys,
                                  seeded_index,
                                  ws.seed,
                                  *_edit_args(bias, penalties),
                                  ws.stats if rules or logprobs else None,
                                  ws.num_chunks,
                                  ws.edited_segment_max if rules else None,
                                  ws.num_segments,
                                  ws.best,
                                  ws.best_col,
                                  ws.arrivals,
                                  tokens,
                                  *lp_args,
                                  next_keys,
                                  HAS_THRESHOLD=threshold is not None,
                                  TOP_N_SIGMA=top_n_sigma is not None,
                                  MIN_P=min_p is not None,
                                  HAS_SEEDED=seeded_keys is not None,
                                  HAS_BIAS=bias is not None,
                                  HAS_PENALTIES=penalties is not None,
                                  LOGPROBS=logprobs,
                                  RECORD_COUNTS=record_counts,
                                  RECORD_KEYS=next_keys is not None,
                                  KEY_STEP=KEY_STEP,
                                  KEY_MASK=KEY_MASK,
                                  TILE=_TILE,
                                  CHUNK_TILES=_CHUNK_TILES,
                                  **lp_constants,
                                  num_warps=_NUM_WARPS)


# ------------------------------------------------------------ seeded_log_q
@triton.jit
def _seeded_log_q_kernel(keys_ptr, ids_ptr, out_ptr, width,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    key = tl.load(keys_ptr + row)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    ids = tl.load(ids_ptr + row.to(tl.int64) * width + cols, mask=mask, other=0)
    # The four outputs of each id's counter, then output id % 4: the noise
    # _sample_kernel gives that column of a seeded row.
    r0, r1, r2, r3 = tl.randint4x(key, ids // 4)
    j = ids % 4
    bits = tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    tl.store(out_ptr + row.to(tl.int64) * width + cols,
             tl.log(-tl.log(u)),
             mask=mask)


def seeded_log_q(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The noise log q that ``sample`` gives seeded rows with keys
    ``keys`` [S] int64 at ``token_ids`` [S, W] (int64). -> [S, W] float32"""
    token_ids = token_ids.to(torch.int64).contiguous()
    num_rows, width = token_ids.shape
    out = torch.empty(num_rows,
                      width,
                      dtype=torch.float32,
                      device=token_ids.device)
    block = 1024
    if num_rows and width:
        _seeded_log_q_kernel[(num_rows, _cdiv(width, block))](keys,
                                                              token_ids,
                                                              out,
                                                              width,
                                                              BLOCK=block,
                                                              num_warps=4)
    return out


# -------------------------------------------------------------------- edit
@triton.jit
def _edit_kernel(x_ptr, row_stride, vocab_size, bias_keys_ptr, bias_values_ptr,
                 bias_starts_ptr, row_slots_ptr, seen_ptr, seen_stride,
                 counts_ptr, presence_ptr, frequency_ptr, repetition_ptr,
                 HAS_BIAS: tl.constexpr, HAS_PENALTIES: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    bias_lo, bias_hi, slot, presence, frequency, repetition = _edit_params(
        row, bias_starts_ptr, row_slots_ptr, presence_ptr, frequency_ptr,
        repetition_ptr, HAS_BIAS, HAS_PENALTIES)
    # Rows without edits read and write nothing.
    edited = (bias_hi > bias_lo) | (slot >= 0)
    cols = start + tl.arange(0, BLOCK)
    mask = (cols < vocab_size) & edited
    x_at = x_ptr + row.to(tl.int64) * row_stride + cols
    x = tl.load(x_at, mask=mask, other=0.0)
    row_start = row.to(tl.int64) * vocab_size
    entry, next_col = _first_bias_entry(bias_keys_ptr, bias_lo, bias_hi,
                                        row_start, start, HAS_BIAS)
    x, _, _ = _edit(x, cols, start // 8 + tl.arange(0, BLOCK // 8), start,
                    start + BLOCK, row_start, vocab_size, bias_keys_ptr,
                    bias_values_ptr, entry, next_col, bias_hi, slot, seen_ptr,
                    seen_stride, counts_ptr, presence, frequency, repetition,
                    HAS_BIAS, HAS_PENALTIES)
    tl.store(x_at, x, mask=mask)


def edit(x: torch.Tensor, bias: "LogitBias | None",
         penalties: "PenaltyCounts | None") -> None:
    """``bias`` then ``penalties`` on ``x`` [N, V] float32 (columns
    contiguous), in place: what ``sample`` does where it reads a logit."""
    assert x.dtype == torch.float32 and x.stride(-1) == 1
    if bias is None and penalties is None:
        return
    num_rows, vocab_size = x.shape
    block = 2048
    _edit_kernel[(num_rows, _cdiv(vocab_size,
                                  block))](x,
                                           x.stride(0),
                                           vocab_size,
                                           *_edit_args(bias, penalties),
                                           HAS_BIAS=bias is not None,
                                           HAS_PENALTIES=penalties is not None,
                                           BLOCK=block,
                                           num_warps=4)


# --------------------------------------------------------------- row_stats
@triton.jit
def _row_stats_kernel(stats_ptr, num_chunks, max_ptr, sigma_ptr,
                      SIGMA: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    row = tl.program_id(0)
    row_max, sigma, _, _ = _row_stats_of(stats_ptr, row, num_chunks,
                                         CHUNKS_POW2)
    tl.store(max_ptr + row, row_max)
    if SIGMA:
        tl.store(sigma_ptr + row, sigma)


def row_stats(x: torch.Tensor,
              sigma: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's max [N] float32 and, with ``sigma``, the population
    standard deviation of its finite values [N] float32, in one pass."""
    x = _columns_contiguous(x)
    ws = _workspace_of(x)
    _stats(x, ws, None, None, True, sigma, False)
    out = torch.empty(2, x.shape[0], dtype=torch.float32, device=x.device)
    _row_stats_kernel[(x.shape[0], )](ws.stats,
                                      ws.num_chunks,
                                      out[0],
                                      out[1],
                                      SIGMA=sigma,
                                      CHUNKS_POW2=ws.chunks_pow2,
                                      num_warps=1)
    return out[0], out[1] if sigma else None


# ----------------------------------------------------------- topk_logprobs
def topk_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sampler.compute_topk_logprobs`` of one chunk, without log_softmax
    over [M, V]: log p = x - logsumexp(x), only where it is returned.
    -> ids [M, k+1] (``token_ids`` [M], then the top ``k``), their log
    probabilities [M, k+1] float32 and the tokens' ranks [M].

    Ranks count the logits greater than the token's: the order of the
    logprobs, except that log_softmax's float32 rounding can make nearby
    16-bit logits equal (a tie there, not here).
    """
    logits = _columns_contiguous(logits)
    num_rows, vocab_size = logits.shape
    ws = _workspace_of(logits)
    _stats(logits, ws, None, None, False, False, True)
    buffer = _output_buffer(num_rows, k, logits.device)
    _, *outputs = _host_outputs(buffer, num_rows, k)
    lp_args, lp_constants = _logprobs_args(ws, k, tuple(outputs))
    _finish_kernel[(num_rows, )](
        logits,
        logits.stride(0),
        vocab_size,
        token_ids.to(torch.int64).reshape(num_rows).contiguous(),
        ws.stats,
        ws.num_chunks,
        ws.num_segments,
        *lp_args,
        **lp_constants,
        num_warps=_NUM_WARPS)
    _top_k_elsewhere(logits, ws, k, buffer)
    ids, values, ranks = outputs
    return ids, values, ranks


# -------------------------------------------------------------- mark_tokens
@triton.jit
def _mark_tokens_kernel(keys_ptr, num_keys, tokens_ptr, rows_ptr, counts_ptr,
                        seen_ptr, seen_stride, vocab_size, COUNT: tl.constexpr,
                        ADD_TOKENS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < num_keys
    key = tl.load(keys_ptr + i, mask=mask, other=0)
    if ADD_TOKENS:
        row = tl.load(rows_ptr + i, mask=mask, other=0)
        key += tl.load(tokens_ptr + row, mask=mask, other=0)
    slot = key // vocab_size
    token = key - slot * vocab_size
    if COUNT:
        tl.atomic_add(counts_ptr + key, 1, mask=mask)
    # Bit 31 wraps to int32's sign bit, as in SamplingState's torch code.
    bit = (tl.full(token.shape, 1, tl.int64) << (token % 32)).to(tl.int32)
    tl.atomic_or(seen_ptr + slot * seen_stride + token // 32, bit, mask=mask)


def mark_tokens(counts: torch.Tensor,
                seen: torch.Tensor,
                keys: torch.Tensor,
                count: bool,
                add: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Set the seen bit of each key (slot * V + token id [K] int64) in
    ``seen`` [slots, W] int32 and, with ``count``, add one to ``counts``
    [slots, V] int32 there (atomics: keys may repeat). With ``add`` =
    (tokens [N], rows [K]), key i is keys[i] + tokens[rows[i]]."""
    num_keys = keys.shape[0]
    if num_keys == 0:
        return
    block = 256
    _mark_tokens_kernel[(_cdiv(num_keys, block), )](keys,
                                                    num_keys,
                                                    *(add or (None, None)),
                                                    counts,
                                                    seen,
                                                    seen.stride(0),
                                                    counts.shape[1],
                                                    COUNT=count,
                                                    ADD_TOKENS=add is not None,
                                                    BLOCK=block,
                                                    num_warps=4)
