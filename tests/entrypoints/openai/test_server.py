"""The OpenAI-compatible server on stories260K, through its ASGI app (no
socket): what an OpenAI client sees, and the `vllm serve` command line."""
import argparse
import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# The server's own dependencies (requirements.txt): a machine set up for the
# GPU kernels alone may lack them (the modules importing this one skip too).
pytest.importorskip("fastapi", reason="fastapi is not installed")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.engine.async_llm_engine import AsyncLLMEngine  # noqa: E402
from vllm.entrypoints.cli.main import parse_args  # noqa: E402
from vllm.entrypoints.openai.api_server import (  # noqa: E402
    _host_port, build_app)

PROMPT = "Once upon a time"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>: "
            "{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>:{% endif %}")


def server_args(model: Path, **kwargs: Any) -> argparse.Namespace:
    values = dict(model=str(model),
                  served_model_name=None,
                  api_key=None,
                  chat_template=None)
    values.update(kwargs)
    return argparse.Namespace(**values)


@pytest.fixture(scope="module")
def engine(stories260k_path: Path) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=str(stories260k_path),
                   device="cpu",
                   disable_log_stats=True))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def app(engine: AsyncLLMEngine, stories260k_path: Path) -> Any:
    return build_app(engine, server_args(stories260k_path))


def call(app: Any,
         method: str,
         url: str,
         *,
         headers: dict[str, str] | None = None,
         **kwargs: Any) -> httpx.Response:
    """One request to the app, in a fresh event loop."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport,
                                     base_url="http://test") as client:
            return await client.request(method, url, headers=headers, **kwargs)

    return asyncio.run(go())


def events(response: httpx.Response) -> list[str]:
    """The data lines of a server-sent-event body."""
    assert response.text.endswith("data: [DONE]\n\n")
    return [
        chunk[len("data: "):] for chunk in response.text.split("\n\n") if chunk
    ]


def greedy(model: Path, prompt: str, max_tokens: int) -> str:
    llm = LLM(str(model), device="cpu")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text


def test_models_lists_the_served_model(app: Any,
                                       stories260k_path: Path) -> None:
    body = call(app, "GET", "/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [str(stories260k_path)]
    assert body["data"][0]["max_model_len"] == 512


def test_greedy_completion_matches_llm_generate(app: Any,
                                                stories260k_path: Path) -> None:
    expected = greedy(stories260k_path, PROMPT, 12)
    response = call(app,
                    "POST",
                    "/v1/completions",
                    json={
                        "model": str(stories260k_path),
                        "prompt": PROMPT,
                        "max_tokens": 12,
                        "temperature": 0
                    })
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "length"
    # "<s> Once upon a time": BOS + 4 tokens.
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 12,
        "total_tokens": 17
    }

    # streamed: the deltas add up to the same text, usage comes last
    response = call(app,
                    "POST",
                    "/v1/completions",
                    json={
                        "prompt": PROMPT,
                        "max_tokens": 12,
                        "temperature": 0,
                        "stream": True,
                        "stream_options": {
                            "include_usage": True
                        }
                    })
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(data) for data in events(response)[:-1]]
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert len({c["id"] for c in chunks}) == 1


def test_n_prompts_and_logprobs(app: Any) -> None:
    body = call(app,
                "POST",
                "/v1/completions",
                json={
                    "prompt": [PROMPT, "Lily"],
                    "n": 2,
                    "max_tokens": 4,
                    "temperature": 1.0,
                    "seed": 0,
                    "logprobs": 3,
                }).json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 16
    for choice in choices:
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == 4
        assert len(logprobs["token_logprobs"]) == 4
        assert len(logprobs["text_offset"]) == 4
        for token, value, top in zip(logprobs["tokens"],
                                     logprobs["token_logprobs"],
                                     logprobs["top_logprobs"]):
            assert value <= 0
            assert 3 <= len(top) <= 4 and top[token] == value
    # token ids as the prompt
    ids = call(app, "POST", "/tokenize", json={"prompt": PROMPT}).json()
    body = call(app,
                "POST",
                "/v1/completions",
                json={
                    "prompt": ids["tokens"],
                    "max_tokens": 3,
                    "temperature": 0
                }).json()
    assert body["usage"]["prompt_tokens"] == ids["count"] == 5


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({
            "prompt": PROMPT,
            "temperature": -1
        }, 400, "temperature"),
        ({
            "max_tokens": 3
        }, 400, "prompt"),
        ({
            "prompt": PROMPT,
            "model": "gpt-4"
        }, 404, "gpt-4"),
        ({
            "prompt": PROMPT,
            "max_tokens": "many"
        }, 400, "max_tokens"),
        ({
            "prompt": "x " * 600
        }, 400, "maximum model length"),
        ({
            "prompt": PROMPT,
            "priority": 3
        }, 400, "Priority scheduling is not enabled"),
    ],
)
def test_bad_requests_get_openai_errors(app: Any, body: dict, status: int,
                                        fragment: str) -> None:
    for stream in (False, True):
        response = call(app,
                        "POST",
                        "/v1/completions",
                        json={
                            **body, "stream": stream
                        })
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert fragment in error["message"]
        assert error["code"] == status
        assert set(error) == {"message", "type", "param", "code"}
    if fragment == "temperature":
        assert error["param"] == "temperature"


def test_malformed_json_is_400(app: Any) -> None:
    response = call(app,
                    "POST",
                    "/v1/completions",
                    content=b'{"prompt": "x",',
                    headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "Malformed JSON" in response.json()["error"]["message"]


def test_client_disconnect_aborts_the_request(
        app: Any, engine: AsyncLLMEngine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    aborted: list[str] = []
    abort_request = engine.engine.abort_request

    def spy(request_id: Any) -> None:
        aborted.append(request_id)
        abort_request(request_id)

    monkeypatch.setattr(engine.engine, "abort_request", spy)
    body = json.dumps({
        "prompt": PROMPT,
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True
    }).encode()
    scope = {
        "type": "http",
        "asgi": {
            "version": "3.0"
        },
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }

    async def go() -> list[bytes]:
        sent: list[bytes] = []
        first_chunk = asyncio.Event()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {
                    "type": "http.request",
                    "body": body,
                    "more_body": False
                }
            await first_chunk.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                sent.append(message["body"])
                first_chunk.set()

        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        return sent

    sent = asyncio.run(go())
    assert sent and not any(b"[DONE]" in chunk for chunk in sent)
    deadline = time.monotonic() + 10
    while not aborted:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.01)
    assert aborted[0].startswith("cmpl-")


def test_chat_without_template_is_a_clear_400(app: Any) -> None:
    response = call(app,
                    "POST",
                    "/v1/chat/completions",
                    json={"messages": [{
                        "role": "user",
                        "content": "hi"
                    }]})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "no chat template" in message and "--chat-template" in message


def test_chat_with_chat_template(engine: AsyncLLMEngine, stories260k_path: Path,
                                 tmp_path: Path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    app = build_app(
        engine,
        server_args(stories260k_path,
                    chat_template=str(path),
                    served_model_name=["stories"]))
    messages = [{"role": "user", "content": "Tell me a story."}]
    llm = LLM(str(stories260k_path), device="cpu")
    expected = llm.chat(messages,
                        SamplingParams(temperature=0, max_tokens=8),
                        use_tqdm=False,
                        chat_template=TEMPLATE)[0]
    assert expected.prompt == "<s><user>: Tell me a story.\n<assistant>:"
    tokens = call(app, "POST", "/tokenize", json={
        "messages": messages
    }).json()["tokens"]
    assert tokens == expected.prompt_token_ids

    body = call(app,
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "stories",
                    "messages": messages,
                    "max_tokens": 8,
                    "temperature": 0,
                    "logprobs": True,
                    "top_logprobs": 2
                }).json()
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "stories"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": expected.outputs[0].text
    }
    assert body["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)
    content = choice["logprobs"]["content"]
    assert len(content) == 8
    assert all(len(entry["top_logprobs"]) == 2 for entry in content)

    response = call(app,
                    "POST",
                    "/v1/chat/completions",
                    json={
                        "model": "stories",
                        "messages": messages,
                        "max_tokens": 8,
                        "temperature": 0,
                        "stream": True
                    })
    chunks = [json.loads(data) for data in events(response)[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks) == expected.outputs[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # the path is not a served name any more
    assert call(app,
                "POST",
                "/v1/completions",
                json={
                    "model": str(stories260k_path),
                    "prompt": PROMPT
                }).status_code == 404


def test_api_key(engine: AsyncLLMEngine, stories260k_path: Path) -> None:
    app = build_app(engine, server_args(stories260k_path, api_key="secret"))
    assert call(app, "GET", "/v1/models").status_code == 401
    assert call(app,
                "GET",
                "/v1/models",
                headers={
                    "Authorization": "Bearer wrong"
                }).status_code == 401
    assert call(app,
                "GET",
                "/v1/models",
                headers={
                    "Authorization": "Bearer secret"
                }).status_code == 200
    assert call(app, "GET", "/health").status_code == 200


def test_health_version_tokenize(app: Any) -> None:
    assert call(app, "GET", "/health").status_code == 200
    assert call(app, "GET", "/ping").status_code == 200
    assert call(app, "GET", "/version").json()["version"]
    tokens = call(app, "POST", "/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 5
    assert tokens["max_model_len"] == 512
    text = call(app, "POST", "/detokenize", json={
        "tokens": tokens["tokens"]
    }).json()["prompt"]
    assert text.endswith(PROMPT)
    without = call(app,
                   "POST",
                   "/tokenize",
                   json={
                       "prompt": PROMPT,
                       "add_special_tokens": False
                   }).json()
    assert without["tokens"] == tokens["tokens"][1:]


def test_unhealthy_engine_is_503(stories260k_path: Path) -> None:

    class DeadEngine:
        engine = type(
            "E", (), {
                "model_config": type("M", (), {"max_model_len": 8})(),
                "tokenizer": None,
                "generation_config": {}
            })()

        async def check_health(self) -> None:
            raise RuntimeError("engine loop died")

    app = build_app(DeadEngine(), server_args(stories260k_path))
    response = call(app, "GET", "/health")
    assert response.status_code == 503
    assert "engine loop died" in response.json()["error"]["message"]


def test_vllm_serve_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse_args([
        "serve", "/models/m", "--max-model-len", "128", "--port", "9000",
        "--enforce-eager", "--served-model-name", "m1", "m2"
    ])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.model == "/models/m"
    assert engine_args.max_model_len == 128
    assert engine_args.enforce_eager is True
    assert engine_args.dtype == "auto" and engine_args.block_size == 16
    assert args.served_model_name == ["m1", "m2"]
    assert _host_port(args) == ("0.0.0.0", 9000)
    monkeypatch.setenv("VLLM_PORT", "8123")
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    args = parse_args(["serve", "--model", "/models/m"])
    assert args.model == "/models/m"
    assert _host_port(args) == ("127.0.0.1", 8123)
    with pytest.raises(SystemExit):
        parse_args(["serve"])
