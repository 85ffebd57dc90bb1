"""n > 1: the samples of a request share its prompt's KV blocks (fork and
copy-on-write) end to end through the engine on stories260K.

What proves the sharing right: every sample's own logprobs equal those of a
clean, unshared recomputation of its tokens; top_k=1 samples equal the greedy
output; seeded samples are the same under preemption (recompute or swap),
prefix caching, priority scheduling and the smart allocator as alone; and the
prompt is computed once (plus its last token per sample)."""
from pathlib import Path

import pytest

from vllm import LLM, EngineArgs, LLMEngine, SamplingParams
from vllm.outputs import RequestOutput

PROMPTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom had a big red ball",
    "The sun was hot and the dog",
]


def _engine(path: Path, **kwargs) -> LLMEngine:
    kwargs.setdefault("max_model_len", 96)
    return LLMEngine.from_engine_args(
        EngineArgs(model=str(path), device="cpu", **kwargs))


def _run(engine: LLMEngine,
         params: SamplingParams,
         prompts: list[str] = PROMPTS) -> list[RequestOutput]:
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return [finished[str(i)] for i in range(len(prompts))]


def _samples(outputs: list[RequestOutput]) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in outputs]


SEEDED = SamplingParams(n=3,
                        temperature=1.0,
                        seed=11,
                        max_tokens=12,
                        ignore_eos=True)


def test_samples_match_an_unshared_recomputation(
        stories260k_path: Path) -> None:
    """If a sample wrote into a block its siblings still read, their
    logprobs would differ from a clean computation of the same tokens."""
    llm = LLM(str(stories260k_path),
              device="cpu",
              max_model_len=96,
              block_size=8)
    params = SamplingParams(n=4,
                            temperature=1.0,
                            seed=3,
                            max_tokens=24,
                            ignore_eos=True,
                            logprobs=0)
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    prompt = out.prompt_token_ids
    # the shared last block is partly filled when the samples fork
    assert (len(prompt) - 1) % 8 != 0
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    check = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    clean = llm.generate([{
        "prompt_token_ids": prompt + c.token_ids
    } for c in out.outputs],
                         check,
                         use_tqdm=False)
    for completion, reference in zip(out.outputs, clean):
        assert completion.logprobs is not None
        assert reference.prompt_logprobs is not None
        for i, (token, step) in enumerate(
                zip(completion.token_ids, completion.logprobs)):
            entry = reference.prompt_logprobs[len(prompt) + i]
            assert entry is not None
            assert step[token].logprob == pytest.approx(entry[token].logprob,
                                                        abs=1e-4)


def test_top_k_1_samples_equal_the_greedy_output(
        stories260k_path: Path) -> None:
    llm = LLM(str(stories260k_path), device="cpu", max_model_len=96)
    greedy = llm.generate(PROMPTS,
                          SamplingParams(temperature=0, max_tokens=20),
                          use_tqdm=False)
    parallel = llm.generate(PROMPTS,
                            SamplingParams(n=4,
                                           temperature=1.0,
                                           top_k=1,
                                           max_tokens=20),
                            use_tqdm=False)
    for one, many in zip(greedy, parallel):
        assert [c.index for c in many.outputs] == [0, 1, 2, 3]
        assert all(c.token_ids == one.outputs[0].token_ids
                   for c in many.outputs)
        assert all(c.text == one.outputs[0].text for c in many.outputs)


def test_prompt_is_computed_once(stories260k_path: Path) -> None:
    engine = _engine(stories260k_path)
    computed: list[int] = []
    execute = engine.executor.execute_model

    def counting(scheduled, *args):
        computed.append(sum(len(s.token_ids) for s in scheduled))
        return execute(scheduled, *args)

    engine.executor.execute_model = counting  # type: ignore[method-assign]
    n, max_tokens = 4, 10
    out = _run(
        engine,
        SamplingParams(n=n,
                       temperature=1.0,
                       seed=0,
                       max_tokens=max_tokens,
                       ignore_eos=True), PROMPTS[:1])[0]
    prompt_len = len(out.prompt_token_ids)
    # the prompt but its last token once, that token by each sample, then
    # each sample's decodes (its last sampled token is never computed)
    assert sum(computed) == (prompt_len - 1) + n + n * (max_tokens - 1)
    assert computed[:2] == [prompt_len - 1, n]
    assert engine.scheduler.block_manager.get_num_free_gpu_blocks() == \
        engine.executor.num_gpu_blocks


@pytest.fixture(scope="module")
def reference(stories260k_path: Path) -> list[list[list[int]]]:
    """SEEDED's samples of PROMPTS, with plenty of memory."""
    return _samples(_run(_engine(stories260k_path), SEEDED))


def test_seeded_samples_are_reproducible(stories260k_path: Path,
                                         reference: list) -> None:
    assert _samples(_run(_engine(stories260k_path), SEEDED)) == reference
    for samples in reference:
        assert len({tuple(s) for s in samples}) > 1


# A cache of 12 blocks of 8 tokens: three requests of 3 samples cannot all
# stay resident, so groups are preempted after their fork.
TINY = dict(block_size=8, num_gpu_blocks_override=12, max_num_seqs=6)


@pytest.mark.parametrize("engine_kwargs", [
    dict(TINY, preemption_mode="recompute"),
    dict(TINY, preemption_mode="swap", swap_space=0.002),
    dict(TINY, enable_prefix_caching=True),
    dict(TINY, scheduling_policy="priority"),
    dict(TINY, block_allocator="smart"),
    dict(TINY, max_num_batched_tokens=8, enable_chunked_prefill=True),
],
                         ids=[
                             "recompute", "swap", "prefix-caching", "priority",
                             "smart", "chunked-8"
                         ])
def test_same_samples_under_memory_pressure(stories260k_path: Path,
                                            reference: list,
                                            engine_kwargs: dict) -> None:
    engine = _engine(stories260k_path, **engine_kwargs)
    assert _samples(_run(engine, SEEDED)) == reference
    if "max_num_batched_tokens" not in engine_kwargs:
        assert engine.scheduler.num_cumulative_preemption > 0
    assert engine.scheduler.block_manager.get_num_free_gpu_blocks() == 12


def test_prefix_cache_hit_gives_the_same_samples(
        stories260k_path: Path) -> None:
    engine = _engine(stories260k_path, enable_prefix_caching=True, block_size=8)
    first = _run(engine, SEEDED, PROMPTS[:1])[0]
    second = _run(engine, SEEDED, PROMPTS[:1])[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens > 0
    assert _samples([first]) == _samples([second])


def test_abort_frees_the_shared_blocks(stories260k_path: Path) -> None:
    engine = _engine(stories260k_path, block_size=8)
    total = engine.executor.num_gpu_blocks
    engine.add_request("a", PROMPTS[0], SEEDED)
    engine.add_request("b", PROMPTS[1], SEEDED)
    for _ in range(3):  # both have forked and are decoding
        engine.step()
    group = engine.seq_groups["a"]
    assert not group.fork_pending
    shared = group.seqs[0].block_table[0]
    assert engine.scheduler.block_manager.allocator.ref_count(shared) == 3
    engine.abort_request("a")
    outputs = _run(engine, SEEDED, [])
    assert outputs == []
    assert engine.scheduler.block_manager.get_num_free_gpu_blocks() == total
