"""What the completion and chat handlers share: the model-name check, errors
in OpenAI's shape, the generation-config defaults, merging the streams of
several engine requests, logprobs conversion and SSE framing."""
import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from pydantic import BaseModel

from vllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse
from vllm.outputs import Logprob

if TYPE_CHECKING:
    from vllm.engine.async_llm_engine import AsyncLLMEngine

T = TypeVar("T")

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# Generation-config keys the server uses as request defaults.
_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# JSON has no -inf; OpenAI clients expect a number.
_MIN_LOGPROB = -9999.0


class OpenAIServingError(Exception):
    """An error the server answers with ``{"error": {...}}`` and ``status``."""

    def __init__(self,
                 message: str,
                 status: int = 400,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def error_body(message: str,
               status: int,
               param: str | None = None) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorInfo(message=message,
                        type=_ERROR_TYPES.get(status, "BadRequestError"),
                        param=param,
                        code=status)).model_dump()


def bad_request(err: ValueError, request: BaseModel) -> OpenAIServingError:
    """A ValueError from validation as HTTP 400; ``param`` is the request
    field the message starts with, when it starts with one."""
    message = str(err)
    first = message.split(" ", 1)[0].strip(":,.")
    fields = type(request).model_fields
    return OpenAIServingError(message, 400, first if first in fields else None)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    """Base of the route handlers: one engine, the names it is served as."""

    def __init__(self, engine: "AsyncLLMEngine",
                 served_model_names: list[str]) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        llm_engine = engine.engine
        # The server's own copy: the engine thread uses the engine's, and a
        # Rust tokenizer must not be used from two threads at once.
        self._tokenizer = (copy.deepcopy(llm_engine.tokenizer)
                           if llm_engine.tokenizer is not None else None)
        self.max_model_len = llm_engine.model_config.max_model_len
        config = getattr(llm_engine, "generation_config", None) or {}
        self.default_sampling = {
            key: config[key]
            for key in _DEFAULT_KEYS if config.get(key) is not None
        }

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIServingError(f"The model `{model}` does not exist.",
                                     404, "model")

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise OpenAIServingError(
                "The server has no tokenizer (skip_tokenizer_init=True).", 400)
        return self._tokenizer


async def merge_async_iterators(
        *iterators: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    """Items of several iterators as they come, tagged with the iterator's
    index. An error in one is raised here; leaving early (an error, a
    client disconnect, ``aclose()``) closes them all, which aborts their
    engine requests."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((index, item))
        except Exception as err:  # handed to the consumer
            await queue.put((index, err))
            return
        await queue.put((index, done))

    tasks = [
        asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)
    ]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        # Shielded: a cancelled (disconnected) handler must still wait for
        # the requests to be closed and aborted.
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
            for iterator in iterators:
                close = getattr(iterator, "aclose", None)
                if close is not None:
                    await close()


def clamp_logprob(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def token_text(token_id: int, logprob: Logprob | None, tokenizer: Any) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    if tokenizer is None:
        return f"token_id:{token_id}"
    return str(tokenizer.decode([token_id]))


def top_entries(step: dict[int, Logprob],
                num: int) -> list[tuple[int, Logprob]]:
    """The ``num`` most likely entries of one position, best first."""
    ranked = sorted(step.items(),
                    key=lambda item: item[1].rank
                    if item[1].rank is not None else 1 << 30)
    return [(tid, lp) for tid, lp in ranked
            if lp.rank is not None and lp.rank <= num][:num]
