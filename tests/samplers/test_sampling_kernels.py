"""The sampler's Triton kernels (``ops.sampling_kernels``) against the torch
code they replace, and the Sampler with and without them.

On a GPU (marked ``cuda``) with the real tile sizes and large rows. Without
one, Triton's interpreter runs the same tests on CPU tensors, with small
rows and small tiles so that a row still spans several tiles and programs
(``TRITON_INTERPRET`` must be set before triton is imported; triton 3.6's
interpreter needs numpy < 2.4)::

    TRITON_INTERPRET=1 python -m pytest tests/samplers/test_sampling_kernels.py

Skipped without triton.
"""
import dataclasses
import os
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton",
                             reason="triton is not installed (GPU installs)")

from tests.samplers.utils import assert_matches, make_metadata  # noqa: E402
from vllm.model_executor.layers import sampler as sampler_module  # noqa: E402
from vllm.model_executor.layers.ops import (  # noqa: E402
    sampling_kernels as kernels)
from vllm.model_executor.layers.sampler import (  # noqa: E402
    LogprobsTensors, Sampler, _apply_penalty_counts, compute_topk_logprobs)
from vllm.model_executor import sampling_state as state_module  # noqa: E402
from vllm.model_executor.sampling_metadata import (  # noqa: E402
    LogitBias, PenaltyCounts, seen_mask, seen_words)
from vllm.model_executor.sampling_state import SamplingState  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CPU = torch.device("cpu")
DEVICE = CPU if INTERPRET else torch.device("cuda")
pytestmark = [] if INTERPRET else [pytest.mark.cuda]

# (rows, vocabulary size): sizes that are not multiples of the tiles, rows
# of one tile and of many.
if INTERPRET:
    SHAPES = [(1, 1), (3, 7), (2, 1000), (9, 130)]
else:
    SHAPES = [(1, 1), (3, 7), (1, 151_936), (37, 32_003), (256, 151_936)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the interpreter: tiles of 64 columns in segments of 16, chunks of
    two tiles, so that small rows span several tiles and chunks."""
    if INTERPRET:
        monkeypatch.setattr(kernels, "_TILE", 64)
        monkeypatch.setattr(kernels, "_SEGMENT", 16)
        monkeypatch.setattr(kernels, "_CHUNK_TILES", 2)


def use_kernels(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Make the sampler use the kernels (on CPU tensors too), or not."""
    monkeypatch.setattr(sampler_module, "_sampling_kernels",
                        lambda logits: kernels if on else None)


def make_logits(num_rows: int, vocab_size: int, dtype: torch.dtype,
                seed: int) -> torch.Tensor:
    """Random logits around 5 (not 0: σ must not rely on a zero mean); row 0
    has -inf entries, the last row (of several) one finite logit only."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab_size, generator=gen) * 3 + 5
    logits[0, 1::3] = NEG_INF
    if num_rows > 1:
        last = logits[-1]
        last[:] = NEG_INF
        last[vocab_size // 2] = 1.5
    return logits.to(dtype).to(DEVICE)


def finite_std(x: torch.Tensor) -> torch.Tensor:
    """Population std of each row's finite values, in float64."""
    x = x.double()
    finite = x.isfinite()
    count = finite.sum(dim=1)
    mean = torch.where(finite, x, 0.0).sum(dim=1) / count
    deviation = torch.where(finite, x - mean.unsqueeze(1), 0.0)
    return (deviation.square().sum(dim=1) / count).sqrt()


def draw(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``kernels.sample``'s tokens (without logprobs)."""
    tokens, logprobs = kernels.sample(*args, **kwargs)
    assert logprobs is None
    return tokens


# ---------------------------------------------------------------- row_stats
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats_match_torch(shape, dtype):
    num_rows, vocab_size = shape
    logits = make_logits(num_rows, vocab_size, dtype, seed=vocab_size)
    x = logits.float()
    row_max, sigma = kernels.row_stats(logits, sigma=True)
    assert sigma is not None
    assert torch.equal(row_max, x.amax(dim=1))
    torch.testing.assert_close(sigma.double(),
                               finite_std(x),
                               rtol=1e-4,
                               atol=1e-5)


def test_row_stats_of_strided_rows_and_max_only():
    # Rows of a wider tensor: the row stride is not the vocabulary size.
    wide = make_logits(4, 300, torch.float32, seed=1)
    logits = wide[:, 10:290]
    row_max, sigma = kernels.row_stats(logits)
    assert sigma is None
    assert torch.equal(row_max, logits.amax(dim=1))


# ------------------------------------------------------------------ sample
def gumbel_reference(x: torch.Tensor, threshold: torch.Tensor,
                     temperature: torch.Tensor,
                     log_q: torch.Tensor) -> torch.Tensor:
    """``sampler.random_sample``'s draw with the given noise."""
    x = x.float()
    score = torch.addcmul(x, log_q, temperature.unsqueeze(1), value=-1.0)
    score.masked_fill_(x < threshold.unsqueeze(1), NEG_INF)
    return score.argmax(dim=1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_rows_take_the_first_argmax(shape, dtype):
    num_rows, vocab_size = shape
    # Steps of 0.5: ties for the max, which the first column wins.
    logits = (make_logits(num_rows, vocab_size, torch.float32, 2) *
              2).round().div(2).to(dtype)
    greedy = torch.zeros(num_rows, device=DEVICE)
    min_p = torch.full((num_rows, ), 0.5, device=DEVICE)
    tokens = draw(logits, greedy, 1 << 40, min_p=min_p)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.float().argmax(dim=1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rules", [True, False])
def test_seeded_rows_draw_with_the_noise_of_their_keys(shape, dtype, rules):
    """Seeded rows give the tokens of the torch draw with the noise that
    ``seeded_log_q`` gives their keys, whatever the other rows, with the
    thresholds of the sampler's rules (top-nσ, min_p, a given one; with
    ``rules`` the draw reads only the segments that reach them, else every
    segment); unseeded rows keep to their threshold."""
    num_rows, vocab_size = shape
    logits = make_logits(num_rows, vocab_size, dtype, seed=3)
    x = logits.float()
    temperature = torch.linspace(0.3, 2.0, num_rows, device=DEVICE)
    rows = torch.arange(num_rows, device=DEVICE)
    top_n_sigma = torch.where(rows % 3 == 0, 0.0, 1.0 + rows % 2)
    min_p = torch.where(rows % 4 == 1, 0.0, 0.01 * (rows % 5 + 1))
    given = x.amax(dim=1) - 5.0
    # What sampler.py computes.
    top_n_sigma_threshold = torch.where(
        top_n_sigma > 0.0,
        x.amax(dim=1) - top_n_sigma * finite_std(x).float(), NEG_INF)
    min_p_threshold = torch.where(min_p > 0.0,
                                  x.amax(dim=1) + temperature * min_p.log(),
                                  NEG_INF)
    threshold = torch.maximum(
        torch.maximum(top_n_sigma_threshold, min_p_threshold), given)
    if not rules:
        threshold = given
    # Every other row seeded, with keys in reverse order.
    seeded_rows = torch.arange(0, num_rows, 2, device=DEVICE)
    keys = torch.randint(1 << 62, (len(seeded_rows), ),
                         generator=torch.Generator().manual_seed(4)).to(DEVICE)
    token_ids = torch.arange(vocab_size, device=DEVICE)
    noise = kernels.seeded_log_q(keys,
                                 token_ids.expand(len(seeded_rows), vocab_size))
    seeded_index = torch.full((num_rows, ), -1, device=DEVICE)
    seeded_index[seeded_rows.flip(0)] = torch.arange(len(seeded_rows),
                                                     device=DEVICE)
    tokens = draw(logits,
                  temperature,
                  12345,
                  threshold=given,
                  top_n_sigma=top_n_sigma if rules else None,
                  min_p=min_p if rules else None,
                  seeded_keys=keys,
                  seeded_index=seeded_index)
    expected = gumbel_reference(x[seeded_rows], threshold[seeded_rows],
                                temperature[seeded_rows], noise.flip(0))
    assert torch.equal(tokens[seeded_rows], expected)
    kept = x.gather(1, tokens.unsqueeze(1)).squeeze(1)
    assert (kept >= threshold).all()


@pytest.mark.parametrize("seed", [1, 2**33 + 7, 2**61 + 1])
def test_rows_keeping_one_logit_draw_it(seed):
    """A row whose every logit but one is -inf or below the threshold
    draws that one; -inf is never drawn."""
    num_rows, vocab_size = (8, 500) if INTERPRET else (64, 151_936)
    logits = torch.full((num_rows, vocab_size), NEG_INF, device=DEVICE)
    only = torch.randint(vocab_size, (num_rows, ), device=DEVICE)
    rows = torch.arange(num_rows, device=DEVICE)
    logits[rows, only] = 3.0
    threshold = torch.full((num_rows, ), 2.0, device=DEVICE)
    temperature = torch.full((num_rows, ), 1.0, device=DEVICE)
    assert torch.equal(draw(logits, temperature, seed), only)
    # Now finite logits below the threshold everywhere else.
    logits[logits == NEG_INF] = 1.0
    assert torch.equal(draw(logits, temperature, seed, threshold=threshold),
                       only)


def test_same_seed_same_tokens():
    num_rows, vocab_size = (6, 300) if INTERPRET else (256, 151_936)
    logits = make_logits(num_rows, vocab_size, torch.float32, seed=5)
    temperature = torch.ones(num_rows, device=DEVICE)
    first = draw(logits, temperature, 7)
    assert torch.equal(first, draw(logits, temperature, 7))
    assert not torch.equal(first, draw(logits, temperature, 8))


@pytest.mark.parametrize("temperature", [1.5] if INTERPRET else [0.7, 1.5])
def test_draws_follow_the_truncated_softmax(temperature):
    """Many rows of the same logits: the tokens drawn follow softmax(x / T)
    over the logits at or above the threshold. The candidates sit in
    different tiles and Philox outputs of the row."""
    if INTERPRET:
        num_draws, vocab_size = 240, 130  # the interpreter is slow
        columns = [3, 17, 40, 63, 64, 100, 127, 129]
    else:
        num_draws, vocab_size = 100_000, 151_936
        columns = [5, 1030, 2100, 3999, 4100, 77_777, 150_000, 151_935]
    values = torch.tensor([1.0, 0.2, -0.5, 0.8, 0.0, 0.5, -1.0, -3.0])
    row = torch.full((vocab_size, ), -10.0)
    row[columns] = values
    logits = row.to(DEVICE).expand(num_draws, -1)
    tokens = draw(logits,
                  torch.full((num_draws, ), temperature, device=DEVICE),
                  2024,
                  threshold=torch.full((num_draws, ), -2.0, device=DEVICE))
    counts = torch.bincount(tokens.cpu(), minlength=vocab_size)[columns]
    kept = values.masked_fill(values < -2.0, NEG_INF)
    assert counts.sum() == num_draws  # nothing outside the candidates
    assert_matches(counts, (kept / temperature).softmax(dim=0))


# ------------------------------------------------------------ edits, counts
def pack_seen(mask: torch.Tensor) -> torch.Tensor:
    """[S, V] bool -> PenaltyCounts.seen [S, ceil(V / 32)] int32."""
    num_slots, vocab_size = mask.shape
    words = seen_words(vocab_size)
    padded = torch.zeros(num_slots, words * 32, dtype=torch.int64)
    padded[:, :vocab_size] = mask.long()
    packed = (padded.view(num_slots, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32),
                       packed).to(torch.int32)


def random_edits(num_rows: int, vocab_size: int,
                 gen: torch.Generator) -> tuple[LogitBias, PenaltyCounts]:
    """A logit_bias on most rows (several entries on some, none on row 1)
    and penalties on all rows but the last, from slots in another order."""
    rows, cols, values = [], [], []
    for row in range(num_rows):
        if row == 1:
            continue
        picked = torch.randperm(vocab_size, generator=gen)[:1 + row % 3]
        if row == 2:  # neighbours, and the last column
            picked = torch.tensor([3, 4, vocab_size - 1])
        rows += [row] * len(picked)
        cols += sorted(picked.tolist())
        values += (torch.rand(len(picked), generator=gen) * 8 - 4).tolist()
    starts = torch.searchsorted(torch.tensor(rows), torch.arange(num_rows + 1))
    bias = LogitBias(keys=torch.tensor(rows) * vocab_size + torch.tensor(cols),
                     values=torch.tensor(values),
                     row_starts=starts)
    num_slots = num_rows + 4
    counts = torch.randint(0, 4, (num_slots, vocab_size), generator=gen)
    counts *= torch.rand(num_slots, vocab_size, generator=gen) < 0.1
    in_prompt = torch.rand(num_slots, vocab_size, generator=gen) < 0.05
    penalised = torch.randperm(num_rows,
                               generator=gen)[:max(1, num_rows - 1)].sort()
    slots = torch.randperm(num_slots, generator=gen)[:len(penalised.values)]
    row_slots = torch.full((num_rows, ), -1, dtype=torch.int64)
    row_slots[penalised.values] = slots
    penalties = PenaltyCounts(
        presence=torch.rand(num_rows, generator=gen) * 2 - 1,
        frequency=torch.rand(num_rows, generator=gen) * 2 - 1,
        repetition=torch.rand(num_rows, generator=gen) + 0.5,
        rows=penalised.values,
        slots=slots,
        row_slots=row_slots,
        counts=counts.to(torch.int32),
        seen=pack_seen(in_prompt | (counts > 0)))
    return bias, penalties


def to_device(edits: Any) -> Any:
    return type(edits)(**{
        name: getattr(edits, name).to(DEVICE)
        for name in edits.__dataclass_fields__
    })


@pytest.mark.parametrize("shape",
                         [(3, 7), (5, 5000)] if INTERPRET else [(3, 7),
                                                                (256, 151_936)])
def test_edit_matches_torch(shape):
    """``kernels.edit`` (bias, then penalties on every penalised row, whole)
    equals ``apply_logit_bias`` then ``_apply_penalty_counts``: rows in any
    order, slots elsewhere, -inf logits kept."""
    num_rows, vocab_size = shape
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(num_rows, vocab_size, generator=gen) * 3
    logits[0, :2] = NEG_INF
    bias, penalties = random_edits(num_rows, vocab_size, gen)
    expected = logits.clone()
    expected.view(-1).index_add_(0, bias.keys, bias.values)
    expected = _apply_penalty_counts(expected, penalties)
    got = logits.to(DEVICE)
    kernels.edit(got, to_device(bias), to_device(penalties))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5000)] if INTERPRET else [(2, 151_936)])
def test_rows_with_many_bias_entries(shape):
    """A row with more logit_bias entries than a program counts at once
    (``_BIAS_BLOCK``), spread over the row: every program, wherever its
    columns start, applies exactly its own. ``kernels.edit`` equals torch,
    and the greedy draw (with and without a min_p rule) takes the argmax of
    the biased logits, placed on an entry late in the row."""
    num_rows, vocab_size = shape
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(num_rows, vocab_size, generator=gen)
    cols = torch.randperm(vocab_size, generator=gen)[:150].sort().values
    values = torch.rand(150, generator=gen) * 2 - 1
    values[-3] = 50.0  # the argmax: a late entry of row 0
    rows = torch.zeros(150, dtype=torch.int64)
    # Row 1: a single entry, in its last column.
    keys = torch.cat(
        [rows * vocab_size + cols,
         torch.tensor([2 * vocab_size - 1])])
    bias = LogitBias(keys=keys,
                     values=torch.cat([values, torch.tensor([50.0])]),
                     row_starts=torch.tensor([0, 150, 151]))
    expected = logits.clone()
    expected.view(-1).index_add_(0, bias.keys, bias.values)
    got = logits.to(DEVICE)
    kernels.edit(got, to_device(bias), None)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    zeros = torch.zeros(num_rows, device=DEVICE)
    for min_p in (None, torch.full((num_rows, ), 0.5, device=DEVICE)):
        tokens, _ = kernels.sample(logits.to(DEVICE),
                                   zeros,
                                   5,
                                   min_p=min_p,
                                   bias=to_device(bias))
        assert tokens.cpu().tolist() == expected.argmax(dim=-1).tolist()


def test_mark_tokens_matches_torch():
    """The kernel's counts and seen bits equal those of the torch code (on
    CPU tensors): repeated keys, bit 31 of a word, slots in any order."""
    vocab_size, num_slots = 100, 5
    gen = torch.Generator().manual_seed(4)
    keys = torch.randint(num_slots * vocab_size, (300, ), generator=gen)
    keys = torch.cat([keys, torch.tensor([31, 63, 2 * vocab_size + 95])])
    sampled = torch.randint(vocab_size, (7, ), generator=gen)
    added_rows = torch.tensor([6, 0, 3])
    added_slots = torch.tensor([4, 1, 2])
    results = []
    for mark_tokens, device in ((kernels.mark_tokens, DEVICE),
                                (state_module.mark_tokens, CPU)):
        counts = torch.zeros(num_slots,
                             vocab_size,
                             dtype=torch.int32,
                             device=device)
        seen = torch.zeros(num_slots,
                           seen_words(vocab_size),
                           dtype=torch.int32,
                           device=device)
        mark_tokens(counts, seen, keys[:200].to(device), True)
        mark_tokens(counts, seen, keys[200:].to(device), False)
        # As SamplingState adds the sampled tokens: slot * V + tokens[row].
        mark_tokens(counts,
                    seen,
                    added_slots.to(device) * vocab_size,
                    True,
                    add=(sampled.to(device), added_rows.to(device)))
        results.append((counts.cpu(), seen.cpu()))
    (counts, seen), (expected_counts, expected_seen) = results
    assert torch.equal(counts, expected_counts)
    assert torch.equal(seen, expected_seen)
    added = added_slots * vocab_size + sampled[added_rows]
    marked = torch.zeros(num_slots * vocab_size, dtype=torch.bool)
    marked[keys] = True
    marked[added] = True
    assert torch.equal(seen_mask(seen, vocab_size),
                       marked.view(num_slots, vocab_size))
    counted = torch.cat([keys[:200], added])
    assert torch.equal(
        counts.view(-1),
        torch.bincount(counted, minlength=num_slots * vocab_size).int())


# ----------------------------------------------------------------- logprobs
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 1, 5, -1])
@pytest.mark.parametrize("shape",
                         [(5, 2600)] if INTERPRET else [(7, 32_003),
                                                        (256, 151_936)])
def test_logprobs_match_torch(monkeypatch, dtype, k, shape):
    """``compute_topk_logprobs`` with and without the kernels: the same
    ranks and log probabilities within float tolerance. float32 logits are
    distinct multiples of 1/64 (no ties, not even after log_softmax's
    rounding): the same ids. 16-bit logits have ties, and log_softmax's
    rounding merges nearby small ones: ids of (nearly) equal logits."""
    num_rows, vocab_size = shape
    gen = torch.Generator().manual_seed(6)
    if dtype == torch.float32:
        logits = torch.stack([
            (torch.randperm(vocab_size, generator=gen) - vocab_size // 2) / 64
            for _ in range(num_rows)
        ])
    else:
        logits = torch.randn(num_rows, vocab_size, generator=gen) * 3
    logits = logits.to(dtype).to(DEVICE)
    token_ids = torch.randint(vocab_size, (num_rows, ),
                              generator=gen).to(DEVICE)
    use_kernels(monkeypatch, True)
    fused = compute_topk_logprobs(logits, token_ids, k)
    use_kernels(monkeypatch, False)
    expected = compute_topk_logprobs(logits, token_ids, k)
    assert torch.equal(fused.selected_token_ranks,
                       expected.selected_token_ranks)
    torch.testing.assert_close(fused.logprobs,
                               expected.logprobs,
                               rtol=1e-5,
                               atol=1e-5)
    ids, expected_ids = fused.logprob_token_ids, expected.logprob_token_ids
    if dtype == torch.float32:
        assert torch.equal(ids, expected_ids)
    else:
        assert torch.equal(ids[:, 0], expected_ids[:, 0])
        torch.testing.assert_close(logits.gather(1, ids).float(),
                                   logits.gather(1, expected_ids).float(),
                                   rtol=0.0,
                                   atol=1e-5)
        assert all(len(set(row)) == len(row) for row in ids[:, 1:].tolist())


# ---------------------------------------------------------- the whole Sampler
def mixed_params(num_rows: int, vocab_size: int,
                 with_top_k: bool) -> list[SamplingParams]:
    """Greedy rows, and random rows with every feature, most seeded; with
    ``with_top_k``, one row with top_k (the thresholds then come from
    torch, the draw from the kernel)."""
    params = []
    for row in range(num_rows):
        if row % 4 == 3:
            # Greedy, with edits that move its argmax.
            params.append(
                SamplingParams(temperature=0.0,
                               frequency_penalty=0.7,
                               repetition_penalty=1.3,
                               logit_bias={row * 5 % vocab_size: 3.0},
                               logprobs=2))
            continue
        params.append(
            SamplingParams(temperature=0.5 + row / num_rows,
                           presence_penalty=0.5,
                           frequency_penalty=0.3,
                           repetition_penalty=1.1,
                           logit_bias={row % vocab_size: 2.0},
                           min_p=0.02,
                           top_n_sigma=2.0 if row % 2 else None,
                           top_k=20 if row == 1 and with_top_k else 0,
                           logprobs=3,
                           seed=row if row % 4 != 2 else None))
    return params


def run(logits: torch.Tensor,
        params: list[SamplingParams],
        fused: bool,
        stateful: bool,
        rows: list[int] | None = None
        ) -> tuple[list[int], LogprobsTensors | None]:
    """The Sampler on ``logits``; row i's output tokens are those of row
    ``rows[i]`` of the whole batch. The metadata comes from
    ``SamplingState`` (penalties as device counts, as in the engine) with
    ``stateful``, else from ``SamplingMetadata.prepare``."""
    vocab_size = logits.shape[1]
    rows = rows or list(range(len(params)))
    generators = [
        None if p.seed is None else torch.Generator(DEVICE).manual_seed(p.seed)
        for p in params
    ]
    outputs = [[(row * 7 + i) % vocab_size for i in range(5)] for row in rows]
    prompts = [[1, 2, 3]] * len(params)
    if stateful:
        md = SamplingState(DEVICE).prepare(rows, params, generators, outputs,
                                           prompts, vocab_size)
    else:
        md = make_metadata(params,
                           vocab_size,
                           generators=generators,
                           output_token_ids=outputs,
                           prompt_token_ids=prompts,
                           device=DEVICE)
    out = Sampler()(logits, md)
    if fused:
        assert out.recheck is None  # the fused draw is exact
    return out.to_host()


@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize("with_top_k", [False, True])
def test_sampler_keeps_greedy_and_seeded_tokens(monkeypatch, with_top_k,
                                                stateful):
    """The fused path gives the greedy rows the tokens (and logprobs) of the
    torch path, and the seeded rows the same tokens whatever the rest of
    the batch. Stateful without top-k, the whole step is one launch: bias,
    penalties and logprobs in the kernel."""
    num_rows, vocab_size = (12, 300) if INTERPRET else (64, 151_936)
    params = mixed_params(num_rows, vocab_size, with_top_k)
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(num_rows, vocab_size, generator=gen) * 2).to(DEVICE)
    calls = []
    fused_sample = kernels.sample
    monkeypatch.setattr(
        kernels, "sample",
        lambda *args, **kwargs: calls.append(1) or fused_sample(
            *args, **kwargs))
    use_kernels(monkeypatch, True)
    tokens, lp = run(logits, params, fused=True, stateful=stateful)
    assert calls
    use_kernels(monkeypatch, False)
    expected_tokens, expected_lp = run(logits,
                                       params,
                                       fused=False,
                                       stateful=stateful)
    same = [row for row, p in enumerate(params) if p.temperature == 0.0]
    assert [tokens[row]
            for row in same] == [expected_tokens[row] for row in same]
    use_kernels(monkeypatch, True)
    seeded = [row for row, p in enumerate(params) if p.seed is not None]
    alone, _ = run(logits[seeded], [params[row] for row in seeded],
                   fused=True,
                   stateful=stateful,
                   rows=seeded)
    assert alone == [tokens[row] for row in seeded]
    assert lp is not None and expected_lp is not None
    assert torch.equal(lp.logprob_token_ids[same],
                       expected_lp.logprob_token_ids[same])
    assert torch.equal(lp.selected_token_ranks[same],
                       expected_lp.selected_token_ranks[same])
    torch.testing.assert_close(lp.logprobs[same], expected_lp.logprobs[same])


def prepare(state: SamplingState, params: list[SamplingParams], rows: list[int],
            outputs: list[list[int]], prompts: list[list[int]],
            vocab_size: int) -> Any:
    """``state.prepare`` for rows ``rows`` of the lists, as the engine
    calls it: seeded rows with a host generator and their seed as key."""
    chosen = [params[r] for r in rows]
    return state.prepare(
        rows,
        chosen, [
            None if p.seed is None else torch.Generator().manual_seed(p.seed)
            for p in chosen
        ], [outputs[r] for r in rows], [prompts[r] for r in rows],
        vocab_size,
        seed_keys=[p.seed for p in chosen])


def assert_same_counts(state: SamplingState, other: SamplingState,
                       rows: list[int], params: list[SamplingParams]) -> None:
    """The two states hold the same slots, counts and seen bits."""
    assert state._counts is not None and other._counts is not None
    assert state._seen is not None and other._seen is not None
    for r in rows:
        slot = state._slot_of[r]
        assert slot == other._slot_of[r]
        if params[r].has_penalties:
            assert torch.equal(state._counts[slot], other._counts[slot]), r
            assert torch.equal(state._seen[slot], other._seen[slot]), r


def test_sampler_records_the_step(monkeypatch):
    """Over several steps, with the batch changing: the fused sampler adds
    each penalised row's token to SamplingState's counts and writes each
    seeded row's next key (``StepRecord``), so the next ``prepare`` uploads
    nothing; the counts, the keys and the greedy and seeded rows' tokens
    equal those of a state that reads every new token from the outputs."""
    num_rows, vocab_size = (6, 300) if INTERPRET else (6, 151_936)
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=0.4),
        SamplingParams(min_p=0.05, presence_penalty=0.5, seed=11, logprobs=2),
        SamplingParams(top_n_sigma=1.5,
                       repetition_penalty=1.3,
                       logit_bias={7: 3.0}),
        SamplingParams(temperature=0.8, seed=12),
        SamplingParams(temperature=1.1, logprobs=1),
        SamplingParams(temperature=0.0, repetition_penalty=1.2, seed=13),
    ]
    use_kernels(monkeypatch, True)
    recorded, plain = SamplingState(DEVICE), SamplingState(DEVICE)
    prompts = [[row + 1, 2 * row + 3] for row in range(num_rows)]
    outputs: list[list[int]] = [[row] for row in range(num_rows)]
    gen = torch.Generator().manual_seed(9)
    last_rows: list[int] = []
    last_record = None
    # Row 4 leaves at step 2 and comes back at step 4.
    for step in range(6):
        rows = [r for r in range(num_rows) if step not in (2, 3) or r != 4]
        logits = (torch.randn(len(rows), vocab_size, generator=gen) *
                  3).to(DEVICE)

        md = prepare(recorded, params, rows, outputs, prompts, vocab_size)
        plain_md = dataclasses.replace(prepare(plain, params, rows, outputs,
                                               prompts, vocab_size),
                                       record=None)
        assert md.record is not None and not md.record.done
        if rows == last_rows:  # the keys the sampler wrote, not uploaded
            assert md.seeded_keys is last_record.next_keys
        last_rows, last_record = rows, md.record
        assert_same_counts(recorded, plain, rows, params)
        out = Sampler()(logits, md)
        assert md.record.done
        recorded.sampled(out.sampled_token_ids)
        tokens, _ = out.to_host()
        # The plain state reads each new token from the outputs.
        expected, _ = Sampler()(logits, plain_md).to_host()
        assert md.seeded_keys is not None and plain_md.seeded_keys is not None
        assert torch.equal(md.seeded_keys, plain_md.seeded_keys), step
        for i, r in enumerate(rows):
            if params[r].temperature == 0.0 or params[r].seed is not None:
                assert tokens[i] == expected[i], (step, r)
            outputs[r].append(tokens[i])
    # The next prepare takes the last step's record.
    prepare(recorded, params, rows, outputs, prompts, vocab_size)
    prepare(plain, params, rows, outputs, prompts, vocab_size)
    assert_same_counts(recorded, plain, rows, params)


def test_tiny_top_n_sigma_draws_the_edited_argmax(monkeypatch):
    """The row statistics behind the thresholds are those of the edited
    logits (bias and penalties): a tiny top-nσ keeps only the edited max,
    so every row draws what greedy does, edited the same."""
    num_rows, vocab_size = (9, 300) if INTERPRET else (64, 151_936)
    gen = torch.Generator().manual_seed(8)
    host_logits = torch.randn(num_rows, vocab_size, generator=gen) * 2
    logits = host_logits.to(DEVICE)
    # Each row's edited max is a biased logit just above the largest logit
    # no edit changes: only the merged statistics keep it alone.
    top = host_logits.max(dim=1).values
    edits = [
        dict(frequency_penalty=0.9,
             presence_penalty=0.4,
             repetition_penalty=1.4,
             logit_bias={
                 vocab_size - 1 - row:
                 float(top[row] + 0.05 - host_logits[row, -1 - row]),
                 row * 5 % vocab_size:
                 -2.5
             }) for row in range(num_rows)
    ]
    tiny = [
        SamplingParams(temperature=1.0, top_n_sigma=1e-6, seed=row, **e)
        for row, e in enumerate(edits)
    ]
    greedy = [SamplingParams(temperature=0.0, **e) for e in edits]
    use_kernels(monkeypatch, True)
    tokens, _ = run(logits, tiny, fused=True, stateful=True)
    use_kernels(monkeypatch, False)
    expected, _ = run(logits, greedy, fused=False, stateful=True)
    assert tokens == expected
