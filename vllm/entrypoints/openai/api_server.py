"""The OpenAI-compatible HTTP server (``vllm serve MODEL``).

Routes: /v1/completions, /v1/chat/completions (both streaming by SSE),
/v1/models, /tokenize, /detokenize, /health, /ping, /version, and /metrics
(Prometheus text format 0.0.4, vLLM's ``vllm:*`` names, see
vllm/engine/metrics.py; empty with --disable-log-stats). Errors use OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input
(malformed JSON, a field of the wrong type, a value SamplingParams or the
engine rejects), 401 without the API key (only /v1/* needs it), 404 for an
unknown model.

Not built yet: /v1/embeddings, /start_profile and /stop_profile.

    python -m vllm.entrypoints.openai.api_server --model PATH [flags]
"""
import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

import vllm
from vllm import envs
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.metrics import CONTENT_TYPE, render_prometheus
from vllm.entrypoints.openai.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
    DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from vllm.entrypoints.openai.serving_chat import (OpenAIServingChat,
                                                  load_chat_template)
from vllm.entrypoints.openai.serving_completion import (OpenAIServingCompletion)
from vllm.entrypoints.openai.serving_engine import (OpenAIServingError,
                                                    error_body)
from vllm.logger import init_logger

logger = init_logger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The server's own flags (the engine's come from EngineArgs)."""
    parser.add_argument("--host",
                        default=None,
                        help="Address to bind; default VLLM_HOST_IP, "
                        "else 0.0.0.0.")
    parser.add_argument("--port",
                        type=int,
                        default=None,
                        help="Port; default VLLM_PORT, else 8000.")
    parser.add_argument("--api-key",
                        default=None,
                        help="Require 'Authorization: Bearer KEY' on /v1/*; "
                        "default VLLM_API_KEY.")
    parser.add_argument("--served-model-name",
                        nargs="+",
                        default=None,
                        help="Model name(s) the API accepts; the first is "
                        "the one reported. Default: --model.")
    parser.add_argument("--chat-template",
                        default=None,
                        help="A Jinja chat template (file path or the "
                        "template itself), used instead of the tokenizer's.")
    parser.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"])


def make_arg_parser(
        parser: argparse.ArgumentParser,
        model_flag_required: bool = True) -> argparse.ArgumentParser:
    EngineArgs.add_cli_args(parser, model_flag_required=model_flag_required)
    add_server_args(parser)
    return parser


def served_model_names(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "served_model_name", None) or [args.model])


def _error(message: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def _validation_error(err: RequestValidationError) -> tuple[str, str | None]:
    """(message, the first field at fault) of a request pydantic refused."""
    parts = []
    param = None
    for error in err.errors():
        if error.get("type") == "json_invalid":
            return (f"Malformed JSON in the request body: "
                    f"{error.get('msg')}.", None)
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        if loc and param is None:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg')}")
    return "; ".join(parts) or "Invalid request.", param


def build_app(engine: Any, args: argparse.Namespace) -> FastAPI:
    """The FastAPI app serving ``engine`` (an AsyncLLMEngine). ``args``: the
    parsed CLI namespace (model, served_model_name, api_key,
    chat_template)."""
    names = served_model_names(args)
    chat_template = load_chat_template(getattr(args, "chat_template", None))
    completions = OpenAIServingCompletion(engine, names)
    chats = OpenAIServingChat(engine, names, chat_template)
    max_model_len = completions.max_model_len
    api_key = getattr(args, "api_key", None) or envs.VLLM_API_KEY

    app = FastAPI(title="vllm OpenAI-compatible server",
                  version=vllm.__version__)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(_: Request,
                                   err: RequestValidationError) -> Response:
        message, param = _validation_error(err)
        return _error(message, 400, param)

    @app.exception_handler(OpenAIServingError)
    async def _on_serving_error(_: Request,
                                err: OpenAIServingError) -> Response:
        return _error(err.message, err.status, err.param)

    @app.exception_handler(ValueError)
    async def _on_value_error(_: Request, err: ValueError) -> Response:
        return _error(str(err), 400)

    if api_key:

        @app.middleware("http")
        async def _check_api_key(request: Request, call_next: Any) -> Any:
            if (request.method != "OPTIONS"
                    and request.url.path.startswith("/v1")
                    and request.headers.get("Authorization")
                    != f"Bearer {api_key}"):
                return _error(
                    "Unauthorized: a valid API key is needed "
                    "('Authorization: Bearer KEY').", 401)
            return await call_next(request)

    def respond(result: Any) -> Response:
        if isinstance(result, AsyncIterator):
            return StreamingResponse(result,
                                     media_type="text/event-stream",
                                     headers=_SSE_HEADERS)
        return JSONResponse(result.model_dump())

    @app.get("/v1/models")
    async def show_models() -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, root=args.model, max_model_len=max_model_len)
            for name in names
        ])

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest) -> Response:
        return respond(await completions.create_completion(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(
            request: ChatCompletionRequest) -> Response:
        return respond(await chats.create_chat_completion(request))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        completions.check_model(request.model)
        if request.messages is not None:
            tokens = chats.render(request.messages,
                                  request.add_generation_prompt).get(
                                      "prompt_token_ids", [])
        else:
            assert request.prompt is not None
            tokens = completions.tokenizer().encode(
                request.prompt, add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(count=len(tokens),
                                max_model_len=max_model_len,
                                tokens=list(tokens))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        completions.check_model(request.model)
        return DetokenizeResponse(
            prompt=str(completions.tokenizer().decode(request.tokens)))

    async def health() -> Response:
        try:
            await engine.check_health()
        except Exception as err:
            logger.error("Health check failed: %s", err)
            return _error(f"The engine is not healthy: {err}",
                          HTTPStatus.SERVICE_UNAVAILABLE.value)
        return Response(status_code=200)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/version")
    async def show_version() -> dict[str, str]:
        return {"version": vllm.__version__}

    @app.get("/metrics")
    async def show_metrics() -> Response:
        get_metrics = getattr(engine, "get_metrics", None)
        snapshot = get_metrics() if get_metrics is not None else None
        body = ("" if snapshot is None else render_prometheus(
            snapshot, names[0]))
        return Response(content=body, media_type=CONTENT_TYPE)

    return app


def _host_port(args: argparse.Namespace) -> tuple[str, int]:
    host = args.host or envs.VLLM_HOST_IP or "0.0.0.0"
    port = args.port if args.port is not None else (envs.VLLM_PORT or 8000)
    return host, port


async def serve(args: argparse.Namespace) -> None:
    """Build the engine, serve until interrupted, shut the engine down."""
    import uvicorn

    from vllm.engine.async_llm_engine import AsyncLLMEngine

    host, port = _host_port(args)
    engine = AsyncLLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    try:
        app = build_app(engine, args)
        config = uvicorn.Config(app,
                                host=host,
                                port=port,
                                log_level=args.uvicorn_log_level)
        logger.info("Serving %s on http://%s:%d",
                    served_model_names(args)[0], host, port)
        await uvicorn.Server(config).serve()
    finally:
        engine.shutdown()


def run_server(args: argparse.Namespace) -> None:
    logger.info(
        "vllm API server version %s, args: %s", vllm.__version__,
        json.dumps(
            {
                k: v
                for k, v in vars(args).items()
                if k != "api_key" and not callable(v)
            },
            default=str))
    asyncio.run(serve(args))


def main(argv: list[str] | None = None) -> None:
    parser = make_arg_parser(
        argparse.ArgumentParser(
            description="vllm OpenAI-compatible API server."))
    run_server(parser.parse_args(argv))


if __name__ == "__main__":
    main()
