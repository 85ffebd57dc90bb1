"""SamplingState: metadata kept between steps must sample exactly as the
metadata that SamplingMetadata.prepare rebuilds at every step."""
import random

import pytest
import torch

from vllm.model_executor.layers.sampler import (
    Sampler, apply_allowed_token_ids, apply_bad_words, apply_logit_bias,
    apply_min_tokens, apply_penalties)
from vllm.model_executor.sampling_metadata import (PenaltyCounts,
                                                   SamplingMetadata, seen_mask)
from vllm.model_executor.sampling_state import SamplingState
from vllm.sampling_params import SamplingParams
from vllm.sequence import PLACEHOLDER_TOKEN_ID

CPU = torch.device("cpu")
VOCAB = 50


def random_params(rng: random.Random, seq_id: int) -> SamplingParams:
    """One of several mixes, every feature somewhere."""
    kind = seq_id % 6
    if kind == 0:
        return SamplingParams(temperature=0.0)
    if kind == 1:
        return SamplingParams(temperature=0.7, top_k=5, top_p=0.9, logprobs=2)
    if kind == 2:
        return SamplingParams(presence_penalty=0.5,
                              frequency_penalty=0.3,
                              repetition_penalty=1.3,
                              min_p=0.05,
                              top_n_sigma=1.5,
                              seed=seq_id)
    if kind == 3:
        params = SamplingParams(temperature=0.0,
                                repetition_penalty=0.8,
                                logit_bias={rng.randrange(VOCAB): 3.0},
                                min_tokens=3,
                                stop_token_ids=[rng.randrange(VOCAB)])
        params.update_from_generation_config({}, model_eos_token_id=1)
        return params
    if kind == 4:
        params = SamplingParams(top_p=0.6,
                                frequency_penalty=1.0,
                                allowed_token_ids=rng.sample(range(VOCAB), 10),
                                bad_words=["x"])
        params._bad_words_token_ids = [[rng.randrange(VOCAB)],
                                       [3, rng.randrange(VOCAB)]]
        return params
    return SamplingParams(presence_penalty=-1.0, logprobs=0)


class Seq:

    def __init__(self, seq_id: int, rng: random.Random) -> None:
        self.seq_id = seq_id
        self.params = random_params(rng, seq_id)
        self.prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 9))]
        self.output: list[int] = []
        self.generator = (None if self.params.seed is None else
                          torch.Generator().manual_seed(self.params.seed))


def edited(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    work = logits.clone()
    for step in (apply_allowed_token_ids, apply_bad_words, apply_min_tokens,
                 apply_logit_bias, apply_penalties):
        work = step(work, md)
    return work


def restore_generators(generators: list[torch.Generator | None],
                       states: list[torch.Tensor | None]) -> None:
    for generator, saved in zip(generators, states):
        if generator is not None:
            generator.set_state(saved)


def test_state_samples_as_prepare_across_steps():
    """Sequences join, finish, are preempted (absent, then back), change
    order; every step must give the same edited logits, tokens and logprobs
    as a fresh SamplingMetadata.prepare."""
    rng = random.Random(0)
    state = SamplingState(CPU)
    seqs = [Seq(i, rng) for i in range(8)]
    next_id = 8
    saw_penalty_counts = False
    for step in range(40):
        batch = [s for s in seqs if rng.random() > 0.1]  # some preempted
        if step % 7 == 3:
            rng.shuffle(batch)
        if not batch:
            continue
        logits = torch.randn(len(batch),
                             VOCAB,
                             generator=torch.Generator().manual_seed(step)) * 3
        args = ([s.params for s in batch], [s.generator for s in batch],
                [s.output for s in batch], [s.prompt for s in batch])
        kept_md = state.prepare([s.seq_id for s in batch], *args, VOCAB)
        # The reference draws with copies of the seeded generators.
        states = [g.get_state() if g else None for g in args[1]]
        fresh_md = SamplingMetadata.prepare(*args, VOCAB, CPU)
        saw_penalty_counts |= isinstance(kept_md.penalties, PenaltyCounts)
        for name in ("all_greedy", "all_random", "top_k_top_p_width",
                     "max_top_k", "truncated_everywhere",
                     "top_k_top_p_everywhere", "top_k_everywhere",
                     "max_num_logprobs", "has_masked_tokens"):
            assert getattr(kept_md, name) == getattr(fresh_md, name), name
        assert torch.equal(edited(logits, kept_md), edited(logits, fresh_md))

        # prepare draws seeded keys from them: both samplers start here.
        restore_generators(args[1], states)
        torch.manual_seed(step)
        fresh = Sampler()(logits, fresh_md)
        restore_generators(args[1], states)
        torch.manual_seed(step)
        kept = Sampler()(logits, kept_md)
        assert torch.equal(kept.sampled_token_ids, fresh.sampled_token_ids)
        assert (kept.logprobs_tensors is None) == (fresh.logprobs_tensors
                                                   is None)
        if kept.logprobs_tensors is not None:
            assert fresh.logprobs_tensors is not None
            assert torch.equal(kept.logprobs_tensors.logprobs,
                               fresh.logprobs_tensors.logprobs)

        for seq, token in zip(batch, kept.sampled_token_ids.tolist()):
            seq.output.append(token)
        # Some finish; new ones join.
        for seq in list(seqs):
            if len(seq.output) > rng.randrange(4, 30):
                seqs.remove(seq)
                seqs.append(Seq(next_id, rng))
                next_id += 1
        assert state.num_slots == len(batch)
    assert saw_penalty_counts and next_id > 12


def test_incremental_counts_equal_recomputed_counts():
    rng = random.Random(1)
    state = SamplingState(CPU)
    params = SamplingParams(frequency_penalty=1.0, repetition_penalty=1.5)
    prompts = [[1, 2, 2], [3]]
    outputs: list[list[int]] = [[], [4, 4]]

    def check(seq_ids: list[int]) -> None:
        rows = [seq_ids.index(i) for i in seq_ids]
        md = state.prepare(seq_ids, [params] * len(seq_ids),
                           [None] * len(seq_ids), [outputs[i] for i in seq_ids],
                           [prompts[i] for i in seq_ids], VOCAB)
        penalties = md.penalties
        assert isinstance(penalties, PenaltyCounts)
        assert penalties.rows.tolist() == rows
        assert penalties.row_slots.tolist() == penalties.slots.tolist()
        # Each row's slot holds its output's token counts, and a seen bit
        # for its output's and its prompt's tokens (the repetition penalty
        # reads both).
        for row, slot in zip(rows, penalties.slots.tolist()):
            seq = seq_ids[row]
            assert slot == state._slot_of[seq]
            expected = torch.bincount(torch.tensor(outputs[seq],
                                                   dtype=torch.int64),
                                      minlength=VOCAB)
            assert torch.equal(penalties.counts[slot].long(), expected)
            seen = seen_mask(penalties.seen[slot:slot + 1], VOCAB)[0]
            assert (set(seen.nonzero().view(-1).tolist()) == set(prompts[seq])
                    | set(outputs[seq]))

    for _ in range(5):
        check([0, 1])
        for output in outputs:
            output.append(rng.randrange(VOCAB))
    check([1])  # 0 preempted: its slot is released
    outputs[0] += [7, 7, 7]  # several tokens while away
    check([1, 0])
    outputs[1][-1] = 9  # changed in place: rebuilt (same length: kept)
    outputs[1].append(9)
    check([1, 0])
    del outputs[0][2:]  # shrank
    check([1, 0])
    outputs[0] = [5]  # a new list object
    check([1, 0])
    # Histories longer than the first allocation.
    for _ in range(150):
        outputs[0].append(rng.randrange(VOCAB))
        check([1, 0])


def test_empty_history_never_takes_a_repetition_penalty():
    state = SamplingState(CPU)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    outputs: list[list[int]] = [[]]
    logits = torch.tensor([[4.0, 3.0, 0.0]])
    for expected in ([0], [1]):
        md = state.prepare([0], [params], [None], outputs, [[]], 3)
        assert Sampler()(logits, md).sampled_token_ids.tolist() == expected
        outputs[0].append(0)  # token 0 now halved: 2.0 < 3.0


def test_unchanged_batch_reuses_its_tensors():
    state = SamplingState(CPU)
    params = [SamplingParams(temperature=0.0)] * 3
    outputs: list[list[int]] = [[], [], []]

    def prepare(seq_ids: list[int]) -> SamplingMetadata:
        return state.prepare(seq_ids, params, [None] * 3, outputs, [[1]] * 3,
                             VOCAB)

    first = prepare([4, 5, 6])
    assert first.all_greedy and not first.edits_logits
    second = prepare([4, 5, 6])
    assert second.temperature is first.temperature
    assert second.is_greedy is first.is_greedy
    # Another order is another batch: new tensors, the same slots.
    slots = dict(state._slot_of)
    third = prepare([6, 5, 4])
    assert third.temperature is not first.temperature
    assert state._slot_of == slots
    state.prepare([7], params[:1], [None], outputs[:1], [[1]], VOCAB)
    assert state.num_slots == 1


def test_vocab_change_resets():
    state = SamplingState(CPU)
    params = [SamplingParams(top_k=100, presence_penalty=1.0)]
    md = state.prepare([0], params, [None], [[3]], [[1]], 10)
    assert md.top_k is None  # 100 >= vocab: off
    md = state.prepare([0], params, [None], [[3]], [[1]], 200)
    assert md.top_k is not None and md.top_k.tolist() == [100]
    assert state._counts is not None and state._counts.shape[1] == 200


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_engine_path_never_syncs(device: str):
    """SamplingState.prepare and the Sampler over several steps, with every
    feature and each draw path, without a host sync on CUDA (only
    to_host() copies); greedy rows as on the CPU."""
    dev = torch.device(device)
    vocab = 20_000  # above _CANDIDATES: candidates, not a full sort
    rng = random.Random(3)
    bad = SamplingParams(temperature=0.0, bad_words=["w"])
    bad._bad_words_token_ids = [[5], [1, 2]]
    batches = {
        # top-k / top-p / min_p / top-nσ everywhere: the candidate draw
        "candidates": [
            SamplingParams(top_k=20, top_p=0.9, seed=1, logprobs=2),
            SamplingParams(top_p=0.95, presence_penalty=0.5),
            SamplingParams(min_p=0.05, repetition_penalty=1.2, seed=2),
            SamplingParams(top_n_sigma=1.0, logit_bias={3: 5.0}),
            SamplingParams(temperature=0.0, frequency_penalty=0.5),
            bad,
        ],
        # no top-k / top-p: the fused kernels, which record the step
        "fused": [
            SamplingParams(min_p=0.05, presence_penalty=0.5, seed=4,
                           logprobs=2),
            SamplingParams(top_n_sigma=1.0, repetition_penalty=1.2),
            SamplingParams(temperature=0.0, frequency_penalty=0.5, logprobs=1),
            SamplingParams(temperature=0.9, seed=5),
        ],
        # an untruncated row: the whole-vocabulary draw, kept for a recheck
        "whole": [
            SamplingParams(temperature=0.9, seed=3),
            SamplingParams(top_p=0.5, min_tokens=4, stop_token_ids=[7]),
            SamplingParams(temperature=0.0, allowed_token_ids=[1, 2, 3]),
        ],
    }
    for name, params in batches.items():
        state = SamplingState(dev)
        cpu_state = SamplingState(CPU)
        n = len(params)
        prompts = [[rng.randrange(vocab) for _ in range(5)] for _ in params]
        outputs: list[list[int]] = [[] for _ in params]
        greedy = [p.temperature == 0.0 for p in params]
        for step in range(4):
            logits = torch.randn(n,
                                 vocab,
                                 generator=torch.Generator().manual_seed(step))
            # Host generators, as the engine makes them.
            generators = [
                None
                if p.seed is None else torch.Generator().manual_seed(p.seed)
                for p in params
            ]
            on_device = logits.to(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                md = state.prepare(list(range(n)), params, generators, outputs,
                                   prompts, vocab)
                out = Sampler()(on_device, md)
            finally:
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            tokens, _ = out.to_host()
            cpu_md = cpu_state.prepare(list(range(n)), params, [None] * n,
                                       outputs, prompts, vocab)
            expected = Sampler()(logits, cpu_md).to_host()[0]
            for row in range(n):
                if greedy[row]:
                    assert tokens[row] == expected[row], (name, step, row)
                outputs[row].append(tokens[row])


def test_sampled_ids_grow_the_counts_without_reading_outputs():
    """As async scheduling runs it: each output ends with a placeholder for
    the token its last step is still sampling. After ``sampled``, a step of
    the same batch adds those ids on the device without reading the lists;
    a step of another batch reads the lists and takes each placeholder's
    token from the last step's ids."""
    state = SamplingState(CPU)
    params = [SamplingParams(presence_penalty=1.0)] * 3
    prompts = [[0], [0], [0]]
    outputs = [[1], [2, 3], [4]]
    real = [list(output) for output in outputs]

    def counts_of(seq_ids: list[int]) -> list[torch.Tensor]:
        md = state.prepare(seq_ids, params[:len(seq_ids)],
                           [None] * len(seq_ids), [outputs[i] for i in seq_ids],
                           [prompts[i] for i in seq_ids], VOCAB)
        penalties = md.penalties
        assert isinstance(penalties, PenaltyCounts)
        return [penalties.counts[slot].long() for slot in penalties.slots]

    in_flight: list[int] = []  # sequences of the step still sampling

    def step(seq_ids: list[int], drawn: list[int]) -> None:
        for got, seq in zip(counts_of(seq_ids), seq_ids):
            assert torch.equal(
                got, torch.bincount(torch.tensor(real[seq]), minlength=VOCAB))
        state.sampled(torch.tensor(drawn))
        # Launched: the step before reaches the host, this one is in flight.
        for seq in in_flight:
            outputs[seq][-1] = real[seq][-1]
        for seq, token in zip(seq_ids, drawn):
            outputs[seq].append(PLACEHOLDER_TOKEN_ID)
            real[seq].append(token)
        in_flight[:] = seq_ids

    step([0, 1, 2], [5, 7, 9])
    step([0, 1, 2], [6, 7, 9])  # same batch: the device adds the ids
    step([0, 1, 2], [8, 2, 9])
    step([2, 1], [3, 3])  # 0 left: placeholders' tokens from the last ids
    step([1, 2, 0], [4, 4, 4])  # 0 is back: rebuilt, with its placeholder
    step([1, 2, 0], [1, 1, 1])
