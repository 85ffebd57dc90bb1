"""Helpers of the sampler tests: metadata for a batch of SamplingParams,
sampling it, and checking sampled counts against a distribution."""
import torch

from vllm.model_executor.layers.sampler import Sampler, SamplerOutput
from vllm.model_executor.sampling_metadata import SamplingMetadata
from vllm.sampling_params import SamplingParams

CPU = torch.device("cpu")
NUM_DRAWS = 20_000


def make_metadata(
    params: list[SamplingParams],
    vocab_size: int,
    generators: list[torch.Generator | None] | None = None,
    output_token_ids: list[list[int]] | None = None,
    device: torch.device = CPU,
    prompt_token_ids: list[list[int]] | None = None,
    bad_words_token_ids: list[list[list[int]]] | None = None
) -> SamplingMetadata:
    return SamplingMetadata.prepare(params,
                                    generators=generators
                                    or [None] * len(params),
                                    output_token_ids=output_token_ids
                                    or [[] for _ in params],
                                    prompt_token_ids=prompt_token_ids
                                    or [[] for _ in params],
                                    vocab_size=vocab_size,
                                    device=device,
                                    bad_words_token_ids=bad_words_token_ids)


def run_sampler(logits: torch.Tensor, params: list[SamplingParams],
                **kwargs) -> SamplerOutput:
    return Sampler()(logits, make_metadata(params, logits.shape[-1], **kwargs))


def sample(logits: torch.Tensor, params: list[SamplingParams],
           **kwargs) -> torch.Tensor:
    return run_sampler(logits, params, **kwargs).sampled_token_ids


def draw_many(logits: torch.Tensor, params: SamplingParams,
              **kwargs) -> torch.Tensor:
    """NUM_DRAWS samples from one row of logits [V]. -> counts [V]

    List-valued keyword arguments (output_token_ids, ...) give the one row's
    value, repeated for every draw."""
    torch.manual_seed(0)
    batch = logits.expand(NUM_DRAWS, -1)
    repeated = {name: [value] * NUM_DRAWS for name, value in kwargs.items()}
    tokens = sample(batch, [params] * NUM_DRAWS, **repeated)
    return torch.bincount(tokens, minlength=logits.shape[-1])


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square test of counts [V] against probs [V] (zero-probability
    tokens must never be drawn)."""
    assert counts[probs == 0].sum() == 0, (counts, probs)
    expected = probs[probs > 0] * counts.sum()
    observed = counts[probs > 0].double()
    chi2 = ((observed - expected)**2 / expected).sum().item()
    # The 99.99th percentile of chi-square with <= 10 degrees of freedom.
    assert chi2 < 36.0, (counts, probs)
