"""The ``vllm`` console script.

    vllm serve MODEL [engine flags] [--host --port --api-key
                     --served-model-name --chat-template]

Engine flags are EngineArgs' fields (``--max-model-len``, ``--dtype``,
``--gpu-memory-utilization``, ``--enforce-eager``, ...).
"""
import argparse

import vllm


def make_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.openai.api_server import make_arg_parser

    parser = argparse.ArgumentParser(prog="vllm",
                                     description="vllm command line.")
    parser.add_argument("-v",
                        "--version",
                        action="version",
                        version=vllm.__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="Start the OpenAI-compatible API server.",
        description="Start the OpenAI-compatible API server for MODEL.")
    serve.add_argument("model_tag",
                       nargs="?",
                       default=None,
                       help="The model: a local directory or a Hugging Face "
                       "Hub id (same as --model).")
    make_arg_parser(serve, model_flag_required=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The namespace of a command; for ``serve``, ``model`` is the
    positional MODEL (or ``--model``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.model_tag is not None:
            if args.model is not None and args.model != args.model_tag:
                parser.error(f"MODEL {args.model_tag!r} and --model "
                             f"{args.model!r} disagree; pass one.")
            args.model = args.model_tag
        if args.model is None:
            parser.error("vllm serve needs a MODEL (path or Hub id).")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "serve":
        from vllm.entrypoints.openai.api_server import run_server
        run_server(args)


if __name__ == "__main__":
    main()
