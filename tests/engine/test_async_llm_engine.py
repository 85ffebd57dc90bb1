"""AsyncLLMEngine on stories260K: streaming from the engine thread, output
kinds, rejected requests, early exit (abort), engine failure, shutdown."""
import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.test_llm_engine import PROMPTS
from vllm import LLM, AsyncLLMEngine, EngineArgs, RequestOutput, SamplingParams
from vllm.engine.async_llm_engine import EngineDeadError
from vllm.sampling_params import RequestOutputKind

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _async_engine(path: Path) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_engine_args(
        EngineArgs(model=str(path), device="cpu", disable_log_stats=True))


@pytest.fixture(scope="module")
def engine(stories260k_path: Path) -> Iterator[AsyncLLMEngine]:
    async_engine = _async_engine(stories260k_path)
    yield async_engine
    async_engine.shutdown()


def _engine_is_clean(engine: AsyncLLMEngine) -> bool:
    """No request left and every block free (read while the engine thread
    is idle: after the last request's final output)."""
    inner = engine.engine
    allocator = inner.scheduler.block_manager.allocator
    return (not inner.has_unfinished_requests() and not inner.seq_groups
            and allocator.num_free_blocks == allocator.num_blocks)


async def _collect(engine: AsyncLLMEngine, prompt: str, params: SamplingParams,
                   request_id: str) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, request_id)]


def test_concurrent_greedy_matches_llm(stories260k_path: Path,
                                       engine: AsyncLLMEngine) -> None:
    expected = [
        out.outputs[0].token_ids
        for out in LLM(str(stories260k_path), device="cpu").generate(
            PROMPTS, GREEDY, use_tqdm=False)
    ]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(_collect(engine, p, GREEDY, f"g{i}")
                                      for i, p in enumerate(PROMPTS)))

    streams = asyncio.run(main())
    for outputs, tokens in zip(streams, expected):
        # CUMULATIVE (the default): every output holds all tokens so far;
        # only the last one is finished.
        assert [o.finished for o in outputs][-1] is True
        assert not any(o.finished for o in outputs[:-1])
        assert outputs[-1].outputs[0].token_ids == tokens
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == sorted(lengths)
    assert _engine_is_clean(engine)


def test_delta_outputs_concatenate_to_full_text(engine: AsyncLLMEngine) -> None:
    delta = GREEDY.clone()
    delta.output_kind = RequestOutputKind.DELTA
    final = GREEDY.clone()
    final.output_kind = RequestOutputKind.FINAL_ONLY

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        return await asyncio.gather(_collect(engine, PROMPTS[1], delta, "d"),
                                    _collect(engine, PROMPTS[1], final, "f"))

    deltas, finals = asyncio.run(main())
    assert len(finals) == 1 and finals[0].finished
    assert len(deltas) > 1 and deltas[-1].finished
    full = finals[0].outputs[0]
    assert "".join(o.outputs[0].text for o in deltas) == full.text
    assert [t for o in deltas for t in o.outputs[0].token_ids] == full.token_ids


def test_rejected_request_raises_while_others_run(
        engine: AsyncLLMEngine) -> None:
    bad = SamplingParams(max_tokens=8, stop_token_ids=[10**6])

    async def main() -> list[RequestOutput]:
        good = asyncio.create_task(_collect(engine, PROMPTS[0], GREEDY, "ok"))
        await asyncio.sleep(0)  # let it be queued first
        rejected = engine.generate(PROMPTS[2], bad, "bad")
        with pytest.raises(ValueError, match="stop_token_ids"):
            await rejected.__anext__()  # raised before anything is yielded
        with pytest.raises(ValueError, match="already in use"):
            await _collect(engine, PROMPTS[3], GREEDY, "ok")  # duplicate id
        return await good

    outputs = asyncio.run(main())
    assert outputs[-1].finished
    assert len(outputs[-1].outputs[0].token_ids) == GREEDY.max_tokens
    assert _engine_is_clean(engine)


def test_leaving_early_aborts_the_request(engine: AsyncLLMEngine) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def consume(request_id: str, started: asyncio.Event) -> None:
        async for _ in engine.generate(PROMPTS[0], long, request_id):
            started.set()

    async def main() -> None:
        # Closing the generator (a consumer that breaks out of its loop).
        stream = engine.generate(PROMPTS[0], long, "closed")
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()
        # Cancelling the consuming task (a client that disconnects).
        started = asyncio.Event()
        task = asyncio.create_task(consume("cancelled", started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The aborts are handled before this request is added (one command
        # queue), so when it finishes the engine is empty.
        outputs = await _collect(engine, PROMPTS[1], GREEDY, "after")
        assert outputs[-1].finished
        # The ids are free again.
        await _collect(engine, PROMPTS[1], GREEDY, "closed")

    asyncio.run(main())
    assert _engine_is_clean(engine)


def test_abort_ends_the_stream(engine: AsyncLLMEngine) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main() -> list[RequestOutput]:
        outputs = []
        async for out in engine.generate(PROMPTS[0], long, "aborted"):
            outputs.append(out)
            if len(outputs) == 2:
                await engine.abort("aborted")
        return outputs

    outputs = asyncio.run(main())
    assert not outputs[-1].finished
    assert len(outputs[-1].outputs[0].token_ids) < long.max_tokens
    asyncio.run(_collect(engine, PROMPTS[1], GREEDY, "next"))
    assert _engine_is_clean(engine)


def test_step_failure_kills_engine_and_shutdown_stops_thread(
        stories260k_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _async_engine(stories260k_path)
    thread = engine._thread
    try:
        asyncio.run(engine.check_health())

        def broken_step() -> list[RequestOutput]:
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine.engine, "step", broken_step)

        async def main() -> None:
            results = await asyncio.gather(*(_collect(engine, p, GREEDY,
                                                      f"r{i}")
                                             for i, p in enumerate(PROMPTS)),
                                           return_exceptions=True)
            assert all(
                isinstance(r, RuntimeError) and str(r) == "device lost"
                for r in results)
            with pytest.raises(EngineDeadError, match="device lost"):
                await engine.check_health()
            with pytest.raises(EngineDeadError):
                await _collect(engine, PROMPTS[0], GREEDY, "later")

        asyncio.run(main())
        assert thread.is_alive()  # dead engine, live loop: it still answers
    finally:
        engine.shutdown()
    assert not thread.is_alive()
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.check_health())
    engine.shutdown()  # idempotent


def test_shutdown_ends_streams_and_thread(engine: AsyncLLMEngine) -> None:
    # Last in this file: it shuts the module's engine down.
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main() -> None:
        stream = engine.generate(PROMPTS[0], long, "running")
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError, match="shut down"):
            await _collect(engine, PROMPTS[0], GREEDY, "too late")

    asyncio.run(main())
    assert not any(t.name == "vllm-engine-loop" and t.is_alive()
                   for t in threading.enumerate())
