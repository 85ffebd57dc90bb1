"""Async scheduling: step N+1 is scheduled and launched before step N's tokens
reach the host. It must change nothing but timing: every output equals the
one-step-at-a-time engine's, each request finishes once, and requests whose
sampler reads their tokens on the host never run ahead."""
from pathlib import Path

import pytest

from tests.engine.test_llm_engine import PROMPTS
from vllm import EngineArgs, LLMEngine, SamplingParams
from vllm.sampling_params import RequestOutputKind


def _engine(path: Path, async_scheduling: bool, **kwargs) -> LLMEngine:
    return LLMEngine.from_engine_args(
        EngineArgs(model=str(path),
                   device="cpu",
                   async_scheduling=async_scheduling,
                   **kwargs))


def _run(engine: LLMEngine,
         params: list[SamplingParams]) -> dict[str, list[tuple]]:
    """Every request's completions (tokens, text, finish reason, stop
    reason, logprobs) from its one final output, and checks that nothing is
    returned for it after that.

    Logprobs are (token, rank, decoded token, logprob rounded to 1e-3): a
    batch of another size (the row of a sequence that already stopped)
    changes the float sums in the last bits.
    """
    for i, p in enumerate(params):
        engine.add_request(str(i), PROMPTS[i % len(PROMPTS)], p)
    results: dict[str, list[tuple]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in results, "output after the final one"
            if out.finished:
                results[out.request_id] = [
                    (c.token_ids, c.text, c.finish_reason, c.stop_reason,
                     _rounded(c.logprobs)) for c in out.outputs
                ]
    assert len(results) == len(params)
    return results


def _rounded(logprobs: list[dict] | None) -> list | None:
    if logprobs is None:
        return None
    return [{(t, lp.rank, lp.decoded_token, round(lp.logprob, 3))
             for t, lp in step.items()} for step in logprobs]


MIXED = [
    SamplingParams(temperature=0.0, max_tokens=30),  # may stop at EOS
    SamplingParams(temperature=0.0, max_tokens=40, stop=[" the", "."]),
    SamplingParams(temperature=1.0, seed=7, max_tokens=25, logprobs=3),
    SamplingParams(temperature=0.8, seed=1, n=3, max_tokens=20),
    SamplingParams(temperature=0.0, max_tokens=1),
    SamplingParams(temperature=0.0,
                   max_tokens=35,
                   stop=["ball"],
                   include_stop_str_in_output=True),
    # Penalties read the tokens sampled so far from the device.
    SamplingParams(temperature=0.9,
                   seed=3,
                   n=2,
                   presence_penalty=0.8,
                   frequency_penalty=0.5,
                   repetition_penalty=1.3,
                   max_tokens=30),
    SamplingParams(temperature=0.0,
                   repetition_penalty=1.5,
                   min_tokens=12,
                   max_tokens=24),
]


@pytest.mark.parametrize("engine_kwargs", [
    {},
    {
        "num_gpu_blocks_override": 10,
        "block_size": 8,
        "max_model_len": 80
    },
    {
        "num_gpu_blocks_override": 10,
        "block_size": 8,
        "max_model_len": 80,
        "preemption_mode": "swap"
    },
    {
        "max_num_batched_tokens": 8,
        "max_num_seqs": 4
    },
],
                         ids=["plain", "recompute", "swap", "chunked"])
def test_same_outputs_as_one_step_at_a_time(stories260k_path: Path,
                                            engine_kwargs: dict) -> None:
    expected = _run(_engine(stories260k_path, False, **engine_kwargs), MIXED)
    got = _run(_engine(stories260k_path, True, **engine_kwargs), MIXED)
    assert got == expected


def test_max_model_len_reached(stories260k_path: Path) -> None:
    """A sequence that fills the context stops; the step after it never
    gets a slot past max_model_len."""
    params = [SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)]
    expected = _run(_engine(stories260k_path, False, max_model_len=24), params)
    assert _run(_engine(stories260k_path, True, max_model_len=24),
                params) == expected


def _launch_order(engine: LLMEngine) -> list[str]:
    """Records 'launch' for each step queued and 'wait' for each step whose
    tokens the engine waits for."""
    events: list[str] = []
    execute = engine.executor.execute_model

    def launch(*args):
        pending = execute(*args)
        get = pending.get

        def wait():
            events.append("wait")
            return get()

        pending.get = wait  # type: ignore[method-assign]
        events.append("launch")
        return pending

    engine.executor.execute_model = launch  # type: ignore[method-assign]
    return events


def test_next_step_launches_before_tokens_arrive(
        stories260k_path: Path) -> None:
    engine = _engine(stories260k_path, True)
    events = _launch_order(engine)
    _run(engine, [SamplingParams(temperature=0.0, max_tokens=10)] * 2)
    # Steady state: launch N+1, then wait for N.
    assert events[:4] == ["launch", "launch", "wait", "launch"]
    assert events.count("launch") == events.count("wait")


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=8, bad_words=["the"]),
    SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=2),
])
def test_requests_that_need_host_tokens_run_one_step_at_a_time(
        stories260k_path: Path, params: SamplingParams) -> None:
    engine = _engine(stories260k_path, True)
    events = _launch_order(engine)
    got = _run(engine, [params])
    if params.prompt_logprobs is None:
        assert set(events[::2]) == {"launch"} and set(events[1::2]) == {"wait"}
    assert got == _run(_engine(stories260k_path, False), [params])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.5),
    SamplingParams(
        temperature=0.0, max_tokens=12, frequency_penalty=1.0, min_tokens=6),
])
def test_penalties_and_min_tokens_run_ahead(stories260k_path: Path,
                                            params: SamplingParams) -> None:
    """Their counts advance on the device: the next step launches before
    the tokens arrive, with the outputs of one step at a time."""
    engine = _engine(stories260k_path, True)
    events = _launch_order(engine)
    got = _run(engine, [params] * 2)
    assert events[:4] == ["launch", "launch", "wait", "launch"]
    assert got == _run(_engine(stories260k_path, False), [params] * 2)


def test_abort_while_a_step_is_in_flight(stories260k_path: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    solo = _run(_engine(stories260k_path, False), [params])["0"]
    engine = _engine(stories260k_path, True)
    engine.add_request("0", PROMPTS[0], params)
    engine.add_request("1", PROMPTS[1], params)
    finals = {}
    for _ in range(4):
        engine.step()
    engine.abort_request("1")
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "0"
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    assert finals["0"] == solo[0][0]


def test_delta_outputs_add_up(stories260k_path: Path) -> None:
    params = SamplingParams(temperature=0.0,
                            max_tokens=30,
                            stop=["."],
                            output_kind=RequestOutputKind.DELTA)
    engine = _engine(stories260k_path, True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    text = {str(i): "" for i in range(len(PROMPTS))}
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            text[out.request_id] += out.outputs[0].text
            tokens[out.request_id] += out.outputs[0].token_ids
    final = params.clone()
    final.output_kind = RequestOutputKind.FINAL_ONLY
    expected = _run(_engine(stories260k_path, False), [final] * len(PROMPTS))
    for i in range(len(PROMPTS)):
        assert (tokens[str(i)], text[str(i)]) == expected[str(i)][0][:2]


def test_stats_count_only_the_tokens_kept(stories260k_path: Path) -> None:
    """The row a stopped sequence computed once more is not a generated
    token in the engine's statistics."""
    engine = _engine(stories260k_path, True)
    assert engine.stat_logger is not None
    counted = []
    record = engine.stat_logger.record_step

    def counting(num_prompt_tokens: int, num_generation_tokens: int) -> None:
        counted.append(num_generation_tokens)
        record(num_prompt_tokens, num_generation_tokens)

    engine.stat_logger.record_step = counting  # type: ignore[method-assign]
    results = _run(engine, MIXED)
    assert sum(counted) == sum(
        len(c[0]) for completions in results.values() for c in completions)
