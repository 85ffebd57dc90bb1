"""LLMEngine on stories260K: continuous batching, preemption, seeds, bad input."""
import logging
from pathlib import Path

import pytest

from vllm import EngineArgs, LLMEngine, SamplingParams

PROMPTS = [
    "Once upon a time", "Lily and Tom went to the park", "The dog",
    "One day, a little bird", "Sam had a big red ball and he", "The sun"
]


def _engine(path: Path, **kwargs) -> LLMEngine:
    return LLMEngine.from_engine_args(
        EngineArgs(model=str(path), device="cpu", **kwargs))


def _run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    return results


def _alone(path: Path, params: SamplingParams) -> list[list[int]]:
    engine = _engine(path)
    outs = []
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
        outs.append(_run_to_end(engine)[str(i)])
    return outs


GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_requests_joining_mid_decode_match_solo_runs(
        stories260k_path: Path) -> None:
    solo = _alone(stories260k_path, GREEDY)
    engine = _engine(stories260k_path)
    results: dict[str, list[int]] = {}
    for i in range(2):
        engine.add_request(str(i), PROMPTS[i], GREEDY)
    for _ in range(5):  # the first two are decoding when the rest arrive
        engine.step()
    for i in range(2, len(PROMPTS)):
        engine.add_request(str(i), PROMPTS[i], GREEDY)
        engine.step()
    results.update(_run_to_end(engine))
    assert [results[str(i)] for i in range(len(PROMPTS))] == solo


class _Records(logging.Handler):

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("chunked", [True, False])
def test_tiny_cache_preempts_and_gives_same_outputs(stories260k_path: Path,
                                                    chunked: bool) -> None:
    solo = _alone(stories260k_path, GREEDY)
    records = _Records()
    logging.getLogger("vllm.core.scheduler").addHandler(records)
    try:
        # 64 tokens per request at most, cache of 12 blocks x 8 = 96 tokens:
        # six requests cannot all stay resident.
        engine = _engine(stories260k_path,
                         num_gpu_blocks_override=12,
                         block_size=8,
                         max_model_len=96,
                         enable_chunked_prefill=chunked)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        results = _run_to_end(engine)
    finally:
        logging.getLogger("vllm.core.scheduler").removeHandler(records)
    assert engine.scheduler.num_cumulative_preemption > 0
    assert any("preempted" in m for m in records.messages)
    assert [results[str(i)] for i in range(len(PROMPTS))] == solo
    assert engine.scheduler.block_manager.get_num_free_gpu_blocks() == 12


def test_small_token_budget_chunks_prompts_same_outputs(
        stories260k_path: Path) -> None:
    solo = _alone(stories260k_path, GREEDY)
    engine = _engine(stories260k_path, max_num_batched_tokens=8, max_num_seqs=4)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    results = _run_to_end(engine)
    assert [results[str(i)] for i in range(len(PROMPTS))] == solo


def test_seeded_request_is_independent_of_batch(stories260k_path: Path) -> None:
    seeded = SamplingParams(temperature=1.0,
                            seed=1234,
                            max_tokens=30,
                            ignore_eos=True)
    engine = _engine(stories260k_path)
    engine.add_request("alone", PROMPTS[0], seeded)
    alone = _run_to_end(engine)["alone"]

    other = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    engine.add_request("x", PROMPTS[1], other)
    engine.add_request("y", PROMPTS[2], other)
    engine.step()
    engine.add_request("seeded", PROMPTS[0], seeded)
    engine.add_request("z", PROMPTS[3], other)
    assert _run_to_end(engine)["seeded"] == alone


def test_bad_prompts_raise_and_engine_keeps_serving(
        stories260k_path: Path) -> None:
    engine = _engine(stories260k_path, max_model_len=32)
    engine.add_request("good", PROMPTS[0], GREEDY.clone())
    with pytest.raises(ValueError, match="request empty.*is empty"):
        engine.add_request("empty", "", GREEDY)
    with pytest.raises(ValueError,
                       match="request long.*longer than the "
                       "maximum model length of 32"):
        engine.add_request("long", {"prompt_token_ids": [5] * 33}, GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary.*\\[512\\]"):
        engine.add_request("oov", {"prompt_token_ids": [1, 512]}, GREEDY)
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        engine.add_request("prio", PROMPTS[0], GREEDY, priority=1)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", PROMPTS[0], GREEDY)
    results = _run_to_end(engine)
    assert list(results) == ["good"] and len(results["good"]) > 0


def test_abort_mid_decode_frees_everything(stories260k_path: Path) -> None:
    engine = _engine(stories260k_path)
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    engine.step()
    engine.step()
    engine.abort_request("a")
    assert engine.get_num_unfinished_requests() == 1
    results = _run_to_end(engine)
    assert list(results) == ["b"]
    bm = engine.scheduler.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.num_total_gpu_blocks


def test_cache_too_small_for_one_sequence_fails_at_startup(
        stories260k_path: Path) -> None:
    with pytest.raises(ValueError,
                       match="fewer than one sequence of "
                       "max_model_len=512"):
        _engine(stories260k_path, num_gpu_blocks_override=4)
