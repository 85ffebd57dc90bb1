"""The sampler: logits of the last token of each sequence -> next token ids.

``Sampler.forward`` is a pipeline of small functions over a float32 copy of
the logits ``[N, V]`` (each takes and returns the logits, changing them in
place), in vLLM's order:

1. ``apply_logits_processors``: per-request Python callables (slow path);
2. masks and bias: ``apply_allowed_token_ids``, ``apply_bad_words``,
   ``apply_min_tokens``, ``apply_logit_bias``;
3. ``apply_penalties``: repetition, frequency and presence.

These change which token is best, so they apply to every row; greedy rows
then take the argmax. For the random rows, ``truncation_threshold`` gives
each row the smallest logit it keeps, from temperature, top-nσ, min_p and
top-k/top-p in that order; ``apply_threshold`` masks the rest and
``random_sample`` draws with the Gumbel-max trick.

NOTE: temperature never costs a pass over [N, V]. A draw from
softmax(x / T) is argmax(x / T + g) = argmax(x + T * g) with Gumbel noise g,
so ``random_sample`` scales the noise instead of the logits, and each
truncation is written as a threshold on the unscaled x: top-k and top-nσ are
the same on both scales, min_p and top-p take T into account.

Everything stays on the logits' device; nothing here syncs with the host.
The input logits are never modified: logprobs are those of the raw model
output, as in vLLM V1 (``compute_topk_logprobs``, written so that prompt
logprobs can reuse it once the engine computes them).
"""
from dataclasses import dataclass

import torch

from vllm.model_executor.sampling_metadata import SamplingMetadata

# Rows of logits that compute_topk_logprobs handles at once (x V floats).
_LOGPROBS_CHUNK_ELEMENTS = 1 << 26


@dataclass
class LogprobsTensors:
    """Log probabilities of the raw model output for each row.

    Rows that asked for fewer logprobs than K use the first columns.
    """
    logprob_token_ids: torch.Tensor  # [N, K+1] int64: given token, then top-K
    logprobs: torch.Tensor  # [N, K+1] float32
    selected_token_ranks: torch.Tensor  # [N] int64; 1 = most likely


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [N] int64
    logprobs_tensors: LogprobsTensors | None  # None when no row asked


class Sampler(torch.nn.Module):
    """Samples one token per row of logits, as ``SamplingMetadata`` says."""

    def forward(self, logits: torch.Tensor,
                sampling_metadata: SamplingMetadata) -> SamplerOutput:
        """``logits`` [N, V] (any float dtype) is not modified."""
        md = sampling_metadata
        # [N, V] float32, our own contiguous copy whenever a step below
        # changes it.
        work = logits.to(torch.float32,
                         memory_format=torch.contiguous_format,
                         copy=md.edits_logits or not md.all_greedy)
        work = apply_logits_processors(work, md)
        work = apply_allowed_token_ids(work, md)
        work = apply_bad_words(work, md)
        work = apply_min_tokens(work, md)
        work = apply_logit_bias(work, md)
        work = apply_penalties(work, md)
        sampled = sample(work, md)  # [N]

        logprobs_tensors = None
        if md.max_num_logprobs is not None:
            logprobs_tensors = compute_topk_logprobs(logits, sampled,
                                                     md.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled,
                             logprobs_tensors=logprobs_tensors)


# ------------------------------------------------ steps that apply to all rows
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
    positions, bias = md.logit_bias
    # Each (row, token) appears once: no accumulate (sort-free on CUDA).
    return logits.index_put_(positions, logits[positions] + bias)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty r on tokens of the prompt or the output (positive
    logits / r, negative ones * r), then - frequency * count - presence *
    (count > 0) with the token's count in the output.

    Touches only the [T] positions of the tokens seen, never [N, V]: the
    output counts come from one sort of the output keys and two binary
    searches. A token seen several times is written several times, always
    with the same value.
    """
    penalties = md.penalties
    if penalties is None:
        return logits
    flat = logits.view(-1)  # [N * V]; keys index it
    # The positions whose logits change: every token seen.
    keys = torch.cat([penalties.output_keys, penalties.prompt_keys])  # [T]
    sorted_output = penalties.output_keys.sort().values  # [T_out]
    count = (torch.searchsorted(sorted_output, keys, right=True) -
             torch.searchsorted(sorted_output, keys))  # [T] in the output
    rows = keys // logits.shape[-1]  # [T]
    values = flat[keys]  # [T]
    repetition = penalties.repetition[rows]
    values = torch.where(values > 0, values / repetition, values * repetition)
    values = (values - penalties.frequency[rows] * count -
              penalties.presence[rows] * (count > 0))
    flat[keys] = values
    return logits


# ----------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Greedy rows take the argmax, the others a random draw. -> [N]

    ``logits`` is consumed: the random draw changes it in place.
    """
    if md.all_greedy:
        return logits.argmax(dim=-1)
    # Truncation keeps the argmax, so greedy rows need none of it.
    greedy = None if md.all_random else logits.argmax(dim=-1)
    logits = apply_threshold(logits, truncation_threshold(logits, md))
    sampled = random_sample(logits, md)
    if greedy is None:
        return sampled
    return torch.where(md.is_greedy, greedy, sampled)


def truncation_threshold(logits: torch.Tensor,
                         md: SamplingMetadata) -> torch.Tensor | None:
    """The smallest logit each row keeps [N] (None: keep everything), from
    top-nσ, min_p, then top-k/top-p, on the temperature-scaled
    distribution. Every rule keeps the row's most likely token."""
    threshold = None
    if md.top_n_sigma is not None or md.min_p is not None:
        row_max = logits.amax(dim=-1)  # [N]
        threshold = _at_least(threshold,
                              top_n_sigma_threshold(logits, row_max, md))
        threshold = _at_least(threshold, min_p_threshold(row_max, md))
    return top_k_top_p_threshold(logits, threshold, md)


def top_n_sigma_threshold(logits: torch.Tensor, row_max: torch.Tensor,
                          md: SamplingMetadata) -> torch.Tensor | None:
    """Top-nσ: keep logits >= max - n * σ (σ: population standard deviation
    of the row's finite logits). Dividing by T scales max and σ alike, so
    the unscaled logits give the same tokens."""
    if md.top_n_sigma is None:
        return None
    if md.has_masked_tokens:
        sigma = _finite_std(logits)
    else:
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
    kept) reaches p. Tokens tied with the last one kept are kept too.

    Both look only at each row's ``top_k_top_p_width`` largest logits:
    ``torch.topk`` when every top-p row also has a top-k (one small sorted
    slice), one full descending sort otherwise.
    """
    if md.top_k is None and md.top_p is None:
        return threshold
    vocab_size = logits.shape[-1]
    width = md.top_k_top_p_width
    if width < vocab_size:
        top = logits.topk(width, dim=-1).values  # [N, W] descending
    else:
        top = logits.sort(dim=-1, descending=True).values  # [N, V]
    if threshold is None:
        threshold = logits.new_full((logits.shape[0], ), float("-inf"))

    if md.top_k is not None:
        # "Off" is vocab_size, beyond the slice: those rows keep -inf.
        index = (md.top_k.clamp(max=width) - 1).unsqueeze(1)  # [N, 1]
        kth = top.gather(dim=-1, index=index).squeeze(1)  # [N]
        kth = kth.masked_fill(md.top_k >= vocab_size, float("-inf"))
        threshold = torch.maximum(threshold, kth)

    if md.top_p is not None:
        # The survivors so far are a prefix of the sorted slice.
        kept = top.masked_fill(top < threshold.unsqueeze(1), float("-inf"))
        probs = (kept / md.temperature.unsqueeze(1)).softmax(dim=-1)
        # A token stays while the tokens more likely than it hold < p.
        mass_before = probs.cumsum(dim=-1) - probs  # [N, W]
        num_kept = (mass_before < md.top_p.unsqueeze(1)).sum(dim=-1)  # >= 1
        last = top.gather(dim=-1, index=(num_kept - 1).unsqueeze(1))
        nucleus = torch.maximum(threshold, last.squeeze(1))
        threshold = torch.where(md.top_p < 1.0, nucleus, threshold)
    return threshold


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


def random_sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Draw one token per row from softmax(logits / T). -> [N]

    Gumbel-max: with q ~ Exp(1), -log q is Gumbel noise, and
    argmax(x / T - log q) = argmax(x - T log q) is such a draw. A seeded row
    draws its q from its own generator only, so its tokens do not depend on
    the rest of the batch. ``logits`` is overwritten.
    """
    generators = md.generators
    # CUDA draws q with exponential_ (never 0 there). On the CPU, where
    # exponential_ is several times slower, q = -log u with u ~ U[0, 1),
    # which is never 0 either (u = 0 gives q = inf: that token loses).
    on_cuda = logits.device.type == "cuda"
    draw = torch.Tensor.exponential_ if on_cuda else torch.Tensor.uniform_
    q = torch.empty_like(logits)  # [N, V]
    if len(generators) < logits.shape[0]:
        draw(q)  # unseeded rows, one call for the batch
    for row, generator in generators.items():
        draw(q[row], generator=generator)
    log_q = q.log_() if on_cuda else q.log_().neg_().log_()
    logits.addcmul_(log_q, md.temperature.unsqueeze(1), value=-1.0)
    return logits.argmax(dim=-1)


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
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)  # [M, V]
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [M, 1]
    selected = logprobs.gather(dim=-1, index=token_ids)  # [M, 1]
    ranks = (logprobs > selected).sum(dim=-1) + 1  # [M]
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [M, k]
    return LogprobsTensors(
        logprob_token_ids=torch.cat([token_ids, top_ids], dim=1),
        logprobs=torch.cat([selected, top_logprobs], dim=1),
        selected_token_ranks=ranks,
    )
