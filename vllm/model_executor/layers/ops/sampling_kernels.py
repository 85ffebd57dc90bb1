"""Triton kernels for the sampler's passes over the whole vocabulary.

Each reads a [N, V] tensor (any float dtype, computed in float32; columns
contiguous, rows at any stride), one program per row, in tiles of
``_TILE`` columns (the next tile's load is issued before the current one is
used, to keep enough bytes in flight):

- ``sample``: the whole-vocabulary draw of ``sampler.random_sample``, with
  the thresholds of ``sampler.top_n_sigma_threshold`` and
  ``sampler.min_p_threshold`` computed in the same launch (a first pass for
  each row's max and σ), the greedy rows' argmax, and Gumbel noise made in
  the kernel (Philox). A seeded row's noise is keyed by a key its own
  generator drew for the step, and depends only on that key and the token
  id (``seeded_log_q`` gives the same noise at any token ids).
- ``row_stats``: each row's max and σ (for the thresholds that top-k/top-p
  refine), in one pass.
- ``apply_penalties``: ``sampler.apply_penalties`` with the counts that
  ``SamplingState`` keeps on the device, on the penalised rows of the
  float32 logits, in place (a grid over rows and column blocks).
- ``topk_logprobs``: logprobs without log_softmax over [N, V]: one pass for
  each row's logsumexp, the rank of a given token and the maximum of each
  segment of ``_SEGMENT`` columns, which narrows the top-k search to a few
  segments.

Import it only where triton is installed (``ops.get_sampling_kernels``).
"""
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from vllm.model_executor.sampling_metadata import PenaltyCounts

# Columns a program reads per step (16 per thread with 8 warps), seen as
# [_TILE // _SEGMENT, _SEGMENT] by the passes that reduce segments.
_TILE = 4096
_SEGMENT = 128
_NUM_WARPS = 8
# Philox gives 4 random numbers per call: one call per 4 columns.
_COUNTERS = _TILE // 4


def _columns_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------ jit helpers
@triton.jit
def _load(x_row, cols, vocab_size):
    """Logits at ``cols`` in float32, -inf past the row."""
    return tl.load(x_row + cols, mask=cols < vocab_size,
                   other=float("-inf")).to(tl.float32)


@triton.jit
def _max_and_sigma(x_row, vocab_size, SIGMA: tl.constexpr, TILE: tl.constexpr):
    """A row's max and the population standard deviation σ of its finite
    logits (0.0 without ``SIGMA``), in one pass."""
    cols = tl.arange(0, TILE)
    # Sums of x - shift, with the row's first logit as the shift: a logit
    # lies within a few σ of the mean, so E[d²] - E[d]² cancels little.
    first = tl.load(x_row).to(tl.float32)
    shift = tl.where(tl.abs(first) < float("inf"), first, 0.0)
    row_max = tl.full([TILE], float("-inf"), tl.float32)
    count = tl.zeros([TILE], tl.float32)
    total = tl.zeros([TILE], tl.float32)
    squares = tl.zeros([TILE], tl.float32)
    x_next = _load(x_row, cols, vocab_size)
    for start in range(0, vocab_size, TILE):
        x = x_next
        x_next = _load(x_row, start + TILE + cols, vocab_size)
        row_max = tl.maximum(row_max, x)
        if SIGMA:
            finite = tl.abs(x) < float("inf")
            d = tl.where(finite, x - shift, 0.0)
            count += finite.to(tl.float32)
            total += d
            squares += d * d
    sigma = 0.0
    if SIGMA:
        n = tl.sum(count, axis=0)
        mean = tl.sum(total, axis=0) / n
        variance = tl.maximum(tl.sum(squares, axis=0) / n - mean * mean, 0.0)
        sigma = tl.sqrt(variance)
    return tl.max(row_max, axis=0), sigma


# ------------------------------------------------------------------ sample
@triton.jit
def _log_q(r0, r1, r2, r3, TILE: tl.constexpr):
    """log q, q ~ Exp(1), from Philox's four outputs for TILE // 4
    counters: column 4 c + j of the tile takes output j of counter c."""
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [TILE])
    # u in (0, 1), never 0 or 1: q = -log u is finite and positive.
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return tl.log(-tl.log(u))


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(x_ptr, row_stride, vocab_size, temperature_ptr,
                   threshold_ptr, top_n_sigma_ptr, min_p_ptr, seeded_keys_ptr,
                   seeded_index_ptr, seed, out_ptr, HAS_THRESHOLD: tl.constexpr,
                   TOP_N_SIGMA: tl.constexpr, MIN_P: tl.constexpr,
                   HAS_SEEDED: tl.constexpr, TILE: tl.constexpr,
                   COUNTERS: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * row_stride
    temperature = tl.load(temperature_ptr + row)

    # The smallest logit the row keeps (sampler.py's rules, same formulas).
    threshold = float("-inf")
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + row)
    if TOP_N_SIGMA or MIN_P:
        row_max, sigma = _max_and_sigma(x_row, vocab_size, TOP_N_SIGMA, TILE)
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

    # Philox counters: COUNTERS per tile of each row of the batch, so each
    # logit's noise depends only on the seed, its row and its column; a
    # seeded row has its own key and counts from 0 (column // 4).
    tiles_per_row = tl.cdiv(vocab_size, TILE)
    row_counter = row.to(tl.int64) * tiles_per_row * COUNTERS
    key = seed.to(tl.int64)
    if HAS_SEEDED:
        seeded_index = tl.load(seeded_index_ptr + row)
        if seeded_index >= 0:
            key = tl.load(seeded_keys_ptr + seeded_index)
            row_counter = row_counter * 0
    row_counter += tl.arange(0, COUNTERS)
    cols = tl.arange(0, TILE)
    # Per lane: the best score so far and its column.
    best = tl.full([TILE], float("-inf"), tl.float32)
    best_col = tl.zeros([TILE], tl.int32)
    x_next = _load(x_row, cols, vocab_size)
    for start in range(0, vocab_size, TILE):
        x = x_next
        x_next = _load(x_row, start + TILE + cols, vocab_size)
        x = tl.where(x >= threshold, x, float("-inf"))
        # Truncated rows keep few logits: skip the noise of tiles without.
        if tl.max(x, axis=0) > float("-inf"):
            r0, r1, r2, r3 = tl.randint4x(
                key, row_counter + (start // TILE) * COUNTERS)
            log_q = _log_q(r0, r1, r2, r3, TILE)
            # Greedy rows (T = 0) take the argmax; -inf logits stay -inf.
            score = tl.where(temperature > 0.0, x - temperature * log_q, x)
            better = score > best  # strictly: the first of equal ones wins
            best = tl.where(better, score, best)
            best_col = tl.where(better, start + cols, best_col)
    top = tl.max(best, axis=0)
    # The first column of the best score (column 0 if all are -inf).
    col = tl.min(tl.where(best == top, best_col, vocab_size), axis=0)
    tl.store(out_ptr + row, col.to(tl.int64))


def sample(x: torch.Tensor,
           temperature: torch.Tensor,
           seed: int,
           threshold: torch.Tensor | None = None,
           top_n_sigma: torch.Tensor | None = None,
           min_p: torch.Tensor | None = None,
           seeded_keys: torch.Tensor | None = None,
           seeded_index: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``x`` [N, V], the argmax of x - T log q over the logits at
    or above the row's threshold, q ~ Exp(1): a draw from softmax(x / T)
    over them. -> token ids [N] int64

    ``temperature`` [N] float32; 0 takes the argmax (greedy rows). The
    threshold is the largest of ``threshold`` [N], top-nσ's (``top_n_sigma``
    [N], 0 is off) and min_p's (``min_p`` [N]); None: that rule is off. The
    noise of row i comes from Philox keyed by ``seed`` and each logit's
    position, or, where ``seeded_index[i]`` >= 0, that of
    ``seeded_log_q(seeded_keys[seeded_index[i]], token ids)``.
    """
    x = _columns_contiguous(x)
    num_rows, vocab_size = x.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    assert (seeded_keys is None) == (seeded_index is None)
    _sample_kernel[(num_rows, )](x,
                                 x.stride(0),
                                 vocab_size,
                                 temperature,
                                 threshold,
                                 top_n_sigma,
                                 min_p,
                                 seeded_keys,
                                 seeded_index,
                                 seed,
                                 out,
                                 HAS_THRESHOLD=threshold is not None,
                                 TOP_N_SIGMA=top_n_sigma is not None,
                                 MIN_P=min_p is not None,
                                 HAS_SEEDED=seeded_keys is not None,
                                 TILE=_TILE,
                                 COUNTERS=_COUNTERS,
                                 num_warps=_NUM_WARPS)
    return out


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
        _seeded_log_q_kernel[(num_rows, triton.cdiv(width, block))](keys,
                                                                    token_ids,
                                                                    out,
                                                                    width,
                                                                    BLOCK=block,
                                                                    num_warps=4)
    return out


# --------------------------------------------------------------- row_stats
@triton.jit
def _row_stats_kernel(x_ptr, row_stride, vocab_size, max_ptr, sigma_ptr,
                      SIGMA: tl.constexpr, TILE: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * row_stride
    row_max, sigma = _max_and_sigma(x_row, vocab_size, SIGMA, TILE)
    tl.store(max_ptr + row, row_max)
    if SIGMA:
        tl.store(sigma_ptr + row, sigma)


def row_stats(x: torch.Tensor,
              sigma: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's max [N] float32 and, with ``sigma``, the population
    standard deviation of its finite values [N] float32, in one pass."""
    x = _columns_contiguous(x)
    num_rows, vocab_size = x.shape
    out = torch.empty(2, num_rows, dtype=torch.float32, device=x.device)
    _row_stats_kernel[(num_rows, )](x,
                                    x.stride(0),
                                    vocab_size,
                                    out[0],
                                    out[1],
                                    SIGMA=sigma,
                                    TILE=_TILE,
                                    num_warps=_NUM_WARPS)
    return out[0], out[1] if sigma else None


# --------------------------------------------------------- apply_penalties
@triton.jit
def _apply_penalties_kernel(x_ptr, row_stride, vocab_size, rows_ptr, slots_ptr,
                            counts_ptr, in_prompt_ptr, presence_ptr,
                            frequency_ptr, repetition_ptr, BLOCK: tl.constexpr):
    row = tl.load(rows_ptr + tl.program_id(0))
    slot = tl.load(slots_ptr + tl.program_id(0))
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab_size
    x_at = x_ptr + row * row_stride + cols
    x = tl.load(x_at, mask=mask)
    count = tl.load(counts_ptr + slot * vocab_size + cols, mask=mask, other=0)
    in_prompt = tl.load(in_prompt_ptr + slot * vocab_size + cols,
                        mask=mask,
                        other=0)
    in_output = count > 0
    repetition = tl.load(repetition_ptr + row)
    # IEEE division, as torch's: x / r must round the same way.
    penalised = tl.where(x > 0, tl.math.div_rn(x, repetition), x * repetition)
    x = tl.where(in_output | (in_prompt != 0), penalised, x)
    x = (x - tl.load(frequency_ptr + row) * count.to(tl.float32) -
         tl.load(presence_ptr + row) * in_output.to(tl.float32))
    tl.store(x_at, x, mask=mask)


def apply_penalties(x: torch.Tensor, penalties: "PenaltyCounts") -> None:
    """Repetition, frequency and presence penalties on the rows
    ``penalties.rows`` of ``x`` [N, V] float32 (columns contiguous), in
    place, from each row's slot of the counts."""
    assert x.dtype == torch.float32 and x.stride(-1) == 1
    num_rows = penalties.rows.shape[0]
    vocab_size = x.shape[1]
    block = 2048
    _apply_penalties_kernel[(num_rows, triton.cdiv(vocab_size, block))](
        x,
        x.stride(0),
        vocab_size,
        penalties.rows,
        penalties.slots,
        penalties.counts,
        penalties.in_prompt.view(torch.uint8),
        penalties.presence,
        penalties.frequency,
        penalties.repetition,
        BLOCK=block,
        num_warps=4)


# ----------------------------------------------------------- topk_logprobs
@triton.jit
def _logprob_stats_kernel(x_ptr, row_stride, vocab_size, token_ptr, chosen_ptr,
                          rank_ptr, row_max_ptr, log_sum_ptr, segment_max_ptr,
                          num_segments, TILE: tl.constexpr,
                          SEGMENT: tl.constexpr):
    ROWS: tl.constexpr = TILE // SEGMENT
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * row_stride
    chosen = tl.load(x_row + tl.load(token_ptr + row)).to(tl.float32)
    # A tile as [ROWS, SEGMENT]: segment r of the tile is its row r.
    cols = (tl.arange(0, ROWS)[:, None] * SEGMENT +
            tl.arange(0, SEGMENT)[None, :])
    # Per lane: max, sum of exp(x - max), count above the chosen logit.
    run_max = tl.full([ROWS, SEGMENT], float("-inf"), tl.float32)
    sum_exp = tl.zeros([ROWS, SEGMENT], tl.float32)
    num_above = tl.zeros([ROWS, SEGMENT], tl.int32)
    x_next = _load(x_row, cols, vocab_size)
    for start in range(0, vocab_size, TILE):
        x = x_next
        x_next = _load(x_row, start + TILE + cols, vocab_size)
        new_max = tl.maximum(run_max, x)
        # A lane still at -inf holds 0 (not exp(-inf - -inf) = NaN).
        sum_exp = tl.where(
            new_max == float("-inf"), 0.0,
            sum_exp * tl.exp(run_max - new_max) + tl.exp(x - new_max))
        run_max = new_max
        num_above += (x > chosen).to(tl.int32)
        segments = start // SEGMENT + tl.arange(0, ROWS)
        tl.store(segment_max_ptr + row.to(tl.int64) * num_segments + segments,
                 tl.max(x, axis=1),
                 mask=segments < num_segments)
    row_max = tl.max(tl.max(run_max, axis=1), axis=0)
    scale = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - row_max))
    total = tl.sum(tl.sum(sum_exp * scale, axis=1), axis=0)
    log_sum = tl.log(total)
    tl.store(row_max_ptr + row, row_max)
    tl.store(log_sum_ptr + row, log_sum)
    # Rounded as log_softmax is: (x - max) - log(sum(exp(x - max))).
    tl.store(chosen_ptr + row, (chosen - row_max) - log_sum)
    num_above_row = tl.sum(tl.sum(num_above, axis=1), axis=0)
    tl.store(rank_ptr + row, num_above_row.to(tl.int64) + 1)


def topk_logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sampler.compute_topk_logprobs`` of one chunk, without log_softmax
    over [M, V]: log p = x - logsumexp(x), only where it is returned.
    -> the log probabilities of ``token_ids`` [M, 1] and their ranks [M],
    then the top ``k`` log probabilities and their ids [M, k].

    Ranks count the logits greater than the token's: the order of the
    logprobs, except that log_softmax's float32 rounding can make nearby
    16-bit logits equal (a tie there, not here). The top k are searched for
    in the k segments with the largest maxima: they hold the k largest
    logits (up to ties).
    """
    logits = _columns_contiguous(logits)
    num_rows, vocab_size = logits.shape
    token_ids = token_ids.reshape(num_rows).contiguous()
    num_segments = triton.cdiv(vocab_size, _SEGMENT)
    # log p = (x - max) - log(sum(exp(x - max))), rounded as log_softmax is.
    chosen, row_max, log_sum = torch.empty(3,
                                           num_rows,
                                           1,
                                           dtype=torch.float32,
                                           device=logits.device)
    ranks = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    segment_max = torch.empty(num_rows,
                              num_segments,
                              dtype=torch.float32,
                              device=logits.device)
    _logprob_stats_kernel[(num_rows, )](logits,
                                        logits.stride(0),
                                        vocab_size,
                                        token_ids,
                                        chosen,
                                        ranks,
                                        row_max,
                                        log_sum,
                                        segment_max,
                                        num_segments,
                                        TILE=_TILE,
                                        SEGMENT=_SEGMENT,
                                        num_warps=_NUM_WARPS)
    if k * _SEGMENT * 4 > vocab_size:
        # A large k: the segments would hold most of the row anyway.
        top_values, top_ids = logits.topk(k, dim=-1)
    else:
        segments = segment_max.topk(k, dim=-1).indices  # [M, k]
        ids = (segments.unsqueeze(2) * _SEGMENT +
               torch.arange(_SEGMENT, device=logits.device)).view(
                   num_rows, -1)  # [M, k * SEGMENT]
        # Past the row (the last segment's tail): -inf, at a valid id.
        past = ids >= vocab_size
        ids = ids.clamp_(max=vocab_size - 1)
        candidates = logits.gather(dim=1, index=ids).float()
        candidates.masked_fill_(past, float("-inf"))
        top_values, best = candidates.topk(k, dim=-1)
        top_ids = ids.gather(dim=1, index=best)
    return (chosen, ranks, (top_values.float() - row_max).sub_(log_sum),
            top_ids)
