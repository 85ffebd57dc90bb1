"""Step 1: basic offline inference, the script to step through first.

    python my_debug_scripts/step1_basic_llama.py                  # stories260K
    python my_debug_scripts/step1_basic_llama.py --max-tokens 20 --temperature 0.8
    python my_debug_scripts/step1_basic_llama.py --model PATH_OR_HUB_ID

Or press F5 in VS Code with "Step1: basic Llama inference"
(.vscode/launch.json). Good breakpoints, in the order a request meets them
(my_debug_scripts/README.md has the whole list):

1. vllm/entrypoints/llm.py::LLM.__init__      kwargs -> EngineArgs -> LLMEngine
2. vllm/engine/llm_engine.py::LLMEngine.__init__   tokenizer, executor, scheduler
3. vllm/entrypoints/llm.py::LLM.generate      prompts -> add_request -> step loop
4. vllm/engine/llm_engine.py::LLMEngine.step  one scheduled batch
5. vllm/core/scheduler.py::Scheduler.schedule     who runs, how many tokens
6. vllm/worker/model_runner.py::ModelRunner.execute_model   batch -> logits
7. vllm/model_executor/models/llama.py::LlamaForCausalLM.forward
8. vllm/attention/backends/torch_sdpa.py::TorchSDPAImpl.forward  (CPU backend)
9. vllm/model_executor/layers/sampler.py::Sampler.forward   logits -> token

Debugger protection (see the FAQ of my_debug_scripts/README.md): when a
debugger is attached, this script's own log lines go to
my_debug_scripts/.logs/step1_basic_llama.debug.log instead of stdout, and
the engine runs with ``async_scheduling=False`` so that one
``LLMEngine.step()`` is exactly one batch.
"""
import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / \
    "models" / "stories260K"
LOG_DIR = Path(__file__).resolve().parent / ".logs"
LOG_FILE = LOG_DIR / "step1_basic_llama.debug.log"

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily wanted to",
]


def debugger_attached() -> bool:
    """True under pdb, VS Code (debugpy) or PyCharm (pydevd)."""
    return (sys.gettrace() is not None or "debugpy" in sys.modules
            or "pydevd" in sys.modules)


def make_logger(debugging: bool) -> logging.Logger:
    """This script's logger: stdout normally, a file under a debugger.

    Under a debugger the engine's "vllm" logger keeps stdout to itself: two
    handlers writing to one stream while a debugger pauses threads is how
    single-stepping can end up waiting in ``logger.info``.
    """
    logger = logging.getLogger("step1_basic_llama")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers.clear()
    handler: logging.Handler
    if debugging:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(LOG_FILE, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    debugging = debugger_attached()
    log = make_logger(debugging)

    # NOTE on VLLM_ENABLE_V1_MULTIPROCESSING: upstream vLLM runs its engine
    # core in a child process unless this is "0", and its debugging advice
    # is to set it to "0". This engine always runs in the calling process
    # (vllm/executor/uniproc_executor.py): vllm/envs.py accepts the variable
    # but no component reads it, so it is deliberately left alone here.

    # Imported after the set-up above so that anything environment-related
    # is in place before vllm reads vllm.envs.
    from vllm import LLM, SamplingParams

    engine_kwargs: dict[str, Any] = {}
    if debugging:
        # One LLMEngine.step() = one batch: without async scheduling the
        # engine does not schedule and launch step N+1 before step N's
        # tokens are processed (no PLACEHOLDER_TOKEN_ID in the sequences).
        engine_kwargs["async_scheduling"] = False
        log.info("debugger attached: logging to %s, async_scheduling=False",
                 LOG_FILE)

    log.info("loading %s", args.model)
    # BREAKPOINT: step into LLM.__init__ (vllm/entrypoints/llm.py), then
    # LLMEngine.__init__: tokenizer, UniProcExecutor (Worker -> ModelRunner
    # -> get_model, KV-cache sizing), Scheduler + BlockManager.
    llm = LLM(model=args.model, seed=args.seed, **engine_kwargs)
    params = SamplingParams(temperature=args.temperature,
                            max_tokens=args.max_tokens)

    # BREAKPOINT: step into LLM.generate, then LLMEngine.step in its loop
    # (LLM._run_engine). For the model itself put one in
    # LlamaForCausalLM.forward (vllm/model_executor/models/llama.py).
    outputs = llm.generate(PROMPTS, params, use_tqdm=not debugging)

    for output in outputs:
        completion = output.outputs[0]
        # Printed (not logged) so that the result is always on stdout.
        print(f"Prompt: {output.prompt!r}")
        print(f"Generated: {completion.text!r}")
        print(f"  ({len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason})")
    log.info("done: %d outputs", len(outputs))


if __name__ == "__main__":
    main()
