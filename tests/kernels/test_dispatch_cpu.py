"""Without CUDA the layers never reach the kernels (runs on every machine):
HAS_C is a plain bool, and with CPU tensors every layer runs its torch code
even where vllm._C is built."""
import pytest
import torch

from vllm import _custom_ops as ops
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.rotary_embedding import get_rope

KERNELS = [
    "rms_norm", "fused_add_rms_norm", "gemma_rms_norm",
    "gemma_fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
    "gelu_and_mul", "gelu_tanh_and_mul", "reshape_and_cache",
    "paged_attention_decode"
]


def test_has_c_is_a_bool():
    assert isinstance(ops.HAS_C, bool)
    assert not ops.kernels_usable(torch.zeros(2))


@pytest.fixture
def kernels_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine with vllm._C built, but every kernel call fails."""

    def forbidden(*args: object) -> None:
        raise AssertionError("a CUDA kernel was called on CPU tensors")

    monkeypatch.setattr(ops, "HAS_C", True)
    for name in KERNELS:
        monkeypatch.setattr(ops, name, forbidden)


@pytest.mark.usefixtures("kernels_forbidden")
def test_layers_on_cpu_run_their_torch_code():
    torch.manual_seed(0)
    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    for norm in (RMSNorm(16), GemmaRMSNorm(16)):
        assert torch.equal(norm(x), norm._norm(x))
        out, new_residual = norm(x, residual)
        assert torch.equal(new_residual, x + residual)
        assert torch.equal(out, norm._norm(x + residual))

    rope = get_rope(8, 8, 32, 10000.0)
    q, k = torch.randn(3, 16), torch.randn(3, 8)
    positions = torch.tensor([0, 5, 9])
    q_out, k_out = rope(positions, q, k)
    q_ref, k_ref = rope._forward_torch(positions, q, k)
    assert torch.equal(q_out, q_ref)
    assert k_out is not None and k_ref is not None
    assert torch.equal(k_out, k_ref)

    gate_up = torch.randn(3, 32)
    for act in (SiluAndMul(), GeluAndMul("none"), GeluAndMul("tanh")):
        assert torch.equal(act(gate_up), act._forward_torch(gate_up))
