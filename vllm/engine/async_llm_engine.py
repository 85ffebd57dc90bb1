"""AsyncLLMEngine: the asyncio front of LLMEngine, for the OpenAI server.

    generate() --_Add--> command queue --> engine thread: add_request, step()
        ^                                       |
        +-- request's asyncio.Queue <-----------+ loop.call_soon_threadsafe

LLMEngine is not thread-safe, so one background thread owns it from the end
of construction on: every call into it (validation, step, abort) happens
there. Coroutines only talk to that thread through a thread-safe command
queue, and it answers each request through the request's asyncio.Queue.
"""
import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine, PromptType
from vllm.engine.metrics import MetricsSnapshot
from vllm.logger import init_logger
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams
from vllm.transformers_utils.tokenizer import AnyTokenizer

logger = init_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed (or was shut down) and serves no more requests."""


# What a request's queue receives: its outputs, an error to raise from
# generate(), or _ABORTED when abort() ended it from outside.
_ABORTED = object()
_Item = RequestOutput | BaseException | object


@dataclass(eq=False)
class _Stream:
    """Where the engine thread sends one request's outputs."""
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[_Item]" = field(default_factory=asyncio.Queue)


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    priority: int
    stream: _Stream


@dataclass
class _Abort:
    request_id: str
    # Abort only while this stream owns the id (None: whichever does), so a
    # late abort never hits a newer request that reused the id.
    stream: _Stream | None


_Command = _Add | _Abort | None  # None: stop the thread


class AsyncLLMEngine:
    """Serves LLMEngine to asyncio code; ``generate`` streams RequestOutputs.

    Outputs are LLMEngine.step()'s own, passed through unchanged, so each
    request's ``output_kind`` (CUMULATIVE, DELTA, FINAL_ONLY) behaves as in
    the engine. A consumer that stops early (closes the generator, or its
    task is cancelled) aborts its request, which frees its blocks.

    Errors: a request the engine rejects (bad prompt or parameters, a
    duplicate id) raises the engine's ValueError from its ``generate``;
    other requests go on. If ``step()`` raises, the engine's state may be
    corrupt, so it is not stepped again: every in-flight request raises that
    error, later ``generate`` calls and ``check_health`` raise
    EngineDeadError. Restart the process (server) to recover.

    The engine keeps its defaults, async scheduling included: step() holds
    its launched-ahead step between calls, and one thread makes them all.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        # Only the engine thread touches _streams or writes _error.
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run,
                                        name="vllm-engine-loop",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_engine_args(engine_args))

    @property
    def engine(self) -> LLMEngine:
        """The wrapped engine: read its configuration; only the engine
        thread may call into it."""
        return self._engine

    def get_tokenizer(self) -> AnyTokenizer:
        return self._engine.get_tokenizer()

    def get_metrics(self) -> MetricsSnapshot | None:
        """A copy of the engine's metrics, taken under the StatLogger's lock
        (safe from any thread); None when stats are off
        (``disable_log_stats``)."""
        stat_logger = self._engine.stat_logger
        return None if stat_logger is None else stat_logger.snapshot()

    # ------------------------------------------------------------- asyncio
    async def generate(self,
                       prompt: PromptType,
                       sampling_params: SamplingParams,
                       request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until the one with ``finished=True``
        (or until ``abort(request_id)``, which ends it without one)."""
        self._check_alive()
        stream = _Stream(asyncio.get_running_loop())
        self._commands.put(
            _Add(request_id, prompt, sampling_params, priority, stream))
        # Whether the engine is done with the request (finished, rejected,
        # aborted): otherwise leaving early must abort it.
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if not isinstance(item, RequestOutput):  # _ABORTED
                    done = True
                    return
                done = item.finished  # before yield: the consumer may stop
                yield item
                if done:
                    return
        finally:
            if not done:
                self._commands.put(_Abort(request_id, stream))

    async def abort(self, request_id: str) -> None:
        """Stop a request; its ``generate`` ends without a finished output.
        An unknown (or already finished) id is ignored."""
        self._commands.put(_Abort(request_id, None))

    async def check_health(self) -> None:
        self._check_alive()

    def shutdown(self) -> None:
        """Stop the engine thread (after its current step); requests still
        running raise EngineDeadError. Idempotent. Call it from the event
        loop's thread (or once no ``generate`` can start): a request sent
        after the thread has stopped would get no answer."""
        if not self._stopped:
            self._stopped = True
            self._commands.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(
                f"The engine loop failed: {self._error!r}") from self._error
        if self._stopped or not self._thread.is_alive():
            raise EngineDeadError("The engine has been shut down.")

    # -------------------------------------------------------- engine thread
    def _run(self) -> None:
        device = self._engine.vllm_config.device_config.device
        if device.type == "cuda":
            # The current CUDA device is per thread (kernels that launch on
            # the current device, e.g. Triton's, need the engine's).
            torch.cuda.set_device(device)
        while True:
            # Block while there is nothing to step: no busy loop when idle.
            idle = (self._error is not None
                    or not self._engine.has_unfinished_requests())
            for command in self._take_commands(block=idle):
                if command is None:
                    self._fail_all(
                        EngineDeadError("The engine has been shut down."))
                    return
                if isinstance(command, _Add):
                    self._add(command)
                else:
                    self._abort(command)
            if self._error is not None or \
                    not self._engine.has_unfinished_requests():
                continue
            try:
                outputs = self._engine.step()
            except Exception as err:
                logger.exception("The engine step failed; the engine stops "
                                 "serving.")
                self._error = err
                self._fail_all(err)
                continue
            self._deliver(outputs)

    def _take_commands(self, block: bool) -> list[_Command]:
        """The waiting commands (at least one when ``block``), in order."""
        commands: list[_Command] = []
        if block:
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, command: _Add) -> None:
        if self._error is not None:
            _send(command.stream,
                  [EngineDeadError(f"The engine loop failed: {self._error!r}")])
            return
        try:
            self._engine.add_request(command.request_id,
                                     command.prompt,
                                     command.params,
                                     priority=command.priority)
        except Exception as err:
            # Rejected: nothing was queued; only this caller hears of it.
            _send(command.stream, [err])
            return
        self._streams[command.request_id] = command.stream

    def _abort(self, command: _Abort) -> None:
        stream = self._streams.get(command.request_id)
        if command.stream is not None and stream is not command.stream:
            return  # that request is over; the id may be someone else's now
        self._streams.pop(command.request_id, None)
        if self._error is None:
            self._engine.abort_request(command.request_id)
        if command.stream is None and stream is not None:
            _send(stream, [_ABORTED])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # One wake-up per event loop per step, not one per output.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream,
                                                            _Item]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its consumer since it was scheduled
            if output.finished:
                del self._streams[output.request_id]
            batches.setdefault(stream.loop, []).append((stream, output))
        for loop, items in batches.items():
            _call_in_loop(loop, items)

    def _fail_all(self, err: BaseException) -> None:
        for stream in self._streams.values():
            _send(stream, [err])
        self._streams.clear()


def _send(stream: _Stream, items: list[_Item]) -> None:
    _call_in_loop(stream.loop, [(stream, item) for item in items])


def _call_in_loop(loop: asyncio.AbstractEventLoop,
                  items: list[tuple[_Stream, _Item]]) -> None:
    """Hand items to their streams' queues in the loop's own thread
    (asyncio.Queue is not thread-safe)."""

    def put_all() -> None:
        for stream, item in items:
            stream.queue.put_nowait(item)

    # RuntimeError: the loop was closed, nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(put_all)
