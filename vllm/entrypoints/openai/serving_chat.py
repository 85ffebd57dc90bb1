"""POST /v1/chat/completions: the conversation rendered by the chat template
(the server's ``--chat-template``, else the tokenizer's) into one engine
request with ``n`` samples."""
import time
from collections.abc import AsyncIterator
from typing import Any

from vllm.engine.llm_engine import TokensPrompt
from vllm.entrypoints.openai.protocol import (
    ChatCompletionLogProb, ChatCompletionLogProbs,
    ChatCompletionLogProbsContent, ChatCompletionRequest,
    ChatCompletionResponse, ChatCompletionResponseChoice,
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatMessage,
    DeltaMessage, UsageInfo, random_id)
from vllm.entrypoints.openai.serving_engine import (SSE_DONE, OpenAIServing,
                                                    OpenAIServingError,
                                                    bad_request, clamp_logprob,
                                                    error_body, sse, token_text,
                                                    top_entries)
from vllm.outputs import CompletionOutput, RequestOutput

NO_TEMPLATE_MESSAGE = (
    "This model's tokenizer has no chat template, so chat completions "
    "cannot be rendered. Start the server with --chat-template PATH (a Jinja "
    "template file), or use /v1/completions.")


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's path, or the template itself."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        if "{" in value:
            return value  # an inline Jinja template
        raise ValueError(
            f"--chat-template {value!r} is neither a readable "
            f"file ({err.strerror}) nor a Jinja template.") from err


def _text_content(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose content parts (OpenAI's list form) are joined into
    one string; only text parts are supported."""
    if "role" not in message:
        raise OpenAIServingError("Each message needs a 'role'.", 400,
                                 "messages")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else part
                raise OpenAIServingError(
                    f"Content part {kind!r} is not supported: only text "
                    "parts are.", 400, "messages")
            texts.append(str(part.get("text", "")))
        message = {**message, "content": "\n".join(texts)}
    return message


def _logprob(token: str, logprob: float) -> ChatCompletionLogProb:
    return ChatCompletionLogProb(token=token,
                                 logprob=clamp_logprob(logprob),
                                 bytes=list(token.encode("utf-8")))


class OpenAIServingChat(OpenAIServing):

    def __init__(self,
                 engine: Any,
                 served_model_names: list[str],
                 chat_template: str | None = None) -> None:
        super().__init__(engine, served_model_names)
        self.chat_template = chat_template

    def render(
            self,
            messages: list[dict[str, Any]],
            add_generation_prompt: bool = True,
            continue_final_message: bool = False,
            chat_template_kwargs: dict[str, Any] | None = None) -> TokensPrompt:
        """The conversation as the template writes it, and its token ids
        (the template writes the special tokens itself)."""
        tokenizer = self.tokenizer()
        template = self.chat_template
        if template is None and getattr(tokenizer, "chat_template",
                                        None) is None:
            raise OpenAIServingError(NO_TEMPLATE_MESSAGE, 400)
        conversation = [_text_content(m) for m in messages]
        try:
            text = tokenizer.apply_chat_template(
                conversation,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}))
        except Exception as err:  # jinja2 errors, ValueError, TypeError
            raise OpenAIServingError(
                f"Cannot render the conversation with the chat template: "
                f"{err}", 400, "messages") from err
        ids = tokenizer.encode(str(text), add_special_tokens=False)
        return TokensPrompt(prompt_token_ids=ids, prompt=str(text))

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(request.model)
        if request.chat_template is not None:
            raise OpenAIServingError(
                "chat_template in the request is not supported; start the "
                "server with --chat-template.", 400, "chat_template")
        try:
            params = request.to_sampling_params(self.default_sampling)
        except ValueError as err:
            raise bad_request(err, request) from err
        prompt = self.render(request.messages, request.add_generation_prompt,
                             request.continue_final_message,
                             request.chat_template_kwargs)
        request_id = random_id("chatcmpl")
        created = int(time.time())
        results = self.engine.generate(prompt,
                                       params,
                                       request_id,
                                       priority=request.priority)
        if request.stream:
            try:
                first = await results.__anext__()
            except ValueError as err:
                raise bad_request(err, request) from err
            except StopAsyncIteration:
                first = None
            return self._stream(request, results, first, request_id, created)
        final: RequestOutput | None = None
        try:
            async for output in results:
                final = output
        except ValueError as err:
            raise bad_request(err, request) from err
        assert final is not None, "the request ended without output"
        return self._response(request, final, request_id, created)

    def _logprobs(self, completion: CompletionOutput,
                  num: int) -> ChatCompletionLogProbs:
        tokenizer = self._tokenizer
        content = []
        for token_id, step in zip(completion.token_ids, completion.logprobs
                                  or []):
            sampled = step.get(token_id)
            token = token_text(token_id, sampled, tokenizer)
            content.append(
                ChatCompletionLogProbsContent(
                    token=token,
                    logprob=clamp_logprob(sampled.logprob)
                    if sampled else -9999.0,
                    bytes=list(token.encode("utf-8")),
                    top_logprobs=[
                        _logprob(token_text(tid, lp, tokenizer), lp.logprob)
                        for tid, lp in top_entries(step, num)
                    ]))
        return ChatCompletionLogProbs(content=content)

    def _choice_logprobs(
            self, request: ChatCompletionRequest,
            completion: CompletionOutput) -> ChatCompletionLogProbs | None:
        if not request.logprobs:
            return None
        return self._logprobs(completion, request.top_logprobs or 0)

    def _response(self, request: ChatCompletionRequest, output: RequestOutput,
                  request_id: str, created: int) -> ChatCompletionResponse:
        choices = []
        completion_tokens = 0
        for completion in output.outputs:
            completion_tokens += len(completion.token_ids)
            choices.append(
                ChatCompletionResponseChoice(
                    index=completion.index,
                    message=ChatMessage(role="assistant",
                                        content=completion.text),
                    logprobs=self._choice_logprobs(request, completion),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason))
        prompt_tokens = len(output.prompt_token_ids)
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=UsageInfo(prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens))

    async def _stream(self, request: ChatCompletionRequest,
                      results: AsyncIterator[RequestOutput],
                      first: RequestOutput | None, request_id: str,
                      created: int) -> AsyncIterator[str]:

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse(
                ChatCompletionStreamResponse(id=request_id,
                                             created=created,
                                             model=self.model_name,
                                             choices=[choice]))

        for index in range(request.n):
            yield chunk(
                ChatCompletionStreamChoice(index=index,
                                           delta=DeltaMessage(role="assistant",
                                                              content="")))

        async def outputs() -> AsyncIterator[RequestOutput]:
            if first is not None:
                yield first
            async for item in results:
                yield item

        finished: set[int] = set()
        prompt_tokens = completion_tokens = 0
        try:
            async for output in outputs():
                prompt_tokens = len(output.prompt_token_ids)
                for completion in output.outputs:
                    if completion.index in finished:
                        continue
                    if (not completion.text and not completion.token_ids
                            and completion.finish_reason is None):
                        continue
                    completion_tokens += len(completion.token_ids)
                    if completion.finish_reason is not None:
                        finished.add(completion.index)
                    yield chunk(
                        ChatCompletionStreamChoice(
                            index=completion.index,
                            delta=DeltaMessage(content=completion.text),
                            logprobs=self._choice_logprobs(request, completion),
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason))
            if request.include_usage:
                yield sse(
                    ChatCompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=self.model_name,
                        choices=[],
                        usage=UsageInfo(prompt_tokens=prompt_tokens,
                                        completion_tokens=completion_tokens,
                                        total_tokens=prompt_tokens +
                                        completion_tokens)))
        except ValueError as err:
            yield sse(error_body(str(err), 400))
        finally:
            close = getattr(results, "aclose", None)
            if close is not None:
                await close()
        yield SSE_DONE
