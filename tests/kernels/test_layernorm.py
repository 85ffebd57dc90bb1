"""rms_norm / fused_add_rms_norm (and the Gemma variants) against the torch
code of RMSNorm / GemmaRMSNorm, and the layers' dispatch to them."""
import pytest
import torch

from tests.kernels.utils import (DTYPES, ELEM_TOL, KERNEL_MARKS, REL_TOL,
                                 poisoned, rel_err)
from vllm import _custom_ops as ops
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm

pytestmark = KERNEL_MARKS

NORMS = {"llama": RMSNorm, "gemma": GemmaRMSNorm}
KERNELS = {
    "llama": (ops.rms_norm, ops.fused_add_rms_norm),
    "gemma": (ops.gemma_rms_norm, ops.gemma_fused_add_rms_norm),
}


def _norm_layer(kind: str, hidden: int, dtype: torch.dtype) -> RMSNorm:
    layer = NORMS[kind](hidden, eps=1e-5).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(1.0 if kind == "llama" else 0.0, 0.1)
    return layer


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert rel_err(out, ref) < REL_TOL[dtype]
    torch.testing.assert_close(out, ref, **ELEM_TOL[dtype])


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 17, 257])
@pytest.mark.parametrize("hidden", [64, 1000, 1001, 4096, 8192])
def test_rms_norm(kind: str, dtype: torch.dtype, num_tokens: int, hidden: int):
    torch.manual_seed(hidden + num_tokens)
    layer = _norm_layer(kind, hidden, dtype)
    x = 3 * torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
    out = poisoned(x.shape, dtype)
    KERNELS[kind][0](out, x, layer.weight, layer.variance_epsilon)
    _check(out, layer._norm(x), dtype)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 17, 257])
@pytest.mark.parametrize("hidden", [64, 1000, 1001, 4096, 8192])
def test_fused_add_rms_norm(kind: str, dtype: torch.dtype, num_tokens: int,
                            hidden: int):
    torch.manual_seed(hidden + num_tokens + 1)
    layer = _norm_layer(kind, hidden, dtype)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
    residual = 4 * torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
    expected_residual = x + residual  # rounded to dtype, as the layer does
    expected = layer._norm(expected_residual)

    KERNELS[kind][1](x, residual, layer.weight, layer.variance_epsilon)
    assert torch.equal(residual, expected_residual)
    _check(x, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_3d_input(dtype: torch.dtype):
    """Qwen3's per-head q norm: [T, H, D] views of a fused qkv output."""
    torch.manual_seed(5)
    num_tokens, heads, kv_heads, head_size = 9, 16, 8, 128
    layer = _norm_layer("llama", head_size, dtype)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_size,
                      dtype=dtype,
                      device="cuda")
    q_size = heads * head_size
    q = qkv[:, :q_size].reshape(num_tokens, heads, head_size)
    k = qkv[:, q_size:q_size + kv_heads * head_size].reshape(
        num_tokens, kv_heads, head_size)
    assert not q.is_contiguous() and not k.is_contiguous()
    for x in (q, k):
        out = poisoned(x.shape, dtype)
        ops.rms_norm(out, x, layer.weight, layer.variance_epsilon)
        _check(out, layer._norm(x), dtype)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_layers_use_the_kernels(kind: str, dtype: torch.dtype):
    torch.manual_seed(6)
    layer = _norm_layer(kind, 2048, dtype)
    x = torch.randn(7, 2048, dtype=dtype, device="cuda")
    residual = torch.randn(7, 2048, dtype=dtype, device="cuda")
    assert layer._kernel_supports(x, None)
    assert layer._kernel_supports(x, residual)

    ref = layer._forward_torch(x)
    _check(layer(x), ref, dtype)

    ref_out, ref_residual = layer._forward_torch(x.clone(), residual.clone())
    out, new_residual = layer(x, residual)
    # the kernel path works in place
    assert out.data_ptr() == x.data_ptr()
    assert new_residual.data_ptr() == residual.data_ptr()
    assert torch.equal(new_residual, ref_residual)
    _check(out, ref_out, dtype)


def test_norm_layer_falls_back_when_the_kernel_cannot_run():
    layer = _norm_layer("llama", 64, torch.bfloat16)
    x = torch.randn(2, 3, 4, 64, dtype=torch.bfloat16, device="cuda")
    assert not layer._kernel_supports(x, None)  # 4-D
    assert not layer._kernel_supports(x[0, 0].float(), None)  # dtype
    _check(layer(x), layer._norm(x), torch.bfloat16)
