"""Nothing sorts the whole vocabulary: top-p without top_k sorts only
_CANDIDATES logits per row, and when every random row has a top_k, top_p,
min_p or top-nσ the draw uses only the sorted logits. Rows whose kept tokens may
reach past them are drawn again over the whole vocabulary by to_host(). All
of it must give exactly what a full sort and a whole-vocabulary draw give.
"""
import dataclasses

import pytest
import torch

from tests.samplers.utils import assert_matches, make_metadata
from vllm.model_executor.layers import sampler as sampler_module
from vllm.model_executor.layers.sampler import Sampler, _top_k_top_p
from vllm.sampling_params import SamplingParams

VOCAB = 300
TOP_P = [1.0, 1e-9, 0.3, 0.9, 0.99, 0.5]


def rows_of_params() -> list[SamplingParams]:
    params = []
    for i, top_p in enumerate(TOP_P * 4):
        kwargs: dict = dict(top_p=top_p, temperature=[0.5, 1.0, 2.0][i % 3])
        if i % 4 == 1:
            kwargs["min_p"] = 0.01
        if i % 4 == 2:
            kwargs["top_n_sigma"] = 2.0
        if i % 5 == 4:
            kwargs["top_k"] = 20  # normalised over its slice, as before
        params.append(SamplingParams(**kwargs))
    params.append(SamplingParams(temperature=0.0))
    return params


def logits_with_ties(num_rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Steps of 0.25: many equal logits, at the cut too.
    logits = (torch.randn(num_rows, VOCAB, generator=gen) * 4).round() / 4
    # Some rows flat (a long nucleus), some peaked (a short one).
    logits[::3] *= 0.05
    logits[1::3] *= 3.0
    return logits


def threshold_before_top_p(logits: torch.Tensor, md) -> torch.Tensor | None:
    threshold = None
    if md.top_n_sigma is not None or md.min_p is not None:
        row_max = logits.amax(dim=-1)
        threshold = sampler_module._at_least(
            sampler_module.top_n_sigma_threshold(logits, row_max, md),
            sampler_module.min_p_threshold(row_max, md))
    return threshold


@pytest.mark.parametrize("candidates", [1, 8, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_candidates_give_the_full_sort_threshold(monkeypatch, candidates, seed):
    params = rows_of_params()
    logits = logits_with_ties(len(params), seed)
    md = make_metadata(params, VOCAB)
    assert md.top_k_top_p_width == VOCAB
    earlier = threshold_before_top_p(logits, md)
    full = _top_k_top_p(logits, earlier, md)  # 1024 >= VOCAB: a full sort
    assert full.long_nucleus is None and full.threshold is not None
    monkeypatch.setattr(sampler_module, "_CANDIDATES", candidates)
    cut = _top_k_top_p(logits, earlier, md)
    assert cut.threshold is not None and cut.long_nucleus is not None
    width = max(candidates, 20)
    last_candidate = logits.topk(width, dim=-1).values[:, -1]
    top_p = torch.tensor([p.top_p for p in params])
    # (Rows with top_k renormalise over their slice, as before: with ties
    # at the k-th logit that differs from a full sort, by design.)
    no_top_k = torch.tensor([p.top_k == 0 for p in params])
    sure = ~cut.long_nucleus & no_top_k
    assert torch.equal(cut.threshold[sure], full.threshold[sure])
    # Uncertain rows: the nucleus does reach the last candidate; rows whose
    # nucleus goes past it are all marked.
    assert (full.threshold[cut.long_nucleus]
            <= last_candidate[cut.long_nucleus]).all()
    assert cut.long_nucleus[(full.threshold < last_candidate) & no_top_k
                            & (top_p < 1.0)].all()
    # top_p = 1 and top_k rows never have one; the test is not trivial.
    assert not cut.long_nucleus[(top_p == 1.0) | ~no_top_k].any()
    if candidates < 64:
        assert cut.long_nucleus.any() and sure[top_p < 1.0].any()


def sample_to_host(logits: torch.Tensor, params: list[SamplingParams],
                   seed: int):
    generators = [
        None if p.seed is None else torch.Generator().manual_seed(p.seed)
        for p in params
    ]
    torch.manual_seed(seed)
    out = Sampler()(logits, make_metadata(params, VOCAB, generators))
    had_recheck = out.recheck is not None and bool(out.recheck.rows.any())
    return out.to_host(), had_recheck


def test_resampled_rows_get_the_full_sort_tokens(monkeypatch):
    params = rows_of_params()
    params[3] = SamplingParams(top_p=0.9, seed=7, logprobs=3)
    params[6] = SamplingParams(top_p=0.95, logprobs=0)
    logits = logits_with_ties(len(params), 2)
    for seed in range(5):
        (tokens, logprobs), rechecked = sample_to_host(logits, params, seed)
        assert not rechecked
        monkeypatch.setattr(sampler_module, "_CANDIDATES", 4)
        (fewer,
         fewer_logprobs), rechecked = sample_to_host(logits, params, seed)
        monkeypatch.undo()
        assert rechecked
        assert fewer == tokens
        assert logprobs is not None and fewer_logprobs is not None
        assert torch.equal(fewer_logprobs.logprobs, logprobs.logprobs)
        assert torch.equal(fewer_logprobs.logprob_token_ids,
                           logprobs.logprob_token_ids)
        assert torch.equal(fewer_logprobs.selected_token_ranks,
                           logprobs.selected_token_ranks)


def test_seeded_top_p_row_is_reproducible_with_few_candidates(monkeypatch):
    monkeypatch.setattr(sampler_module, "_CANDIDATES", 4)
    row_logits = logits_with_ties(6, 3)[::3][:2]  # flat rows: rechecked
    seeded = SamplingParams(top_p=0.8, seed=11)

    def run(batch: list[SamplingParams], row: int) -> list[int]:
        generators: list[torch.Generator | None] = [None] * len(batch)
        generators[row] = torch.Generator().manual_seed(11)
        tokens = []
        for step in range(6):
            torch.manual_seed(100 + step + len(batch))
            logits = torch.randn(len(batch), VOCAB)
            logits[row] = row_logits[step % 2]
            md = make_metadata(batch, VOCAB, generators)
            sampled, _ = Sampler()(logits, md).to_host()
            tokens.append(sampled[row])
        return tokens

    alone = run([seeded], 0)
    others = [SamplingParams(top_p=0.5), SamplingParams(temperature=0.0)]
    assert run(others[:1] + [seeded] + others[1:], 1) == alone
    assert len(set(alone)) > 1


def seeded_batch() -> list[SamplingParams]:
    """Every row random, seeded, with a top_k, top_p, min_p or top-nσ."""
    params = []
    for i in range(30):
        kwargs: dict = dict(seed=i, temperature=[0.5, 1.0, 3.0][i % 3])
        if i >= 24:  # min_p or top-nσ alone
            kwargs["min_p" if i % 2 else "top_n_sigma"] = [0.001,
                                                           0.5][i % 4 // 2]
        else:
            if i % 3 != 2:
                kwargs["top_k"] = [1, 3, 10, 40][i % 4]
            if i % 3 != 0:
                kwargs["top_p"] = [0.3, 0.8, 0.95, 0.999][i % 4]
            if i % 5 == 0:
                kwargs["min_p"] = 0.02
        params.append(SamplingParams(**kwargs))
    return params


def draw(logits: torch.Tensor, params: list[SamplingParams],
         whole_vocabulary: bool) -> list[int]:
    # Fresh generators: both draws start from the same state.
    generators: list[torch.Generator | None] = [
        torch.Generator().manual_seed(row) for row in range(len(params))
    ]
    md = make_metadata(params, VOCAB, generators)
    if whole_vocabulary:
        md = dataclasses.replace(md,
                                 truncated_everywhere=False,
                                 top_k_top_p_everywhere=False)
    return Sampler()(logits, md).to_host()[0]


@pytest.mark.parametrize("seed", range(4))
def test_candidate_draw_gives_the_whole_vocabulary_draw(monkeypatch, seed):
    """Seeded rows draw the same tokens from the sorted logits as over the
    whole vocabulary, rows drawn again included (ties at the k-th logit
    beyond the sorted ones, long nuclei)."""
    monkeypatch.setattr(sampler_module, "_CANDIDATES", 16)
    monkeypatch.setattr(sampler_module, "_TIE_MARGIN", 2)
    # Rows with only min_p / top-nσ too, as on CUDA.
    monkeypatch.setattr(sampler_module, "_CANDIDATE_DRAW_DEVICES", ("cpu", ))
    params = seeded_batch()
    logits = logits_with_ties(len(params), seed)
    md = make_metadata(params, VOCAB)
    assert md.truncated_everywhere and not md.top_k_everywhere
    out = Sampler()(logits, md)
    assert out.recheck is not None
    # Rows with a small min_p or top-nσ keep more than the sorted logits.
    assert out.recheck.rows[24:].any() and not out.recheck.rows[24:].all()
    assert draw(logits, params, False) == draw(logits, params, True)


def test_ties_beyond_the_sorted_logits_are_drawn(monkeypatch):
    """Ties with the k-th logit are kept: 10 equal logits with top_k = 2
    are drawn uniformly, though only 2 + _TIE_MARGIN = 3 are sorted."""
    monkeypatch.setattr(sampler_module, "_TIE_MARGIN", 1)
    logits = torch.zeros(VOCAB)
    logits[:10] = 1.0
    num_draws = 4000
    torch.manual_seed(0)
    md = make_metadata([SamplingParams(top_k=2)] * num_draws, VOCAB)
    out = Sampler()(logits.expand(num_draws, -1), md)
    assert out.recheck is not None and out.recheck.rows.all()
    tokens, _ = out.to_host()
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB)
    assert_matches(counts, torch.where(logits > 0, 0.1, 0.0))


def test_top_k_rows_with_a_masked_tail_are_not_drawn_again():
    # Fewer finite logits than top_k: the sorted slice ends in -inf.
    params = [SamplingParams(top_k=100, allowed_token_ids=[1, 2, 3])] * 3
    out = Sampler()(torch.randn(3, VOCAB), make_metadata(params, VOCAB))
    assert out.recheck is not None and not out.recheck.rows.any()
    assert set(out.to_host()[0]) <= {1, 2, 3}
