"""Sampler: every sampling parameter on logits the test controls.

Statistical tests draw many rows in one batch under a fixed seed, so they
are deterministic; their tolerances would still hold for other seeds.
"""
import dataclasses

import pytest
import torch

from tests.samplers.utils import (NUM_DRAWS, assert_matches, draw_many,
                                  make_metadata, sample)
from vllm.model_executor.layers import sampler as sampler_module
from vllm.model_executor.layers.sampler import (Sampler, compute_topk_logprobs,
                                                top_k_top_p_threshold)
from vllm.sampling_params import SamplingParams


def test_greedy_is_argmax():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_input_logits_not_modified():
    logits = torch.randn(4, 30)
    before = logits.clone()
    params = SamplingParams(top_k=3,
                            top_p=0.5,
                            min_p=0.1,
                            min_tokens=2,
                            stop_token_ids=[0])
    sample(logits, [params] * 4)
    assert torch.equal(logits, before)


def test_half_precision_logits():
    logits = torch.randn(3, 30).to(torch.bfloat16)
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 3)
    assert torch.equal(tokens, logits.float().argmax(dim=-1))


def test_top_k_1_is_greedy():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(64)
    ]
    generators = [torch.Generator().manual_seed(i) for i in range(64)]
    tokens = sample(logits, params, generators=generators)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_stays_inside_top_k():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    counts = draw_many(logits, SamplingParams(top_k=4))
    top4 = logits.topk(4).indices
    assert counts.sum() == counts[top4].sum()
    assert (counts[top4] > 0).all()
    probs = torch.zeros(50)
    probs[top4] = logits[top4].softmax(dim=-1)
    assert_matches(counts, probs)


def test_top_k_larger_than_vocab_is_off():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    assert_matches(draw_many(logits, SamplingParams(top_k=100)),
                   logits.softmax(dim=-1))


def test_top_p_samples_the_renormalised_nucleus():
    # Token order shuffled so that the nucleus is not a prefix of the ids.
    probs = torch.tensor([0.1, 0.4, 0.05, 0.15, 0.3])
    counts = draw_many(probs.log(), SamplingParams(top_p=0.8))
    # 0.4 + 0.3 = 0.7 < 0.8, so 0.15 joins; then 0.85 >= 0.8.
    nucleus = torch.tensor([0.0, 0.4, 0.0, 0.15, 0.3])
    assert_matches(counts, nucleus / nucleus.sum())


def test_top_p_keeps_the_best_token_when_p_is_tiny():
    probs = torch.tensor([0.2, 0.5, 0.3])
    counts = draw_many(probs.log(), SamplingParams(top_p=1e-9))
    assert counts[1] == NUM_DRAWS


def test_top_k_then_top_p():
    probs = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    counts = draw_many(probs.log(), SamplingParams(top_k=3, top_p=0.6))
    # Over the top 3 (0.4, 0.25, 0.2 -> 0.47, 0.29, 0.24): 0.47 < 0.6, so
    # the second joins, and 0.76 >= 0.6 closes the nucleus.
    expected = torch.tensor([0.0, 0.4, 0.25, 0.0, 0.0])
    assert_matches(counts, expected / expected.sum())


def test_min_p_masks_unlikely_tokens():
    probs = torch.tensor([0.06, 0.5, 0.1, 0.3, 0.04])
    counts = draw_many(probs.log(), SamplingParams(min_p=0.15))
    # Threshold 0.15 * 0.5 = 0.075.
    kept = torch.tensor([0.0, 0.5, 0.1, 0.3, 0.0])
    assert_matches(counts, kept / kept.sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    counts = draw_many(logits, SamplingParams(temperature=temperature))
    assert_matches(counts, (logits / temperature).softmax(dim=-1))


def test_rows_use_their_own_parameters():
    # One batch of three kinds of rows must match three separate batches.
    probs = torch.tensor([0.1, 0.4, 0.05, 0.15, 0.3])
    kinds = [
        SamplingParams(top_k=2),
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.5)
    ]
    torch.manual_seed(0)
    tokens = sample(probs.log().expand(3 * NUM_DRAWS, -1),
                    kinds * NUM_DRAWS).view(NUM_DRAWS, 3)
    top2 = torch.tensor([0.0, 0.4, 0.0, 0.0, 0.3])
    assert_matches(torch.bincount(tokens[:, 0], minlength=5), top2 / top2.sum())
    assert (tokens[:, 1] == 1).all()
    # min_p 0.5: threshold 0.2 keeps 0.4 and 0.3.
    assert_matches(torch.bincount(tokens[:, 2], minlength=5), top2 / top2.sum())


def test_min_tokens_masks_stop_ids_until_reached():
    # Token 3 (a stop id) and token 1 (EOS) are the most likely.
    logits = torch.tensor([[0.0, 8.0, 1.0, 9.0, 2.0]]).expand(4, -1)
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3])
    params.update_from_generation_config({}, model_eos_token_id=1)
    outputs = [[], [7], [7, 7], [7, 7, 7]]
    tokens = sample(logits, [params] * 4, output_token_ids=outputs)
    assert tokens.tolist() == [4, 4, 4, 3]


def test_min_tokens_with_random_sampling():
    logits = torch.tensor([0.0, 5.0, 1.0, 5.0, 1.0])
    params = SamplingParams(min_tokens=2, stop_token_ids=[1, 3])
    torch.manual_seed(0)
    tokens = sample(logits.expand(1000, -1), [params] * 1000,
                    output_token_ids=[[9]] * 1000)
    assert not torch.isin(tokens, torch.tensor([1, 3])).any()


def test_min_tokens_ignores_ids_outside_the_logits():
    params = SamplingParams(temperature=0.0,
                            min_tokens=1,
                            stop_token_ids=[1, 500])
    tokens = sample(torch.tensor([[0.0, 3.0, 1.0]]), [params])
    assert tokens.tolist() == [2]


def test_mixed_greedy_and_random_batch():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(200, 30, generator=gen)
    params = [
        SamplingParams(temperature=0.0) if i %
        2 else SamplingParams(temperature=1.0, top_k=5) for i in range(200)
    ]
    torch.manual_seed(0)
    tokens = sample(logits, params)
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))
    top5 = logits[0::2].topk(5).indices
    assert (top5 == tokens[0::2].unsqueeze(1)).any(dim=1).all()
    # The random rows are not all argmax.
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(dim=-1))


def run_steps(step_logits: list[torch.Tensor], row: int, batch_size: int,
              seed: int, others: list[SamplingParams]) -> list[int]:
    """Sample the seeded row at position ``row`` of a batch, step by step,
    with a fresh generator; the other rows are ``others``."""
    generator = torch.Generator().manual_seed(seed)
    params = list(others)
    params.insert(row, SamplingParams(seed=seed, top_p=0.9))
    generators: list[torch.Generator | None] = [None] * batch_size
    generators[row] = generator
    tokens = []
    for step, row_logits in enumerate(step_logits):
        torch.manual_seed(1000 + step + batch_size)  # the global RNG differs
        logits = torch.randn(batch_size, row_logits.shape[-1])
        logits[row] = row_logits
        tokens.append(int(sample(logits, params, generators=generators)[row]))
    return tokens


def test_seeded_row_is_reproducible_whatever_the_batch():
    gen = torch.Generator().manual_seed(5)
    step_logits = [torch.randn(100, generator=gen) for _ in range(8)]
    alone = run_steps(step_logits, row=0, batch_size=1, seed=42, others=[])
    others = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=7, top_k=3)
    ]
    # Another seeded row in the batch has no generator here: it draws from
    # the global RNG, which must not matter either.
    in_batch = run_steps(step_logits,
                         row=2,
                         batch_size=4,
                         seed=42,
                         others=others)
    assert alone == in_batch
    other_seed = run_steps(step_logits, row=0, batch_size=1, seed=43, others=[])
    assert other_seed != alone


def test_logprobs_of_the_raw_logits():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 20, generator=gen)
    params = [
        SamplingParams(temperature=0.5, logprobs=2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=4),
        SamplingParams(top_k=3,
                       logprobs=0,
                       min_tokens=1,
                       stop_token_ids=[int(logits[3].argmax())])
    ]
    torch.manual_seed(0)
    out = Sampler()(logits, make_metadata(params, 20))
    lp = out.logprobs_tensors
    assert lp is not None
    assert lp.logprob_token_ids.shape == (4, 5)
    assert lp.logprobs.shape == (4, 5)
    assert lp.logprobs.dtype == torch.float32
    assert lp.selected_token_ranks.shape == (4, )

    raw = logits.log_softmax(dim=-1)
    sampled = out.sampled_token_ids
    assert torch.equal(lp.logprob_token_ids[:, 0], sampled)
    top_logprobs, top_ids = raw.topk(4, dim=-1)
    assert torch.equal(lp.logprob_token_ids[:, 1:], top_ids)
    torch.testing.assert_close(lp.logprobs[:, 1:], top_logprobs)
    torch.testing.assert_close(lp.logprobs[:, 0],
                               raw.gather(1, sampled[:, None]).squeeze(1))
    ranks = [int((raw[i] > raw[i, sampled[i]]).sum()) + 1 for i in range(4)]
    assert lp.selected_token_ranks.tolist() == ranks
    assert lp.selected_token_ranks[2] == 1  # greedy row
    # Row 3 could not pick its best token (min_tokens), so rank >= 2.
    assert lp.selected_token_ranks[3] >= 2


def test_logprobs_whole_vocabulary():
    logits = torch.randn(2, 12)
    params = [SamplingParams(logprobs=-1), SamplingParams()]
    lp = Sampler()(logits, make_metadata(params, 12)).logprobs_tensors
    assert lp is not None
    assert lp.logprobs.shape == (2, 13)
    torch.testing.assert_close(lp.logprobs[:, 1:].exp().sum(dim=-1),
                               torch.ones(2))


def test_no_logprobs_requested():
    out = Sampler()(torch.randn(2, 12), make_metadata([SamplingParams()] * 2,
                                                      12))
    assert out.logprobs_tensors is None


def test_metadata_skips_unused_parameters():
    params = [SamplingParams(temperature=0.0, top_p=0.5), SamplingParams()]
    md = make_metadata(params, 10)
    assert md.top_k is None and md.top_p is None and md.min_p is None
    assert md.min_tokens_mask is None and md.max_num_logprobs is None
    assert md.temperature.tolist() == [1.0, 1.0]
    assert md.is_greedy.tolist() == [True, False]
    assert not md.all_greedy and not md.all_random

    md = make_metadata([SamplingParams(top_k=3), SamplingParams()], 10)
    assert md.top_k is not None and md.top_k.tolist() == [3, 10]
    assert md.all_random


def test_top_k_top_p_slice_matches_full_sort():
    """top_k / top_p on the topk slice give the thresholds of a full sort."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 300, generator=gen) * 2
    params = [
        SamplingParams(top_k=5),
        SamplingParams(top_k=40, top_p=0.7, temperature=0.5),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1, top_p=0.2),
        SamplingParams(top_k=30, top_p=0.95, temperature=2.0),
        SamplingParams(),
    ]
    md = make_metadata(params, 300)
    assert md.top_k_top_p_width == 40
    sliced = top_k_top_p_threshold(logits, None, md)
    full = top_k_top_p_threshold(logits, None,
                                 dataclasses.replace(md, top_k_top_p_width=300))
    assert sliced is not None and full is not None
    torch.testing.assert_close(sliced, full)
    assert sliced[[2, 5]].isneginf().all()
    assert sliced[0] == logits[0].topk(5).values[-1]
    # top_p on a row without top_k needs the full sort.
    md = make_metadata([SamplingParams(top_p=0.5),
                        SamplingParams(top_k=3)], 300)
    assert md.top_k_top_p_width == 300


def test_compute_topk_logprobs():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 50, generator=gen).to(torch.bfloat16)
    token_ids = torch.tensor([3, 0, 49, 7, 7])
    out = compute_topk_logprobs(logits, token_ids, 4)
    raw = logits.float().log_softmax(dim=-1)
    assert out.logprob_token_ids.shape == (5, 5)
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprob_token_ids[:, 0], token_ids)
    torch.testing.assert_close(out.logprobs[:, 0],
                               raw.gather(1, token_ids[:, None]).squeeze(1))
    top_logprobs, top_ids = raw.topk(4, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    torch.testing.assert_close(out.logprobs[:, 1:], top_logprobs)
    ranks = [
        int((raw[i] > raw[i, t]).sum()) + 1 for i, t in enumerate(token_ids)
    ]
    assert out.selected_token_ranks.tolist() == ranks
    # Whole vocabulary, and k = 0.
    assert compute_topk_logprobs(logits, token_ids,
                                 -1).logprobs.shape == (5, 51)
    assert compute_topk_logprobs(logits, token_ids, 0).logprobs.shape == (5, 1)


def test_compute_topk_logprobs_in_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(7, 20, generator=gen)
    token_ids = torch.randint(0, 20, (7, ), generator=gen)
    whole = compute_topk_logprobs(logits, token_ids, 3)
    monkeypatch.setattr(sampler_module, "_LOGPROBS_CHUNK_ELEMENTS", 40)
    chunked = compute_topk_logprobs(logits, token_ids, 3)
    for name in ("logprob_token_ids", "logprobs", "selected_token_ranks"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name))


def test_all_features_in_one_batch():
    """Every parameter at once, each row checked against its own rules."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 64, generator=gen) * 3
    params = [
        SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=2),
        SamplingParams(seed=3,
                       top_k=4,
                       top_p=0.9,
                       min_p=0.01,
                       top_n_sigma=1.5,
                       repetition_penalty=1.2),
        SamplingParams(allowed_token_ids=[1, 2, 3], logit_bias={2: 100.0}),
        SamplingParams(temperature=0.0, bad_words=["w"]),
        SamplingParams(top_n_sigma=1e-6, frequency_penalty=2.0, logprobs=5),
        SamplingParams(temperature=0.0,
                       min_tokens=2,
                       stop_token_ids=[int(logits[5].argmax())]),
    ]
    generators = [
        None, torch.Generator().manual_seed(3), None, None, None, None
    ]
    outputs = [[int(logits[0].argmax())], [1, 2], [], [5], [7, 7], [1]]
    best_3 = int(logits[3].argmax())
    torch.manual_seed(0)
    out = Sampler()(logits,
                    make_metadata(params,
                                  64,
                                  generators=generators,
                                  output_token_ids=outputs,
                                  prompt_token_ids=[[0]] * 6,
                                  bad_words_token_ids=[[], [], [], [[best_3]],
                                                       [], []]))
    tokens = out.sampled_token_ids.tolist()
    first = logits[0].clone()
    first[outputs[0][0]] -= 1.0
    assert tokens[0] == int(first.argmax())
    assert tokens[1] in logits[1].topk(4).indices.tolist()
    assert tokens[2] == 2
    assert tokens[3] != best_3
    assert tokens[3] == int(logits[3].topk(2).indices[1])
    fourth = logits[4].clone()
    fourth[7] -= 4.0
    assert tokens[4] == int(fourth.argmax())
    assert tokens[5] == int(logits[5].topk(2).indices[1])
    lp = out.logprobs_tensors
    assert lp is not None and lp.logprobs.shape == (6, 6)
    assert lp.logprob_token_ids[:, 0].tolist() == tokens


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_sync() -> None:
    cuda = torch.device("cuda")
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(7))
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(seed=1, top_k=50, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=0.7,
                       min_tokens=2,
                       stop_token_ids=[int(logits[2].argmax())]),
        SamplingParams(temperature=0.0,
                       min_tokens=1,
                       stop_token_ids=[int(logits[3].argmax())]),
        SamplingParams(seed=2, logprobs=-1),
        SamplingParams(top_k=1)
    ]
    generators: list[torch.Generator | None] = [
        None if p.seed is None else torch.Generator(cuda).manual_seed(p.seed)
        for p in params
    ]
    cuda_logits = logits.to(cuda).half()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metadata = make_metadata(params, 1000, generators, device=cuda)
        out = Sampler()(cuda_logits, metadata)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    sampled = out.sampled_token_ids.cpu()
    greedy = [0, 3, 5]
    masked = logits.clone()
    masked[3, int(logits[3].argmax())] = float("-inf")
    assert torch.equal(sampled[greedy], masked[greedy].argmax(dim=-1))
    assert sampled[2] != logits[2].argmax()
    assert out.logprobs_tensors is not None
    assert out.logprobs_tensors.logprobs.shape == (6, 1001)
    # The seeded rows again, alone, with fresh generators.
    for row in (1, 4):
        generator = torch.Generator(cuda).manual_seed(params[row].seed or 0)
        alone = Sampler()(cuda_logits[row:row + 1],
                          make_metadata([params[row]],
                                        1000, [generator],
                                        device=cuda))
        assert alone.sampled_token_ids.item() == sampled[row]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_all_features_without_host_sync() -> None:
    cuda = torch.device("cuda")
    vocab = 1000
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(8, vocab, generator=gen) * 3
    params = [
        SamplingParams(temperature=0.0,
                       presence_penalty=0.5,
                       frequency_penalty=0.5,
                       repetition_penalty=1.3,
                       logit_bias={1: 2.0},
                       logprobs=3),
        SamplingParams(seed=5, top_n_sigma=1.0, min_p=0.05, top_k=20,
                       top_p=0.9),
        SamplingParams(temperature=0.0, allowed_token_ids=[3, 4, 5]),
        SamplingParams(temperature=0.0, bad_words=["w"]),
        SamplingParams(top_p=0.8, logprobs=-1),
        SamplingParams(top_n_sigma=1e-6, temperature=0.7),
        SamplingParams(temperature=0.0,
                       min_tokens=3,
                       stop_token_ids=[int(logits[6].argmax())]),
        SamplingParams(temperature=0.0,
                       logits_processors=[lambda out, row: row.neg()]),
    ]
    outputs = [[1, 2, 2], [3], [], [9], [], [], [4], []]
    prompts = [[7, 8]] * 8
    bad_words = [[], [], [], [[int(logits[3].argmax())]], [], [], [], []]

    def run(device: torch.device, row_logits: torch.Tensor,
            generators: list[torch.Generator | None]):
        metadata = make_metadata(params,
                                 vocab,
                                 generators,
                                 output_token_ids=outputs,
                                 device=device,
                                 prompt_token_ids=prompts,
                                 bad_words_token_ids=bad_words)
        return Sampler()(row_logits, metadata)

    def seeded(device: torch.device) -> list[torch.Generator | None]:
        return [
            None
            if p.seed is None else torch.Generator(device).manual_seed(p.seed)
            for p in params
        ]

    cpu_out = run(torch.device("cpu"), logits, seeded(torch.device("cpu")))
    cuda_logits = logits.to(cuda)
    generators = seeded(cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(cuda, cuda_logits, generators)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sampled = out.sampled_token_ids.cpu()
    greedy = [0, 2, 3, 5, 6, 7]
    assert sampled[greedy].tolist() == \
        cpu_out.sampled_token_ids[greedy].tolist()
    # Row 1 stays inside its top_k.
    assert int(sampled[1]) in logits[1].topk(20).indices.tolist()
    lp, cpu_lp = out.logprobs_tensors, cpu_out.logprobs_tensors
    assert lp is not None and cpu_lp is not None
    assert lp.logprobs.shape == (8, vocab + 1)
    # Column 0 is the sampled token; the top-K columns do not depend on it.
    torch.testing.assert_close(lp.logprobs[:, 1:].cpu(),
                               cpu_lp.logprobs[:, 1:],
                               rtol=1e-4,
                               atol=1e-4)
