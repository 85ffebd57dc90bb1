"""``LaunchGraphs``: when it captures and replays (any device, with a graph
that runs its launches), and on a GPU that a ``Sampler`` replaying graphs
samples what one launching at every step samples."""
from collections.abc import Callable

import pytest
import torch

from vllm.model_executor.layers.ops.launch_graphs import LaunchGraphs
from vllm.model_executor.layers.sampler import Sampler
from vllm.model_executor.sampling_state import SamplingState
from vllm.sampling_params import SamplingParams


class RecordedGraph:
    """Stands for a CUDA graph: its replay runs the launches."""

    def __init__(self, launch: Callable[[], None]) -> None:
        self.replay = launch


def recording(capacity: int) -> tuple[LaunchGraphs, list[str]]:
    graphs = LaunchGraphs(capacity=capacity, capture_at=2)
    captured: list[str] = []

    def capture(launch: Callable[[], None]) -> RecordedGraph:
        captured.append("capture")
        return RecordedGraph(launch)

    graphs._capture = capture  # type: ignore[method-assign]
    return graphs, captured


def test_a_key_is_captured_when_it_comes_again():
    graphs, captured = recording(capacity=4)
    ran: list[str] = []
    for key in ["a", "b", "a", "a", "b", "a"]:
        graphs.run(key, lambda key=key: ran.append(key))
    # Every call ran its launches once, graphs or not.
    assert ran == ["a", "b", "a", "a", "b", "a"]
    assert captured == ["capture", "capture"]  # "a" then "b", once each
    assert list(graphs._graphs) == ["b", "a"]  # least recently used first


def test_only_the_graphs_used_last_are_kept():
    graphs, captured = recording(capacity=2)
    for key in ["a", "a", "b", "b", "c", "c"]:
        graphs.run(key, lambda: None)
    assert list(graphs._graphs) == ["b", "c"]
    # "a" starts again from its first sighting.
    graphs.run("a", lambda: None)
    assert len(captured) == 3 and "a" not in graphs._graphs
    graphs.run("a", lambda: None)
    assert len(captured) == 4 and list(graphs._graphs) == ["c", "a"]


def test_a_failed_capture_launches_from_then_on():
    graphs = LaunchGraphs(capture_at=2)

    def capture(launch: Callable[[], None]) -> RecordedGraph:
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._capture = capture  # type: ignore[method-assign]
    ran: list[str] = []
    for key in ["a", "a", "a", "b", "b"]:
        graphs.run(key, lambda key=key: ran.append(key))
    assert ran == ["a", "a", "a", "b", "b"]
    assert graphs.disabled and not graphs._graphs


# ------------------------------------------------------------------ on a GPU
def deterministic_params(num_rows: int,
                         vocab_size: int) -> list[SamplingParams]:
    """Every feature of the fused step on rows whose tokens do not depend on
    the step's random seed: greedy rows with edits, seeded random rows."""
    params = []
    for row in range(num_rows):
        common = dict(presence_penalty=0.5,
                      frequency_penalty=0.3,
                      repetition_penalty=1.1,
                      logit_bias={row * 11 % vocab_size: 2.0},
                      logprobs=3)
        if row % 3 == 0:
            params.append(SamplingParams(temperature=0.0, **common))
        else:
            params.append(
                SamplingParams(temperature=0.8,
                               min_p=0.02,
                               top_n_sigma=2.0 if row % 2 else None,
                               seed=row,
                               **common))
    return params


@pytest.mark.cuda
def test_replayed_steps_sample_what_launched_steps_sample():
    """Steps of a steady batch, the logits rewritten in place at each step
    (same address, new values): the graphs' tokens and logprobs equal
    those of launches at every step; the graphs were captured and
    replayed."""
    pytest.importorskip("triton", reason="the fused step needs triton")
    device = torch.device("cuda")
    num_rows, vocab_size, num_steps = 24, 32_000, 8
    params = deterministic_params(num_rows, vocab_size)
    gen = torch.Generator().manual_seed(0)
    step_logits = [
        torch.randn(num_rows, vocab_size, generator=gen) * 3
        for _ in range(num_steps)
    ]
    results = {}
    for cuda_graphs in (False, True):
        sampler = Sampler(cuda_graphs=cuda_graphs)
        state = SamplingState(device)
        logits = torch.empty(num_rows, vocab_size, device=device)
        outputs = [[row % vocab_size, 7] for row in range(num_rows)]
        generators = [
            None
            if p.seed is None else torch.Generator(device).manual_seed(p.seed)
            for p in params
        ]
        steps = []
        for step in range(num_steps):
            logits.copy_(step_logits[step])
            md = state.prepare(list(range(num_rows)), params, generators,
                               outputs, [[1, 2, 3]] * num_rows, vocab_size)
            out = sampler(logits, md)
            state.sampled(out.sampled_token_ids)
            tokens, logprobs = out.to_host()
            assert logprobs is not None
            steps.append((tokens, logprobs.logprob_token_ids.tolist(),
                          logprobs.logprobs.tolist(),
                          logprobs.selected_token_ranks.tolist()))
            for output, token in zip(outputs, tokens):
                output.append(token)
        results[cuda_graphs] = steps
        if cuda_graphs:
            assert sampler.graphs is not None
            assert sampler.graphs.captures >= 1
    assert results[True] == results[False]


@pytest.mark.cuda
def test_replays_draw_new_noise_and_manual_seed_repeats_it():
    """Unseeded rows on the same logits at every step: each replay draws a
    new Philox key (the tokens change from step to step), and
    ``torch.manual_seed`` before a run makes it repeat exactly."""
    pytest.importorskip("triton", reason="the fused step needs triton")
    device = torch.device("cuda")
    num_rows, vocab_size, num_steps = 32, 32_000, 6
    params = [
        SamplingParams(temperature=1.0, min_p=1e-6, logprobs=1)
        for _ in range(num_rows)
    ]
    logits = torch.zeros(num_rows, vocab_size, device=device)  # uniform

    def run() -> tuple[list[list[int]], int]:
        torch.manual_seed(0)
        sampler = Sampler(cuda_graphs=True)
        state = SamplingState(device)
        steps = []
        for _ in range(num_steps):
            md = state.prepare(list(range(num_rows)), params, [None] * num_rows,
                               [[]] * num_rows, [[1]] * num_rows, vocab_size)
            out = sampler(logits, md)
            steps.append(out.to_host()[0])
        assert sampler.graphs is not None
        return steps, sampler.graphs.captures

    steps, captures = run()
    assert captures == 1  # the same key at every step: one graph
    # 32 draws from 32,000 tokens: equal steps would be a repeated key.
    assert len({tuple(tokens) for tokens in steps}) == num_steps
    assert run() == (steps, captures)
