"""The sampler: logits of the last token of each sequence -> next token ids.

``Sampler.forward`` is a pipeline of small functions, each taking and
returning logits ``[N, V]``:

1. ``apply_min_tokens`` (changes which token is best: applies to every row);
2. for random rows only: ``apply_temperature``, ``apply_min_p``,
   ``apply_top_k_top_p``, then ``random_sample`` (the exponential-race form of
   Gumbel-max: argmax(probs / q), q ~ Exp(1), no device sync).

A new sampling parameter is one more ``apply_*`` function in the right group.
Everything stays on the logits' device; nothing here syncs with the host.
"""
from dataclasses import dataclass

import torch

from vllm.model_executor.sampling_metadata import SamplingMetadata


@dataclass
class LogprobsTensors:
    """Log probabilities of the raw model output for each sampled row.

    Rows that asked for fewer logprobs than K use the first columns.
    """
    logprob_token_ids: torch.Tensor  # [N, K+1] int64: sampled, then top-K
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
        """``logits`` [N, V] (any float dtype) is not modified.

        NOTE: every step is out of place, so ``logits`` stays the raw model
        output for the logprobs.
        """
        logits = logits.to(torch.float32)
        sampled = sample(apply_min_tokens(logits, sampling_metadata),
                         sampling_metadata)  # [N]

        logprobs_tensors = None
        if sampling_metadata.max_num_logprobs is not None:
            # As in vLLM V1: logprobs of the raw model output.
            logprobs_tensors = gather_logprobs(
                logits.log_softmax(dim=-1), sampling_metadata.max_num_logprobs,
                sampled)
        return SamplerOutput(sampled_token_ids=sampled,
                             logprobs_tensors=logprobs_tensors)


def sample(logits: torch.Tensor,
           sampling_metadata: SamplingMetadata) -> torch.Tensor:
    """Greedy rows take the argmax, the others a random draw. -> [N]"""
    if sampling_metadata.all_greedy:
        return logits.argmax(dim=-1)

    # These keep the argmax where it is, so greedy rows need none of them.
    random_logits = apply_temperature(logits, sampling_metadata)
    random_logits = apply_min_p(random_logits, sampling_metadata)
    random_logits = apply_top_k_top_p(random_logits, sampling_metadata)
    sampled = random_sample(random_logits.softmax(dim=-1), sampling_metadata)

    if sampling_metadata.all_random:
        return sampled
    return torch.where(sampling_metadata.is_greedy, logits.argmax(dim=-1),
                       sampled)


def apply_min_tokens(logits: torch.Tensor,
                     sampling_metadata: SamplingMetadata) -> torch.Tensor:
    """Forbid the stop ids (EOS included) of rows below their min_tokens."""
    if sampling_metadata.min_tokens_mask is None:
        return logits
    return logits.index_put(sampling_metadata.min_tokens_mask,
                            logits.new_full((1, ), float("-inf")))


def apply_temperature(logits: torch.Tensor,
                      sampling_metadata: SamplingMetadata) -> torch.Tensor:
    return logits / sampling_metadata.temperature.unsqueeze(1)


def apply_min_p(logits: torch.Tensor,
                sampling_metadata: SamplingMetadata) -> torch.Tensor:
    """Drop tokens less likely than min_p times the row's most likely one."""
    if sampling_metadata.min_p is None:
        return logits
    probs = logits.softmax(dim=-1)  # [N, V]
    threshold = sampling_metadata.min_p.unsqueeze(1) * probs.amax(
        dim=-1, keepdim=True)  # [N, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor,
                      sampling_metadata: SamplingMetadata) -> torch.Tensor:
    """Keep the k most likely tokens, then the smallest set of the most
    likely ones whose probability (renormalised over those k) reaches p.

    One ascending sort serves both: the masks are built on sorted logits and
    scattered back.
    """
    top_k = sampling_metadata.top_k
    top_p = sampling_metadata.top_p
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1)  # [N, V] ascending
    vocab_size = logits.shape[-1]

    if top_k is not None:
        # The k best are the last k columns.
        positions = torch.arange(vocab_size, device=logits.device)  # [V]
        outside_k = positions < (vocab_size - top_k).unsqueeze(1)  # [N, V]
        sorted_logits = sorted_logits.masked_fill(outside_k, float("-inf"))

    if top_p is not None:
        # A token is dropped when the tokens more likely than it already
        # hold p: its ascending cumulative probability is <= 1 - p.
        cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        outside_p = cum_probs <= 1.0 - top_p.unsqueeze(1)  # [N, V]
        outside_p[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))

    return torch.empty_like(logits).scatter_(dim=-1,
                                             index=order,
                                             src=sorted_logits)


def random_sample(probs: torch.Tensor,
                  sampling_metadata: SamplingMetadata) -> torch.Tensor:
    """Draw one token per row from ``probs`` [N, V]. -> [N]

    argmax(probs / q) with q ~ Exp(1) is a sample from probs. A seeded row
    draws its q from its own generator only, so its tokens do not depend on
    the rest of the batch.
    """
    generators = sampling_metadata.generators
    q = torch.empty_like(probs)  # [N, V]
    if len(generators) < probs.shape[0]:
        q.exponential_()  # unseeded rows, one call for the batch
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    return probs.div(q).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int,
                    token_ids: torch.Tensor) -> LogprobsTensors:
    """The sampled token's logprob and rank, and the top ``num_logprobs``.

    ``logprobs`` [N, V], ``token_ids`` [N].
    """
    token_ids = token_ids.unsqueeze(1)  # [N, 1]
    sampled_logprobs = logprobs.gather(dim=-1, index=token_ids)  # [N, 1]
    # Rank 1 is the most likely; ties share the better rank.
    ranks = (logprobs > sampled_logprobs).sum(dim=-1) + 1  # [N]
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)  # [N, K]
    return LogprobsTensors(
        logprob_token_ids=torch.cat([token_ids, top_ids], dim=1),
        logprobs=torch.cat([sampled_logprobs, top_logprobs], dim=1),
        selected_token_ranks=ranks,
    )
