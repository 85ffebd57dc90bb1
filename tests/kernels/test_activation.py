"""silu_and_mul, gelu_and_mul and gelu_tanh_and_mul against the torch code
of SiluAndMul / GeluAndMul, and the layers' dispatch to them."""
import pytest
import torch

from tests.kernels.utils import (DTYPES, ELEM_TOL, KERNEL_MARKS, REL_TOL,
                                 poisoned, rel_err)
from vllm import _custom_ops as ops
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

pytestmark = KERNEL_MARKS

# kernel -> the layer whose torch code is its reference
CASES = {
    "silu": (ops.silu_and_mul, SiluAndMul()),
    "gelu": (ops.gelu_and_mul, GeluAndMul("none")),
    "gelu_tanh": (ops.gelu_tanh_and_mul, GeluAndMul("tanh")),
}


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert rel_err(out, ref) < REL_TOL[dtype]
    torch.testing.assert_close(out, ref, **ELEM_TOL[dtype])


@pytest.mark.parametrize("act", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 17, 64, 257])
@pytest.mark.parametrize("d", [64, 1001, 4096, 14336])
def test_act_and_mul(act: str, dtype: torch.dtype, num_tokens: int, d: int):
    torch.manual_seed(num_tokens + d)
    kernel, layer = CASES[act]
    x = 3 * torch.randn(num_tokens, 2 * d, dtype=dtype, device="cuda")
    out = poisoned((num_tokens, d), dtype)
    kernel(out, x)
    _check(out, layer._forward_torch(x), dtype)


@pytest.mark.parametrize("act", list(CASES))
def test_act_and_mul_extremes(act: str):
    """Large |gate| (exp overflow / underflow) stays finite and correct."""
    kernel, layer = CASES[act]
    gate = torch.tensor([-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0],
                        device="cuda")
    x = torch.cat([gate, torch.full_like(gate, 2.0)]).view(1, -1)
    out = poisoned((1, 8), torch.float32)
    kernel(out, x)
    assert out.isfinite().all()
    torch.testing.assert_close(out,
                               layer._forward_torch(x),
                               atol=1e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("act", list(CASES))
def test_act_and_mul_strided_rows(act: str):
    kernel, layer = CASES[act]
    buf = torch.randn(5, 2 * 256 + 8, dtype=torch.bfloat16, device="cuda")
    x = buf[:, 8:]  # rows 2 * 256 + 8 apart
    out_buf = poisoned((5, 300), torch.bfloat16)
    out = out_buf[:, :256]
    kernel(out, x)
    _check(out, layer._forward_torch(x), torch.bfloat16)
    assert out_buf[:, 256:].isnan().all()


@pytest.mark.parametrize("act", list(CASES))
def test_activation_layers_use_the_kernels(act: str):
    _, layer = CASES[act]
    x = torch.randn(2, 3, 2 * 512, dtype=torch.bfloat16, device="cuda")
    from vllm.model_executor.layers import activation
    assert activation._gated_kernel_supports(x)
    out = layer(x)
    assert out.shape == (2, 3, 512)
    _check(out, layer._forward_torch(x), torch.bfloat16)


def test_act_and_mul_rejects_bad_inputs():
    x = torch.randn(4, 10, device="cuda")
    with pytest.raises(RuntimeError, match="input must be"):
        ops.silu_and_mul(torch.empty(4, 4, device="cuda"), x)
    with pytest.raises(RuntimeError, match="out must be"):
        ops.silu_and_mul(torch.empty(4, 5, device="cuda").half(), x)
