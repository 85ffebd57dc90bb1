"""The sampler's Triton kernels compile for Hopper (sm_90), on any machine.

Triton's interpreter (``test_sampling_kernels.py``) runs the kernels' logic
on the CPU but never compiles them, so it misses what only the compiler
checks (a loop-carried variable that changes shape, a type that does not
lower). Here each kernel is compiled ahead of time with the arguments that
the kernels' wrappers really pass: the launches are recorded instead of
run, and each is compiled for ``GPUTarget("cuda", 90, 32)`` with the ptxas
that triton ships. No GPU needed; skipped without triton.

``-s`` prints ptxas's register and spill counts per launch: registers per
thread decide how many programs share an SM, which bounds these
latency-bound passes (see docs/performance.md)::

    python -m pytest tests/samplers/test_sampling_kernels_compile.py -s
"""
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton",
                             reason="triton is not installed (GPU installs)")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("the interpreter does not compile", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vllm.model_executor.layers.ops import (  # noqa: E402
    sampling_kernels as kernels)
from vllm.model_executor.sampling_metadata import (  # noqa: E402
    LogitBias, PenaltyCounts, StepRecord, seen_words)

HOPPER = GPUTarget("cuda", 90, 32)
_POINTEE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}
# Launch options, not kernel arguments.
_OPTIONS = ("num_warps", "num_stages", "num_ctas")

Launch = tuple[JITFunction, dict[str, Any], dict[str, Any]]


def _argument_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def record_launches(run: Callable[[], Any]) -> list[Launch]:
    """The kernel launches ``run`` makes: (kernel, arguments by name,
    options), none of them run."""
    launches: list[Launch] = []

    def record(fn: JITFunction, *args: Any, grid: Any, warmup: bool,
               **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        names = [p.name for p in fn.params]
        launches.append((fn, dict(zip(names, args)) | kwargs, options))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JITFunction, "run", record)
        run()
    return launches


def compile_for_hopper(launch: Launch) -> Any:
    """``launch`` compiled for sm_90 (the compiled kernel), specialised as
    a launch specialises it: an integer 1 is a constant, pointers aligned
    to 16 bytes and integers divisible by 16 say so (what lets loads be
    vectorised)."""
    fn, arguments, options = launch
    signature, constexprs, attrs = {}, {}, {}
    for param in fn.params:
        value = arguments[param.name]
        integer = type(value) is int and not param.do_not_specialize
        if param.is_constexpr or value is None or (integer and value == 1):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        signature[param.name] = _argument_type(value)
        if isinstance(value, torch.Tensor):
            divisible = value.data_ptr() % 16 == 0
        else:
            divisible = integer and value % 16 == 0
        if divisible:
            attrs[(param.num, )] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs),
                          target=HOPPER,
                          options=options)


def ptxas_report(compiled: Any) -> str:
    """ptxas's register and spill lines for the compiled kernel."""
    ptxas = os.path.join(os.path.dirname(triton.__file__),
                         "backends/nvidia/bin/ptxas")
    if not os.path.exists(ptxas):
        return "(no ptxas)"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        out = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True)
    return "; ".join(
        line.split(":", 1)[-1].strip() for line in out.stderr.splitlines()
        if "registers" in line or "spill" in line)


# ------------------------------------------------------------ the launches
NUM_ROWS, VOCAB_SIZE = 4, 151_936


def _edits() -> tuple[LogitBias, PenaltyCounts]:
    rows = torch.arange(NUM_ROWS)
    bias = LogitBias(keys=rows * VOCAB_SIZE + 7,
                     values=torch.ones(NUM_ROWS),
                     row_starts=torch.arange(NUM_ROWS + 1))
    penalties = PenaltyCounts(presence=torch.zeros(NUM_ROWS),
                              frequency=torch.zeros(NUM_ROWS),
                              repetition=torch.ones(NUM_ROWS),
                              rows=rows,
                              slots=rows,
                              row_slots=rows,
                              counts=torch.zeros(NUM_ROWS,
                                                 VOCAB_SIZE,
                                                 dtype=torch.int32),
                              seen=torch.zeros(NUM_ROWS,
                                               seen_words(VOCAB_SIZE),
                                               dtype=torch.int32))
    return bias, penalties


def _wrapper_calls() -> Iterator[tuple[str, Callable[[], Any]]]:
    """(name, call) for each way the sampler calls the kernels."""
    logits = torch.zeros(NUM_ROWS, VOCAB_SIZE, dtype=torch.bfloat16)
    temperature = torch.ones(NUM_ROWS)
    rule = torch.ones(NUM_ROWS)
    seeded_keys = torch.zeros(NUM_ROWS, dtype=torch.int64)
    seeded_index = torch.arange(NUM_ROWS)
    bias, penalties = _edits()

    def sample_with_every_edit(rules: bool) -> Any:
        return kernels.sample(
            logits,
            temperature,
            1 << 40,
            threshold=rule,
            top_n_sigma=rule if rules else None,
            min_p=rule if rules else None,
            seeded_keys=seeded_keys,
            seeded_index=seeded_index,
            bias=bias,
            penalties=penalties,
            num_logprobs=5,
            record=StepRecord(torch.empty_like(seeded_keys)) if rules else None)

    # The engine's all-features step: it also records the step.
    yield "sample, rules", lambda: sample_with_every_edit(True)
    yield "sample, no rules", lambda: sample_with_every_edit(False)
    yield "sample, plain", lambda: kernels.sample(logits, temperature, 3)
    yield "edit", lambda: kernels.edit(logits.float(), bias, penalties)
    yield "row_stats", lambda: kernels.row_stats(logits, sigma=True)
    yield "topk_logprobs", lambda: kernels.topk_logprobs(
        logits, torch.zeros(NUM_ROWS, dtype=torch.int64), 100)
    yield "seeded_log_q", lambda: kernels.seeded_log_q(
        seeded_keys, torch.zeros(NUM_ROWS, 3, dtype=torch.int64))
    keys = torch.zeros(NUM_ROWS, dtype=torch.int64)
    yield "mark_tokens", lambda: kernels.mark_tokens(
        penalties.counts, penalties.seen, keys, True,
        (keys, torch.arange(NUM_ROWS)))


@pytest.mark.parametrize("name,call", list(_wrapper_calls()))
def test_kernels_compile_for_hopper(name, call):
    launches = record_launches(call)
    assert launches, f"{name}: no kernel launched"
    for launch in launches:
        compiled = compile_for_hopper(launch)
        print(f"{name}: {launch[0].fn.__name__}: {ptxas_report(compiled)}")
