"""The sampler: logits of the last token of each sequence -> next token ids.

``Sampler.forward`` is a pipeline of small functions over a float32 copy of
the logits ``[N, V]`` (each takes and returns the logits, changing them in
place), in vLLM's order:

1. ``apply_logits_processors``: per-request Python callables (slow path);
2. masks and bias: ``apply_allowed_token_ids``, ``apply_bad_words``,
   ``apply_min_tokens``, ``apply_logit_bias``;
3. ``apply_penalties``: repetition, frequency and presence.

These change which token is best, so they apply to every row; greedy rows
then take the argmax (an all-greedy batch that edits nothing takes it on the
logits as they are, without a copy). For the random rows, ``sample`` gives
each row the smallest logit it keeps, from temperature, top-nσ, min_p and
top-k/top-p in that order, and draws with the Gumbel-max trick: over the
whole vocabulary (``random_sample``), or, when every random row has a top_k
or a top_p (on CUDA without triton: or a min_p or a top-nσ), only over its
largest logits, sorted by ``torch.topk`` (``sample_candidates``).

NOTE: temperature never costs a pass over [N, V]. A draw from
softmax(x / T) is argmax(x / T + g) = argmax(x + T * g) with Gumbel noise g,
so the draw scales the noise instead of the logits, and each truncation is
written as a threshold on the unscaled x: top-k and top-nσ are the same on
both scales, min_p and top-p take T into account.

On CUDA with triton installed, the passes over the whole vocabulary are
Triton kernels (``ops/sampling_kernels.py``; the torch code stays the CPU
path and the reference). Without top-k/top-p the whole step is one
``kernels.sample`` (``fused_random_sample``, two launches) on the logits
as they are: logit_bias and the penalties (``PenaltyCounts``) are applied
where each logit is read, then the top-nσ and min_p thresholds, the draw
(greedy rows: the argmax) and the logprobs; the float32 copy exists only
when logits processors or masks rewrite logits. With top-k/top-p,
``kernels.edit`` applies bias and penalties to the copy in one launch, and
``fused_random_sample`` still draws when no recheck can be needed. Logprobs
never build log_softmax over [N, V]. The fused step also records what the
next step needs (``StepRecord``: the tokens in ``SamplingState``'s penalty
counts, the seeded rows' next keys), so that its ``prepare`` has nothing to
upload.

Nothing sorts the whole vocabulary: top-k/top-p look at each row's largest
logits (``torch.topk``). A row whose kept tokens may reach past them (a long
top-p nucleus, or ties beyond the sorted slice) is marked; the one
device-to-host copy of the step (``SamplerOutput.to_host``) brings the
marks with the sampled ids, and only then, when some row is marked, are
those rows drawn again over the whole vocabulary, exactly. Otherwise nothing
here syncs with the host.

The input logits are never modified: logprobs are those of the raw model
output, as in vLLM V1 (``compute_topk_logprobs``, written so that prompt
logprobs can reuse it once the engine computes them).
"""
from dataclasses import dataclass
from types import ModuleType

import torch

from vllm.model_executor.layers.ops import get_sampling_kernels
from vllm.model_executor.layers.ops.launch_graphs import LaunchGraphs
from vllm.model_executor.sampling_metadata import (PenaltyCounts,
                                                   PenaltyTensors,
                                                   SamplingMetadata, seen_mask)

# Rows of logits that compute_topk_logprobs handles at once (x V floats).
_LOGPROBS_CHUNK_ELEMENTS = 1 << 26
# Logits sorted (by torch.topk, which on CUDA selects without sorting the
# row) for rows that keep an unknown number of them: top_p without top_k,
# and min_p / top-nσ when the draw uses only the sorted logits.
_CANDIDATES = 8192
# Logits sorted beyond those when the draw uses only the sorted ones: room
# for ties with the last logit kept.
_TIE_MARGIN = 64
# Devices where rows with only min_p / top-nσ draw from sorted candidates
# too: CUDA's topk selects them without sorting the row, cheaper than a
# draw over the whole vocabulary; a CPU topk of _CANDIDATES costs about two.
_CANDIDATE_DRAW_DEVICES = ("cuda", )


@dataclass
class LogprobsTensors:
    """Log probabilities of the raw model output for each row.

    Rows that asked for fewer logprobs than K use the first columns.
    """
    logprob_token_ids: torch.Tensor  # [N, K+1] int64: given token, then top-K
    logprobs: torch.Tensor  # [N, K+1] float32
    selected_token_ranks: torch.Tensor  # [N] int64; 1 = most likely


@dataclass
class Recheck:
    """Random rows whose draw may have missed some of their tokens, and what
    drawing them again over the whole vocabulary needs."""
    rows: torch.Tensor  # [N] bool
    logits: torch.Tensor  # the sampler's input, for the logprobs
    work: torch.Tensor  # [N, V] float32, after every edit
    threshold: torch.Tensor  # [N] the smallest logit each row keeps
    # Top-p rows whose nucleus may end past the sorted logits (their
    # threshold is then too low) [N] bool, with the threshold of the rules
    # before top-p and the top-p normaliser [N, 1].
    long_nucleus: torch.Tensor | None
    threshold_before_top_p: torch.Tensor | None
    log_z: torch.Tensor | None
    # The noise log q: of the whole draw [N, V], or that of the seeded rows
    # only; the other rows then draw again.
    log_q: torch.Tensor | None
    seeded_noise: "SeededNoise | None"
    md: SamplingMetadata


@dataclass
class SamplerOutput:
    # [N] int64; with a recheck, final only once to_host() has run.
    sampled_token_ids: torch.Tensor
    logprobs_tensors: LogprobsTensors | None  # None when no row asked
    recheck: Recheck | None = None  # None: every row is exact

    def start_copy(self) -> "HostCopy":
        """Queue the copy of everything ``to_host`` needs: the ids, the
        recheck marks and the logprobs."""
        tensors = [self.sampled_token_ids]
        if self.recheck is not None:
            tensors.append(self.recheck.rows)
        lp = self.logprobs_tensors
        if lp is not None:
            tensors += [
                lp.logprob_token_ids, lp.logprobs, lp.selected_token_ranks
            ]
        return HostCopy(tensors)

    def to_host(
        self,
        copy: "HostCopy | None" = None
    ) -> tuple[list[int], LogprobsTensors | None]:
        """The sampled ids and logprobs on the host, from ``copy`` (that of
        ``start_copy``, started now when None).

        The step waits for the device once. Only when some row is marked
        for a recheck are those rows drawn again, exactly, before a second
        copy.
        """
        host = (copy or self.start_copy()).wait()
        recheck, self.recheck = self.recheck, None
        if recheck is not None:
            rows = host.pop(1).nonzero().view(-1).tolist()
            if rows:
                _sample_again(self, recheck, rows)
                return self.to_host()
        sampled = host[0].tolist()
        if self.logprobs_tensors is None:
            return sampled, None
        return sampled, LogprobsTensors(*host[1:])


class HostCopy:
    """CPU copies of tensors of one device. From CUDA: asynchronous copies
    to pinned memory, queued now, waited for by ``wait``."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._event = None
        self._tensors = tensors
        if not tensors[0].is_cuda:
            return
        storage = tensors[0].untyped_storage()
        if (len(tensors) > 1
                and all(t.untyped_storage().data_ptr() == storage.data_ptr()
                        for t in tensors[1:])
                and storage.nbytes() <= 2 * sum(t.nbytes for t in tensors)):
            # Views of one buffer they fill (the fused kernels' outputs):
            # one copy of its bytes, the same views of the host copy.
            host = torch.empty(storage.nbytes(),
                               dtype=torch.uint8,
                               pin_memory=True)
            host.untyped_storage().copy_(storage, non_blocking=True)
            # One view per dtype, then one op per tensor.
            typed = {
                dtype: host.view(dtype)
                for dtype in {t.dtype
                              for t in tensors}
            }
            self._tensors = [
                typed[t.dtype].as_strided(t.shape, t.stride(),
                                          t.storage_offset()) for t in tensors
            ]
        else:
            self._tensors = [
                torch.empty(t.shape, dtype=t.dtype,
                            pin_memory=True).copy_(t, non_blocking=True)
                for t in tensors
            ]
        self._event = torch.cuda.Event()
        # The stream of the tensors' device, named: without a device,
        # current_stream() first asks which device is current (slower).
        self._event.record(torch.cuda.current_stream(tensors[0].device))

    def wait(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return list(self._tensors)


class Sampler(torch.nn.Module):
    """Samples one token per row of logits, as ``SamplingMetadata`` says.

    ``cuda_graphs``: the fused kernels' launches replay as CUDA graphs when
    a step repeats those of a step before with the same arguments (a batch
    whose sequences stay the same: ``LaunchGraphs``); False launches them
    at every step (``enforce_eager``).
    """

    def __init__(self, cuda_graphs: bool = True) -> None:
        super().__init__()
        self.graphs = LaunchGraphs() if cuda_graphs else None

    def forward(self, logits: torch.Tensor,
                sampling_metadata: SamplingMetadata) -> SamplerOutput:
        """``logits`` [N, V] (any float dtype) is not modified."""
        md = sampling_metadata
        recheck = None
        logprobs_tensors = None
        kernels = _sampling_kernels(logits)
        if md.all_greedy and not md.edits_logits:
            # The argmax of the logits as they are: a float32 copy would
            # give the same token (the conversion is exact).
            sampled = logits.argmax(dim=-1)
        elif kernels is not None and _fuses_step(md):
            # Bias, penalties, thresholds, draw and logprobs in the kernels;
            # a float32 copy only when something masks or rewrites logits.
            work = apply_masks(logits, md, copy=False)
            sampled, logprobs_tensors = fused_random_sample(kernels,
                                                            work,
                                                            md,
                                                            edit=True,
                                                            logprobs=work
                                                            is logits,
                                                            graphs=self.graphs)
        else:
            work = apply_masks(logits, md, copy=True)
            work = apply_bias_and_penalties(work, md, kernels)
            sampled, recheck = sample(work, md, logits)  # [N]

        if md.max_num_logprobs is not None and logprobs_tensors is None:
            logprobs_tensors = compute_topk_logprobs(logits, sampled,
                                                     md.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled,
                             logprobs_tensors=logprobs_tensors,
                             recheck=recheck)


# ------------------------------------------------ steps that apply to all rows
def _fuses_step(md: SamplingMetadata) -> bool:
    """Whether ``kernels.sample`` does the whole step: no top-k/top-p (they
    sort the edited logits) and penalties as device counts."""
    return (md.top_k is None and md.top_p is None
            and not isinstance(md.penalties, PenaltyTensors))


def apply_masks(logits: torch.Tensor, md: SamplingMetadata,
                copy: bool) -> torch.Tensor:
    """The logits processors and the masks (allowed tokens, bad words,
    min_tokens) on a float32 copy; ``logits`` itself when none applies and
    not ``copy``."""
    if not copy and not (md.logits_processors or md.has_masked_tokens):
        return logits
    # [N, V] float32, our own contiguous copy.
    work = logits.to(torch.float32,
                     memory_format=torch.contiguous_format,
                     copy=True)
    work = apply_logits_processors(work, md)
    work = apply_allowed_token_ids(work, md)
    work = apply_bad_words(work, md)
    return apply_min_tokens(work, md)


def apply_bias_and_penalties(logits: torch.Tensor, md: SamplingMetadata,
                             kernels: ModuleType | None) -> torch.Tensor:
    """``apply_logit_bias`` then ``apply_penalties``; one launch of
    ``kernels.edit`` when the penalties are device counts."""
    if kernels is not None and not isinstance(md.penalties, PenaltyTensors):
        kernels.edit(logits, md.logit_bias, md.penalties)
        return logits
    return apply_penalties(apply_logit_bias(logits, md), md)


def apply_logits_processors(logits: torch.Tensor,
                            md: SamplingMetadata) -> torch.Tensor:
    """Each request's own logits processors, in order, on its row."""
    for row, processors in md.logits_processors:
        row_logits = logits[row]  # [V], a view
        output_ids = md.output_token_ids[row]
        for fn, takes_prompt in processors:
            if takes_prompt:
                row_logits = fn(md.prompt_token_ids[row], output_ids,
                                row_logits)
            else:
                row_logits = fn(output_ids, row_logits)
        logits[row] = row_logits  # a no-op copy when changed in place
    return logits


def apply_allowed_token_ids(logits: torch.Tensor,
                            md: SamplingMetadata) -> torch.Tensor:
    """Rows with allowed_token_ids keep only those tokens' logits."""
    if md.allowed_token_ids is None:
        return logits
    rows, allowed = md.allowed_token_ids
    kept = logits[allowed]  # [A]
    logits.index_fill_(0, rows, float("-inf"))
    return logits.index_put_(allowed, kept)


def apply_bad_words(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Forbid the tokens that would complete a bad word."""
    if md.bad_words_mask is None:
        return logits
    return logits.index_put_(md.bad_words_mask,
                             logits.new_full((1, ), float("-inf")))


def apply_min_tokens(logits: torch.Tensor,
                     md: SamplingMetadata) -> torch.Tensor:
    """Forbid the stop ids (EOS included) of rows below their min_tokens."""
    if md.min_tokens_mask is None:
        return logits
    return logits.index_put_(md.min_tokens_mask,
                             logits.new_full((1, ), float("-inf")))


def apply_logit_bias(logits: torch.Tensor,
                     md: SamplingMetadata) -> torch.Tensor:
    """Add each request's logit_bias to its tokens."""
    if md.logit_bias is None:
        return logits
    # One launch; each position appears once, so the sum is exact.
    logits.view(-1).index_add_(0, md.logit_bias.keys, md.logit_bias.values)
    return logits


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty r on tokens of the prompt or the output (positive
    logits / r, negative ones * r), then - frequency * count - presence *
    (count > 0) with the token's count in the output.

    With ``PenaltyCounts`` (``SamplingState`` keeps each sequence's counts
    on the device), the penalised rows are rewritten whole (the kernels do
    it where they read the logits). ``PenaltyTensors`` list the tokens
    seen: only those [T] positions change, never [N, V]; their output
    counts come from one sort of the output keys and two binary searches (a
    token seen several times is written several times, always with the
    same value).
    """
    penalties = md.penalties
    if penalties is None:
        return logits
    if isinstance(penalties, PenaltyCounts):
        return _apply_penalty_counts(logits, penalties)
    flat = logits.view(-1)  # [N * V]; keys index it
    # The positions whose logits change: every token seen.
    keys = torch.cat([penalties.output_keys, penalties.prompt_keys])
    sorted_output = penalties.output_keys.sort().values  # [T_out]
    count = (torch.searchsorted(sorted_output, keys, right=True) -
             torch.searchsorted(sorted_output, keys))  # [T] in the output
    rows = keys // logits.shape[-1]  # [T]
    values = flat.index_select(0, keys)  # [T]
    repetition = penalties.repetition[rows]
    values = torch.where(values > 0, values / repetition, values * repetition)
    values = (values - penalties.frequency[rows] * count -
              penalties.presence[rows] * (count > 0))
    flat[keys] = values
    return logits


def _apply_penalty_counts(logits: torch.Tensor,
                          penalties: PenaltyCounts) -> torch.Tensor:
    """``apply_penalties`` on whole rows [P, V], the same arithmetic."""
    rows = penalties.rows
    counts = penalties.counts.index_select(0, penalties.slots)  # [P, V]
    in_output = counts > 0
    seen = seen_mask(penalties.seen.index_select(0, penalties.slots),
                     logits.shape[-1])
    values = logits.index_select(0, rows)
    repetition = penalties.repetition[rows].unsqueeze(1)
    values = torch.where(
        seen, torch.where(values > 0, values / repetition, values * repetition),
        values)
    values = (values - penalties.frequency[rows].unsqueeze(1) * counts -
              penalties.presence[rows].unsqueeze(1) * in_output)
    return logits.index_copy_(0, rows, values)


# ----------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, md: SamplingMetadata,
           raw_logits: torch.Tensor) -> tuple[torch.Tensor, Recheck | None]:
    """Greedy rows take the argmax, the others a random draw. -> [N], and
    the rows to draw again (None: none can need it). ``raw_logits`` is the
    sampler's input (a recheck's logprobs need it).

    Each random row keeps the logits at or above its threshold, from top-nσ,
    min_p, then top-k/top-p (every rule keeps the row's most likely token).
    ``logits`` is consumed, unless rows may have to be drawn again.
    """
    if md.all_greedy:
        return logits.argmax(dim=-1), None
    kernels = _sampling_kernels(logits)
    if kernels is not None and md.top_k is None and md.top_p is None:
        # Thresholds and draw in one launch (two passes over the logits).
        return fused_random_sample(kernels, logits, md)[0], None
    threshold = None
    if md.top_n_sigma is not None or md.min_p is not None:
        row_max, sigma = _row_max_and_sigma(logits, md, kernels)
        threshold = _at_least(top_n_sigma_threshold(logits, row_max, md, sigma),
                              min_p_threshold(row_max, md))
    cut = _top_k_top_p(logits, threshold, md)
    draw_candidates = cut.values is not None and _draws_candidates(logits, md)
    if (kernels is not None and not draw_candidates
            and cut.long_nucleus is None):
        # One pass over the vocabulary, greedy rows included.
        return fused_random_sample(kernels, logits, md, cut.threshold)[0], None
    # Truncation keeps the argmax, so greedy rows need none of it.
    greedy = None if md.all_random else logits.argmax(dim=-1)
    recheck = None
    if draw_candidates:
        assert cut.values is not None
        assert cut.threshold is not None and cut.indices is not None
        seeded_noise = None
        if md.generators:
            seeded_noise = SeededNoise(md, logits, kernels)
        sampled = sample_candidates(cut.values, cut.indices, cut.threshold, md,
                                    seeded_noise)
        last = cut.values[:, -1]
        # Every logit past the sorted ones is <= last: below the threshold,
        # or -inf (it can never be drawn).
        missed = (cut.threshold <= last) & (last > float("-inf"))
        if cut.values.shape[-1] < logits.shape[-1]:
            recheck = _recheck(missed, greedy, raw_logits, logits, cut,
                               threshold, None, seeded_noise, md)
    else:
        sampled, log_q = random_sample(logits,
                                       cut.threshold,
                                       md,
                                       keep_logits=cut.long_nucleus is not None,
                                       kernels=kernels)
        if cut.long_nucleus is not None:
            recheck = _recheck(cut.long_nucleus, greedy, raw_logits, logits,
                               cut, threshold, log_q, None, md)
    if greedy is not None:
        sampled = torch.where(md.is_greedy, greedy, sampled)
    return sampled, recheck


def _sampling_kernels(logits: torch.Tensor) -> ModuleType | None:
    """The Triton kernels (``ops.sampling_kernels``) where they run: CUDA
    logits and triton installed. None: the torch code."""
    if logits.device.type != "cuda":
        return None
    return get_sampling_kernels()


def _draws_candidates(logits: torch.Tensor, md: SamplingMetadata) -> bool:
    """Whether the draw uses only each row's sorted largest logits: when
    every random row has top_k or top_p (sorted anyway), or, on
    ``_CANDIDATE_DRAW_DEVICES`` without the kernels, when the other random
    rows have min_p or top-nσ (cheaper than torch's passes over the whole
    vocabulary, dearer than the fused kernel's)."""
    return md.top_k_top_p_everywhere or (md.truncated_everywhere
                                         and logits.device.type
                                         in _CANDIDATE_DRAW_DEVICES
                                         and _sampling_kernels(logits) is None)


def _recheck(rows: torch.Tensor, greedy: torch.Tensor | None,
             raw_logits: torch.Tensor, work: torch.Tensor, cut: "_Cut",
             threshold_before_top_p: torch.Tensor | None,
             log_q: torch.Tensor | None, seeded_noise: "SeededNoise | None",
             md: SamplingMetadata) -> Recheck:
    assert cut.threshold is not None
    return Recheck(rows=rows if greedy is None else rows & ~md.is_greedy,
                   logits=raw_logits,
                   work=work,
                   threshold=cut.threshold,
                   long_nucleus=cut.long_nucleus,
                   threshold_before_top_p=threshold_before_top_p,
                   log_z=cut.log_z,
                   log_q=log_q,
                   seeded_noise=seeded_noise,
                   md=md)


def _row_max_and_sigma(
        logits: torch.Tensor, md: SamplingMetadata,
        kernels: ModuleType | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's largest logit [N], and σ for top-nσ [N] when the kernels
    compute both in one pass (else None: ``top_n_sigma_threshold`` computes
    it)."""
    if kernels is None:
        return logits.amax(dim=-1), None
    return kernels.row_stats(logits, sigma=md.top_n_sigma is not None)


def top_n_sigma_threshold(
        logits: torch.Tensor,
        row_max: torch.Tensor,
        md: SamplingMetadata,
        sigma: torch.Tensor | None = None) -> torch.Tensor | None:
    """Top-nσ: keep logits >= max - n * σ (σ: population standard deviation
    of the row's finite logits, computed here unless given). Dividing by T
    scales max and σ alike, so the unscaled logits give the same tokens."""
    if md.top_n_sigma is None:
        return None
    if sigma is None and md.has_masked_tokens:
        sigma = _finite_std(logits)
    elif sigma is None:
        sigma = logits.std(dim=-1, correction=0)
    threshold = row_max - md.top_n_sigma * sigma
    return threshold.masked_fill(md.top_n_sigma == 0.0, float("-inf"))


def _finite_std(logits: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each row's finite entries. -> [N]"""
    finite = logits.isfinite()  # [N, V]
    count = finite.sum(dim=-1)  # [N]
    mean = torch.where(finite, logits, 0.0).sum(dim=-1) / count
    deviation = torch.where(finite, logits - mean.unsqueeze(1), 0.0)
    return (deviation.square().sum(dim=-1) / count).sqrt()


def min_p_threshold(row_max: torch.Tensor,
                    md: SamplingMetadata) -> torch.Tensor | None:
    """min_p: drop tokens less likely than min_p times the most likely one.
    p / p_max = exp((x - x_max) / T) >= min_p  <=>  x >= x_max + T log min_p
    (min_p = 0 gives -inf: nothing dropped)."""
    if md.min_p is None:
        return None
    return row_max + md.temperature * md.min_p.log()


def top_k_top_p_threshold(logits: torch.Tensor, threshold: torch.Tensor | None,
                          md: SamplingMetadata) -> torch.Tensor | None:
    """Keep the k most likely tokens, then the smallest set of the most
    likely ones whose probability (renormalised over what earlier steps
    kept) reaches p. Tokens tied with the last one kept are kept too."""
    return _top_k_top_p(logits, threshold, md).threshold


@dataclass
class _Cut:
    threshold: torch.Tensor | None  # [N]
    # Each row's largest logits, sorted, and their token ids [N, W]; None
    # when no row uses top_k or top_p.
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    # Top-p rows without top_k whose nucleus may end past the sorted logits
    # [N] bool, and the top-p normaliser [N, 1]; None when every top-p row
    # has a top_k or the whole vocabulary was sorted.
    long_nucleus: torch.Tensor | None = None
    log_z: torch.Tensor | None = None


def _top_k_top_p(logits: torch.Tensor, threshold: torch.Tensor | None,
                 md: SamplingMetadata) -> _Cut:
    """``top_k_top_p_threshold``, without a sort of the whole vocabulary.

    Both rules look only at each row's largest logits, sorted by
    ``torch.topk``: the largest top_k of the batch when every top-p row also
    has a top_k (top_p then renormalises over that slice). Rows with top_p
    and no top_k use at least ``_CANDIDATES`` candidates, whose
    probabilities are normalised over the whole row (one more pass over
    [N, V]); where the nucleus does not end inside them, ``long_nucleus``
    says so (their threshold is then too low). When the draw will use only
    these logits (``_draws_candidates``), they are sorted even without top_k
    and top_p (min_p, top-nσ), with ``_TIE_MARGIN`` more.
    """
    draw = _draws_candidates(logits, md)
    if md.top_k is None and md.top_p is None and not draw:
        return _Cut(threshold)
    vocab_size = logits.shape[-1]
    width = md.top_k_top_p_width
    whole_rows = width == vocab_size  # some top-p row has no top_k
    if whole_rows or (draw and not md.top_k_everywhere):
        width = max(md.max_top_k, _CANDIDATES)
    if draw:
        width += _TIE_MARGIN
    width = min(width, vocab_size)
    if width < vocab_size:
        values, indices = logits.topk(width, dim=-1)  # [N, W] descending
    else:
        values, indices = logits.sort(dim=-1, descending=True)  # [N, V]
    earlier = threshold
    if threshold is None:
        threshold = logits.new_full((logits.shape[0], ), float("-inf"))
    cut = _Cut(threshold, values, indices)

    if md.top_k is not None:
        # "Off" is vocab_size, beyond the slice: those rows keep -inf.
        index = (md.top_k.clamp(max=width) - 1).unsqueeze(1)  # [N, 1]
        kth = values.gather(dim=-1, index=index).squeeze(1)  # [N]
        kth = kth.masked_fill(md.top_k >= vocab_size, float("-inf"))
        threshold = cut.threshold = torch.maximum(threshold, kth)

    if md.top_p is None:
        return cut
    # The survivors so far are a prefix of the sorted slice. top_p
    # renormalises over exactly the k most likely tokens: logits tied with
    # the k-th do not count, whatever the slice's width.
    dropped = values < threshold.unsqueeze(1)
    if md.top_k is not None:
        dropped |= torch.arange(width,
                                device=values.device) >= md.top_k.unsqueeze(1)
    kept = values.masked_fill(dropped, float("-inf"))
    inverse_t = md.temperature.reciprocal().unsqueeze(1)  # [N, 1]
    if whole_rows:
        # The row's max: every rule keeps it.
        shift = -values[:, :1] * inverse_t  # [N, 1]
        cut.log_z = _log_normaliser(logits, earlier, shift, inverse_t)
        probs = _whole_row_probs(kept, shift, inverse_t, cut.log_z)
        if md.top_k is not None:
            probs = torch.where((md.top_k < vocab_size).unsqueeze(1),
                                (kept * inverse_t).softmax(dim=-1), probs)
    else:
        probs = (kept * inverse_t).softmax(dim=-1)
    last, num_kept = _nucleus_end(values, probs, md.top_p)
    nucleus = torch.maximum(threshold, last)
    cut.threshold = torch.where(md.top_p < 1.0, nucleus, threshold)
    if whole_rows and width < vocab_size:
        long_nucleus = (num_kept == width) & (md.top_p < 1.0)
        if md.top_k is not None:
            long_nucleus &= md.top_k >= vocab_size
        cut.long_nucleus = long_nucleus
    return cut


def _log_normaliser(logits: torch.Tensor, threshold: torch.Tensor | None,
                    shift: torch.Tensor,
                    inverse_t: torch.Tensor) -> torch.Tensor:
    """log of sum(exp(x / T + shift)) over each row's logits x at or above
    its threshold. -> [N, 1]"""
    z = torch.addcmul(shift, logits, inverse_t).exp_()  # [N, V]
    if threshold is not None:
        z.masked_fill_(logits < threshold.unsqueeze(1), 0.0)
    return z.sum(dim=-1, keepdim=True).log_()


def _whole_row_probs(kept: torch.Tensor, shift: torch.Tensor,
                     inverse_t: torch.Tensor,
                     log_z: torch.Tensor) -> torch.Tensor:
    """exp(x / T + shift) / Z of sorted logits, with log Z from
    ``_log_normaliser`` (the same shift)."""
    return (torch.addcmul(shift, kept, inverse_t) - log_z).exp_()


def _nucleus_end(values: torch.Tensor, probs: torch.Tensor,
                 top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last logit of each row's nucleus [N] and the nucleus size [N],
    from its sorted logits and their probabilities [N, W]."""
    # A token stays while the tokens more likely than it hold < p.
    mass_before = probs.cumsum(dim=-1) - probs  # [N, W]
    num_kept = (mass_before < top_p.unsqueeze(1)).sum(dim=-1)  # >= 1
    last = values.gather(dim=-1, index=(num_kept - 1).unsqueeze(1))
    return last.squeeze(1), num_kept


def apply_threshold(logits: torch.Tensor,
                    threshold: torch.Tensor | None) -> torch.Tensor:
    """Logits below their row's threshold become -inf."""
    if threshold is None:
        return logits
    return logits.masked_fill_(logits < threshold.unsqueeze(1), float("-inf"))


def _at_least(a: torch.Tensor | None,
              b: torch.Tensor | None) -> torch.Tensor | None:
    """The elementwise larger threshold; None is -inf."""
    if a is None:
        return b
    if b is None:
        return a
    return torch.maximum(a, b)


def _exponential_(q: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``q`` with Exp(1) draws, never 0.

    CUDA uses exponential_ (never 0 there). On the CPU, where exponential_
    is several times slower, q = -log u with u ~ U[0, 1) (u = 0 gives
    q = inf: that token loses). A generator of another device (the engine
    keeps them on the host) draws there.
    """
    if generator is not None and generator.device.type != q.device.type:
        drawn = _exponential_(torch.empty(q.shape, device=generator.device),
                              generator)
        if q.is_cuda:
            # From pinned memory: a copy from pageable memory would wait
            # for the device.
            drawn = drawn.pin_memory()
        return q.copy_(drawn, non_blocking=True)
    if q.device.type == "cuda":
        return q.exponential_(generator=generator)
    return q.uniform_(generator=generator).log_().neg_()


def random_sample(
        logits: torch.Tensor,
        threshold: torch.Tensor | None,
        md: SamplingMetadata,
        keep_logits: bool,
        kernels: ModuleType | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(logits / T) over the logits at
    or above each row's threshold. -> [N], and the noise log q [N, V]

    Gumbel-max: with q ~ Exp(1), -log q is Gumbel noise, and
    argmax(x / T - log q) = argmax(x - T log q) is such a draw. A seeded row
    takes its ``SeededNoise`` (that of the ``kernels`` when given), so its
    tokens do not depend on the rest of the batch. ``logits`` is
    overwritten unless ``keep_logits``.
    """
    vocab_size = logits.shape[-1]
    log_q = torch.empty_like(logits)  # [N, V]
    if len(md.generators) < logits.shape[0]:
        _exponential_(log_q).log_()  # unseeded rows, one call for the batch
    if md.generators:
        noise = SeededNoise(md, logits, kernels)
        seeded = torch.arange(len(md.generators), device=logits.device)
        token_ids = torch.arange(vocab_size, device=logits.device)
        log_q[noise.rows] = noise.at(
            seeded, token_ids.expand(len(md.generators), vocab_size))
    temperature = md.temperature.unsqueeze(1)
    if keep_logits:
        score = torch.addcmul(logits, log_q, temperature, value=-1.0)
        if threshold is not None:
            score.masked_fill_(logits < threshold.unsqueeze(1), float("-inf"))
    else:
        score = apply_threshold(logits, threshold).addcmul_(log_q,
                                                            temperature,
                                                            value=-1.0)
    return score.argmax(dim=-1), log_q


def fused_random_sample(
    kernels: ModuleType,
    logits: torch.Tensor,
    md: SamplingMetadata,
    threshold: torch.Tensor | None = None,
    edit: bool = False,
    logprobs: bool = False,
    graphs: LaunchGraphs | None = None,
) -> tuple[torch.Tensor, LogprobsTensors | None]:
    """``random_sample`` (and the greedy rows' argmax) in one launch of
    ``kernels.sample``. -> [N], and with ``logprobs`` those of ``logits``
    for ``md.max_num_logprobs`` (None when no row asked).

    ``threshold``: the rows' thresholds when top-k/top-p computed them
    (top-nσ's and min_p's included); without it, the kernel computes those
    of top-nσ and min_p itself, with the formulas of
    ``top_n_sigma_threshold`` and ``min_p_threshold``. With ``edit``, the
    kernel applies ``md``'s logit_bias and penalties (``PenaltyCounts``)
    where it reads each logit, as ``apply_bias_and_penalties`` would.

    The unseeded rows' noise is made in the kernel, keyed by a seed drawn
    on the device by torch's CUDA generator (``torch.manual_seed`` makes runs
    reproducible); seeded rows use the keys of ``SeededNoise``. ``graphs``:
    see ``Sampler``.
    """
    temperature = md.temperature
    if not md.all_random:
        temperature = temperature.masked_fill(md.is_greedy, 0.0)
    seeded_keys = None
    if md.generators:
        seeded_keys = SeededNoise(md, logits, kernels).keys
    rules_done = threshold is not None
    penalties = md.penalties if edit else None
    assert not isinstance(penalties, PenaltyTensors)
    # The ids drawn here are final (no recheck) when the step's edits are
    # applied here too: then the kernels may record them (``StepRecord``).
    sampled, lp = kernels.sample(
        logits,
        temperature,
        threshold=threshold,
        top_n_sigma=None if rules_done else md.top_n_sigma,
        min_p=None if rules_done else md.min_p,
        seeded_keys=seeded_keys,
        seeded_index=md.seeded_index,
        bias=md.logit_bias if edit else None,
        penalties=penalties,
        num_logprobs=md.max_num_logprobs if logprobs else None,
        record=md.record if edit else None,
        graphs=graphs)
    return sampled, None if lp is None else LogprobsTensors(*lp)


class SeededNoise:
    """The noise log q of a step's seeded rows (``md.seeded_rows``), at any
    token ids, from each row's own seed: its tokens then do not depend on
    the rest of the batch, whichever way the row is drawn.

    With the Triton kernels, the noise of token t is a function of the
    row's Philox key for the step (``md.seeded_keys``, made on the host
    with the metadata) and t, made where it is used. Without them, each
    row's generator draws q over the whole vocabulary (``full`` [S, V]), as
    ``random_sample`` does.
    """

    def __init__(self, md: SamplingMetadata, like: torch.Tensor,
                 kernels: ModuleType | None) -> None:
        assert md.seeded_rows is not None
        self.rows = md.seeded_rows
        self._kernels = kernels
        self.keys: torch.Tensor | None = None
        self.full: torch.Tensor | None = None
        if kernels is not None:
            assert md.seeded_keys is not None
            self.keys = md.seeded_keys
        else:
            generators = md.generators.values()
            full = like.new_empty(len(generators), like.shape[-1])
            for i, generator in enumerate(generators):
                _exponential_(full[i], generator)
            self.full = full.log_()

    def at(self, which: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """log q of seeded rows ``which`` (positions in ``rows``) [R] at
        ``token_ids`` [R, W]. -> [R, W] float32"""
        if self.full is not None:
            return self.full[which].gather(dim=-1, index=token_ids)
        assert self._kernels is not None and self.keys is not None
        return self._kernels.seeded_log_q(self.keys[which], token_ids)


def sample_candidates(values: torch.Tensor, indices: torch.Tensor,
                      threshold: torch.Tensor, md: SamplingMetadata,
                      seeded_noise: SeededNoise | None) -> torch.Tensor:
    """``random_sample`` over each row's sorted logits ``values`` [N, W]
    (token ids ``indices``) only: exact for the rows whose kept tokens are
    all among them. -> token ids [N]

    Seeded rows take their ``seeded_noise`` at their candidates: the noise
    a draw over the whole vocabulary would give those tokens.
    """
    log_q = _exponential_(torch.empty_like(values)).log_()  # [N, W]
    if seeded_noise is not None:
        rows = seeded_noise.rows
        log_q[rows] = seeded_noise.at(
            torch.arange(len(rows), device=rows.device), indices[rows])
    score = torch.addcmul(values,
                          log_q,
                          md.temperature.unsqueeze(1),
                          value=-1.0)
    score.masked_fill_(values < threshold.unsqueeze(1), float("-inf"))
    best = score.argmax(dim=-1, keepdim=True)  # [N, 1]
    return indices.gather(dim=-1, index=best).squeeze(1)


def _sample_again(out: SamplerOutput, recheck: Recheck,
                  rows: list[int]) -> None:
    """Draw ``rows`` again over the whole vocabulary, with their exact
    threshold (a top-p nucleus that was too long: from a sort of the whole
    row), in ``out``."""
    index = torch.tensor(rows, device=recheck.work.device)
    work = recheck.work[index]  # [R, V]
    md = recheck.md
    threshold = recheck.threshold[index]
    if recheck.long_nucleus is not None:
        assert md.top_p is not None and recheck.log_z is not None
        values = work.sort(dim=-1, descending=True).values
        before = values.new_full((len(rows), ), float("-inf"))
        if recheck.threshold_before_top_p is not None:
            before = recheck.threshold_before_top_p[index]
        kept = values.masked_fill(values < before.unsqueeze(1), float("-inf"))
        inverse_t = md.temperature[index].reciprocal().unsqueeze(1)
        probs = _whole_row_probs(kept, -values[:, :1] * inverse_t, inverse_t,
                                 recheck.log_z[index])
        nucleus = torch.maximum(before,
                                _nucleus_end(values, probs, md.top_p[index])[0])
        threshold = torch.where(recheck.long_nucleus[index], nucleus, threshold)
    if recheck.log_q is not None:
        log_q = recheck.log_q[index]  # the same noise as the first draw
    else:
        # A new draw, except for the seeded rows: their first one.
        log_q = _exponential_(torch.empty_like(work)).log_()
        noise = recheck.seeded_noise
        if noise is not None:
            position = {row: i for i, row in enumerate(noise.rows.tolist())}
            redraw = [i for i, row in enumerate(rows) if row in position]
            if redraw:
                which = torch.tensor([position[rows[i]] for i in redraw],
                                     device=work.device)
                token_ids = torch.arange(work.shape[-1], device=work.device)
                log_q[redraw] = noise.at(
                    which, token_ids.expand(len(redraw), work.shape[-1]))
    score = torch.addcmul(work,
                          log_q,
                          md.temperature[index].unsqueeze(1),
                          value=-1.0)
    score.masked_fill_(work < threshold.unsqueeze(1), float("-inf"))
    tokens = score.argmax(dim=-1)
    out.sampled_token_ids[index] = tokens
    if out.logprobs_tensors is not None:
        assert md.max_num_logprobs is not None
        again = compute_topk_logprobs(recheck.logits[index], tokens,
                                      md.max_num_logprobs)
        lp = out.logprobs_tensors
        lp.logprob_token_ids[index] = again.logprob_token_ids
        lp.logprobs[index] = again.logprobs
        lp.selected_token_ranks[index] = again.selected_token_ranks


# ----------------------------------------------------------------- logprobs
def compute_topk_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                          k: int) -> LogprobsTensors:
    """Log probabilities of ``logits`` [M, V] (any float dtype, computed in
    float32): column 0 is ``token_ids`` [M] with its rank (1 = most likely;
    ties share the better rank), then the top ``k`` (-1: the whole
    vocabulary), most likely first.

    The sampler uses it for the sampled tokens; the engine uses it for prompt
    logprobs (row i: the logits after prompt token i, token_ids[i] = prompt
    token i + 1). Rows are processed in chunks, so M may be large.
    """
    num_rows, vocab_size = logits.shape
    k = vocab_size if k == -1 else min(k, vocab_size)
    chunk = max(1, _LOGPROBS_CHUNK_ELEMENTS // max(vocab_size, 1))
    parts = [
        _topk_logprobs(logits[start:start + chunk],
                       token_ids[start:start + chunk], k)
        for start in range(0, num_rows, chunk)
    ] or [_topk_logprobs(logits, token_ids, k)]
    if len(parts) == 1:
        return parts[0]
    return LogprobsTensors(
        logprob_token_ids=torch.cat([p.logprob_token_ids for p in parts]),
        logprobs=torch.cat([p.logprobs for p in parts]),
        selected_token_ranks=torch.cat([p.selected_token_ranks for p in parts]),
    )


def _topk_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   k: int) -> LogprobsTensors:
    kernels = _sampling_kernels(logits)
    if kernels is not None:
        return LogprobsTensors(*kernels.topk_logprobs(logits, token_ids, k))
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [M, 1]
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)  # [M, V]
    selected = logprobs.gather(dim=-1, index=token_ids)  # [M, 1]
    ranks = (logprobs > selected).sum(dim=-1) + 1  # [M]
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [M, k]
    return LogprobsTensors(
        logprob_token_ids=torch.cat([token_ids, top_ids], dim=1),
        logprobs=torch.cat([selected, top_logprobs], dim=1),
        selected_token_ranks=ranks,
    )
