"""The decode GEMV (ops.gemv) against torch's matmul in float32, and the
choice of linear() (layers/linear.py) between it and F.linear."""
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.utils import (ELEM_TOL, KERNEL_MARKS, REL_TOL, poisoned,
                                 rel_err)
from vllm import _custom_ops as ops
from vllm.model_executor.layers import gemv_tuning
from vllm.model_executor.layers.linear import ColumnParallelLinear, linear

GEMV_DTYPES = [torch.float16, torch.bfloat16]
# (N, K): Llama-3-8B's o_proj, qkv_proj and down_proj, then odd N (a
# warp's second row past the end, partial CTAs) and K down to one vector
# per row or not a whole number of a warp's chunks (4104).
SHAPES = [(4096, 4096), (6144, 4096), (4096, 14336), (7, 8), (7, 4104),
          (1000, 8), (1000, 64), (1000, 4104), (1, 64)]
# The Llama-3-8B decode cases linear() chooses for.
LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def kernel_test(fn: Callable) -> Callable:
    """The marks of the kernel tests (tests/kernels/utils.py): a GPU and
    vllm._C. Per test, because this file also has CPU tests."""
    for mark in KERNEL_MARKS:
        fn = mark(fn)
    return fn


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no measured case."""
    monkeypatch.setattr(gemv_tuning, "_decisions", {})


def _inputs(m: int, n: int, k: int,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random x [m, k] and weight [n, k], outputs of order 1."""
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    w = torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5
    return x, w


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().T).to(x.dtype)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert rel_err(out, ref) < REL_TOL[dtype]
    torch.testing.assert_close(out, ref, **ELEM_TOL[dtype])


# ------------------------------------------------------------ the kernel


@kernel_test
@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv(dtype: torch.dtype, m: int, n: int, k: int):
    torch.manual_seed(n + k + m)
    x, w = _inputs(m, n, k, dtype)
    out = poisoned((m, n), dtype)
    ops.gemv(out, x, w)
    _check(out, _reference(x, w), dtype)


@kernel_test
@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_strided_rows(dtype: torch.dtype, m: int):
    """Input and out rows inside wider tensors: the row strides are used,
    and nothing outside out's columns is written."""
    torch.manual_seed(m)
    n, k = 1000, 520
    x_full, w = _inputs(m, n, k + 24, dtype)
    x, w = x_full[:, 8:k + 8], w[:, :k].contiguous()
    out_full = poisoned((m, n + 5), dtype)
    out = out_full[:, :n]
    ops.gemv(out, x, w)
    _check(out, _reference(x, w), dtype)
    assert out_full[:, n:].isnan().all()


@kernel_test
def test_gemv_rejects_what_it_does_not_support():
    x, w = _inputs(1, 64, 64, torch.float16)
    out = torch.empty(1, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="dtype"):
        ops.gemv(out.float(), x.float(), w.float())
    with pytest.raises(RuntimeError, match="at most 4"):
        ops.gemv(torch.empty_like(out).expand(5, 64), x.expand(5, 64), w)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.gemv(out, x[:, :60], w[:, :60].contiguous())
    with pytest.raises(RuntimeError, match="aligned"):
        ops.gemv(out, x[:, 1:57], w[:, :56].contiguous())
    with pytest.raises(RuntimeError, match="shapes"):
        ops.gemv(out, x, w[:32])


# ------------------------------------------------------ linear()'s choice


def test_linear_on_cpu_runs_f_linear(monkeypatch: pytest.MonkeyPatch):
    """Runs everywhere: CPU tensors never reach the kernel, even where
    vllm._C is built, and nothing is measured."""

    def forbidden(*args: object) -> None:
        raise AssertionError("the GEMV was called on CPU tensors")

    monkeypatch.setattr(ops, "HAS_C", True)
    monkeypatch.setattr(ops, "gemv", forbidden)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(2, 64, dtype=dtype), torch.randn(48, 64, dtype=dtype)
        assert not gemv_tuning.gemv_supports(x, w)
        assert torch.equal(linear(x, w), F.linear(x, w))
    layer = ColumnParallelLinear(64, 48, bias=False)
    layer.weight.data.normal_()
    x = torch.randn(1, 64)
    assert torch.equal(layer(x)[0], F.linear(x, layer.weight))
    assert gemv_tuning._decisions == {}


def test_vllm_gemv_0_turns_it_off(monkeypatch: pytest.MonkeyPatch):
    """With VLLM_GEMV=0 a case is decided without timing anything."""
    monkeypatch.setenv("VLLM_GEMV", "0")
    x, w = torch.randn(1, 64), torch.randn(48, 64)
    assert gemv_tuning._measure(x, w) is False


def _count_gemv_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    kernel = ops.gemv

    def counting(*args: torch.Tensor) -> None:
        calls[0] += 1
        kernel(*args)

    monkeypatch.setattr(ops, "gemv", counting)
    return calls


@kernel_test
@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_linear_matches_f_linear(dtype: torch.dtype, m: int, n: int, k: int):
    """Whichever path linear() measures faster, the result is F.linear's
    up to rounding; a 3-D [1, m, k] input keeps its leading dims."""
    torch.manual_seed(m + n)
    x, w = _inputs(m, n, k, dtype)
    x = x.unsqueeze(0)
    with torch.inference_mode():
        out = linear(x, w)
    assert out.shape == (1, m, n)
    assert (n, k, dtype, m) in gemv_tuning._decisions
    _check(out, F.linear(x, w), dtype)


@kernel_test
@pytest.mark.parametrize("use", [True, False])
def test_linear_follows_the_decision(monkeypatch: pytest.MonkeyPatch,
                                     use: bool):
    calls = _count_gemv_calls(monkeypatch)
    x, w = _inputs(2, 1000, 512, torch.bfloat16)
    gemv_tuning._decisions[(1000, 512, torch.bfloat16, 2)] = use
    out = linear(x, w)
    assert calls[0] == int(use)
    _check(out, F.linear(x, w), torch.bfloat16)
    # a bias, 5 rows or float32 always take F.linear
    bias = torch.randn(1000, dtype=torch.bfloat16, device="cuda")
    _check(linear(x, w, bias), F.linear(x, w, bias), torch.bfloat16)
    x5 = torch.randn(5, 512, dtype=torch.bfloat16, device="cuda")
    _check(linear(x5, w), F.linear(x5, w), torch.bfloat16)
    assert calls[0] == int(use)


@kernel_test
def test_vllm_gemv_0_on_cuda(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VLLM_GEMV", "0")
    calls = _count_gemv_calls(monkeypatch)
    x, w = _inputs(1, 4096, 4096, torch.float16)
    _check(linear(x, w), F.linear(x, w), torch.float16)
    assert calls[0] == 0
    assert gemv_tuning._decisions == {(4096, 4096, torch.float16, 1): False}


@kernel_test
def test_unmeasured_case_in_graph_capture_runs_f_linear(
        monkeypatch: pytest.MonkeyPatch):
    """During capture nothing is timed: an unseen case records F.linear
    and stays unmeasured; a case measured eagerly before is followed."""
    calls = _count_gemv_calls(monkeypatch)
    x, w = _inputs(1, 4096, 4096, torch.bfloat16)
    linear(x, w)  # a warm-up, as before a real capture
    gemv_tuning._decisions.clear()
    calls[0] = 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, w)
    assert gemv_tuning._decisions == {}
    assert calls[0] == 0
    x.copy_(torch.randn_like(x))
    graph.replay()
    _check(out, F.linear(x, w), torch.bfloat16)

    gemv_tuning._decisions[(4096, 4096, torch.bfloat16, 1)] = True
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, w)
    assert calls[0] == 1
    x.copy_(torch.randn_like(x))
    graph.replay()
    _check(out, F.linear(x, w), torch.bfloat16)
