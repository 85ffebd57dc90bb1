"""POST /v1/completions: one engine request per prompt, ``n`` samples each
through SamplingParams.n; choice ``i * n + j`` is sample j of prompt i."""
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from vllm.engine.llm_engine import PromptType, TokensPrompt
from vllm.entrypoints.openai.protocol import (
    CompletionLogProbs, CompletionRequest, CompletionResponse,
    CompletionResponseChoice, CompletionStreamResponse, UsageInfo, random_id)
from vllm.entrypoints.openai.serving_engine import (
    SSE_DONE, OpenAIServing, OpenAIServingError, bad_request, clamp_logprob,
    error_body, merge_async_iterators, sse, token_text, top_entries)
from vllm.outputs import CompletionOutput, Logprob, RequestOutput


class OpenAIServingCompletion(OpenAIServing):

    async def create_completion(
            self, request: CompletionRequest
    ) -> CompletionResponse | AsyncIterator[str]:
        """The response, or (``stream``) an iterator of SSE events. Bad
        input raises OpenAIServingError before anything is streamed."""
        self.check_model(request.model)
        try:
            params = request.to_sampling_params(self.default_sampling)
        except ValueError as err:
            raise bad_request(err, request) from err
        prompts = self._prompts(request)
        request_id = random_id("cmpl")
        created = int(time.time())
        stream = merge_async_iterators(*[
            self.engine.generate(
                prompt, params, f"{request_id}-{i}", priority=request.priority)
            for i, prompt in enumerate(prompts)
        ])
        if request.stream:
            # The first output, so that a bad prompt is still an HTTP 400.
            try:
                first = await stream.__anext__()
            except ValueError as err:
                raise bad_request(err, request) from err
            except StopAsyncIteration:
                first = None
            return self._stream(request, stream, first, request_id, created,
                                len(prompts))
        finals: list[RequestOutput | None] = [None] * len(prompts)
        try:
            async for index, output in stream:
                finals[index] = output
        except ValueError as err:
            raise bad_request(err, request) from err
        return self._response(request, finals, request_id, created)

    def _prompts(self, request: CompletionRequest) -> list[PromptType]:
        prompt = request.prompt
        if not prompt:
            raise OpenAIServingError("prompt must not be empty.", 400, "prompt")
        items: Sequence[Any]
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = prompt
        prompts: list[PromptType] = []
        for item in items:
            if isinstance(item, str):
                if request.add_special_tokens:
                    prompts.append(item)
                else:
                    ids = self.tokenizer().encode(item,
                                                  add_special_tokens=False)
                    prompts.append(
                        TokensPrompt(prompt_token_ids=ids, prompt=item))
            else:
                prompts.append(TokensPrompt(prompt_token_ids=list(item)))
        return prompts

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return str(self.tokenizer().decode(output.prompt_token_ids))

    def _logprobs(self, completion: CompletionOutput, num: int,
                  offset: int) -> CompletionLogProbs:
        """OpenAI's completions logprobs of ``completion``'s tokens, whose
        text starts at character ``offset`` of the choice's text."""
        tokenizer = self._tokenizer
        result = CompletionLogProbs()
        for token_id, step in zip(completion.token_ids, completion.logprobs
                                  or []):
            sampled: Logprob | None = step.get(token_id)
            token = token_text(token_id, sampled, tokenizer)
            result.tokens.append(token)
            result.token_logprobs.append(
                clamp_logprob(sampled.logprob) if sampled else None)
            top = {
                token_text(tid, lp, tokenizer): clamp_logprob(lp.logprob)
                for tid, lp in top_entries(step, num)
            }
            if sampled is not None:
                top.setdefault(token, clamp_logprob(sampled.logprob))
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def _response(self, request: CompletionRequest,
                  finals: list[RequestOutput | None], request_id: str,
                  created: int) -> CompletionResponse:
        choices = []
        usage = UsageInfo()
        for i, output in enumerate(finals):
            assert output is not None, "a request ended without output"
            usage.prompt_tokens += len(output.prompt_token_ids)
            prefix = self._prompt_text(output) if request.echo else ""
            for completion in output.outputs:
                usage.completion_tokens += len(completion.token_ids)
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs(completion, request.logprobs,
                                              len(prefix))
                choices.append(
                    CompletionResponseChoice(
                        index=i * request.n + completion.index,
                        text=prefix + completion.text,
                        logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=request_id,
                                  created=created,
                                  model=self.model_name,
                                  choices=choices,
                                  usage=usage)

    async def _stream(self, request: CompletionRequest,
                      stream: AsyncIterator[tuple[int, RequestOutput]],
                      first: tuple[int, RequestOutput] | None, request_id: str,
                      created: int, num_prompts: int) -> AsyncIterator[str]:
        n = request.n
        offsets = [0] * (num_prompts * n)  # characters sent per choice
        finished: set[int] = set()
        prompt_seen: set[int] = set()
        usage = UsageInfo()

        async def outputs() -> AsyncIterator[tuple[int, RequestOutput]]:
            if first is not None:
                yield first
            async for item in stream:
                yield item

        try:
            async for i, output in outputs():
                if i not in prompt_seen:
                    prompt_seen.add(i)
                    usage.prompt_tokens += len(output.prompt_token_ids)
                for completion in output.outputs:
                    index = i * n + completion.index
                    if index in finished:
                        continue
                    text = completion.text
                    if request.echo and offsets[index] == 0:
                        text = self._prompt_text(output) + text
                    if (not text and not completion.token_ids
                            and completion.finish_reason is None):
                        continue
                    usage.completion_tokens += len(completion.token_ids)
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self._logprobs(completion, request.logprobs,
                                                  offsets[index])
                    offsets[index] += len(text)
                    if completion.finish_reason is not None:
                        finished.add(index)
                    yield sse(
                        CompletionStreamResponse(
                            id=request_id,
                            created=created,
                            model=self.model_name,
                            choices=[
                                CompletionResponseChoice(
                                    index=index,
                                    text=text,
                                    logprobs=logprobs,
                                    finish_reason=completion.finish_reason,
                                    stop_reason=completion.stop_reason)
                            ]))
            if request.include_usage:
                usage.total_tokens = (usage.prompt_tokens +
                                      usage.completion_tokens)
                yield sse(
                    CompletionStreamResponse(id=request_id,
                                             created=created,
                                             model=self.model_name,
                                             choices=[],
                                             usage=usage))
        except ValueError as err:
            yield sse(error_body(str(err), 400))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE
