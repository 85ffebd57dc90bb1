"""Scheduling and KV-memory features end to end on stories260K (greedy): every
constrained configuration gives the outputs of an unconstrained run."""
from pathlib import Path

import pytest

from vllm import LLM, EngineArgs, LLMEngine, SamplingParams

PROMPTS = [
    "Once upon a time", "Once upon a time, there was a little dog",
    "Once upon a time, there was a little girl named Lily. She",
    "The sun was shining", "Lily and Tom went to the park to play",
    "Once upon a time, there was a big red ball"
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _generate(path: Path, **kwargs) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", max_model_len=128, **kwargs)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(stories260k_path: Path) -> list[list[int]]:
    return _generate(stories260k_path)


@pytest.mark.parametrize("kwargs", [
    dict(enable_prefix_caching=True, block_size=8),
    dict(num_gpu_blocks_override=24, block_size=8),
    dict(num_gpu_blocks_override=24, block_size=8, preemption_mode="swap"),
    dict(num_gpu_blocks_override=24, block_size=8, enable_prefix_caching=True),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4),
    dict(enable_chunked_prefill=False,
         max_num_batched_tokens=128,
         max_num_seqs=2),
    dict(enable_chunked_prefill=True,
         max_num_batched_tokens=16,
         max_num_seqs=4,
         enable_prefix_caching=True,
         block_size=8),
    dict(num_gpu_blocks_override=24, block_size=8, block_allocator="smart"),
    dict(num_gpu_blocks_override=24, block_size=8,
         scheduling_policy="priority"),
],
                         ids=lambda kw: ",".join(f"{k}={v}"
                                                 for k, v in kw.items()))
def test_constrained_runs_match_unconstrained(stories260k_path: Path,
                                              reference: list[list[int]],
                                              kwargs: dict) -> None:
    assert _generate(stories260k_path, **kwargs) == reference


def test_prefix_cache_hits_are_reported_and_resettable(
        stories260k_path: Path) -> None:
    llm = LLM(str(stories260k_path),
              device="cpu",
              enable_prefix_caching=True,
              block_size=8)
    first = llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    again = llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 8 * (
        (len(again.prompt_token_ids) - 1) // 8)
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.reset_prefix_cache()
    fresh = llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0


def test_late_high_priority_request_finishes_first(
        stories260k_path: Path) -> None:
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(stories260k_path),
                   device="cpu",
                   scheduling_policy="priority",
                   max_num_seqs=1))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"low{i}", PROMPTS[i], params, priority=10)
    engine.step()
    engine.add_request("urgent", PROMPTS[4], params, priority=0)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order[0] == "urgent"
    assert set(order) == {"urgent", "low0", "low1", "low2", "low3"}


def test_priority_needs_priority_policy(stories260k_path: Path) -> None:
    llm = LLM(str(stories260k_path), device="cpu")
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        llm.generate(["a", "b"], GREEDY, priority=[0, 1], use_tqdm=False)
    prio = LLM(str(stories260k_path),
               device="cpu",
               scheduling_policy="priority")
    outs = prio.generate(PROMPTS[:2], GREEDY, priority=[1, 0], use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS[:2]


def test_abort_swapped_request_frees_cpu_blocks(stories260k_path: Path) -> None:
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(stories260k_path),
                   device="cpu",
                   max_model_len=128,
                   num_gpu_blocks_override=16,
                   block_size=8,
                   preemption_mode="swap"))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    while not engine.scheduler.swapped:
        engine.step()
    victim = engine.scheduler.swapped[0].request_id
    engine.abort_request(victim)
    while engine.has_unfinished_requests():
        engine.step()
    bm = engine.scheduler.block_manager
    assert bm.get_num_free_gpu_blocks() == 16
    assert bm.cpu_allocator.num_free_blocks == bm.cpu_allocator.num_blocks
