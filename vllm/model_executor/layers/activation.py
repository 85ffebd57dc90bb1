"""Activation functions, including the fused gate * up ones of gated MLPs.

On CUDA (when ``vllm._C`` is built) the gated ones run the kernels of
csrc/activation_kernels.cu, with the same numerics as their torch code,
which everywhere else runs and is the reference.
"""
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vllm import _custom_ops as ops


def _gated_kernel_supports(x: torch.Tensor) -> bool:
    """Whether the fused gate * up kernels handle x [..., 2d]."""
    return (ops.kernels_usable(x)
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and x.dim() >= 1 and x.shape[-1] > 0 and x.shape[-1] % 2 == 0
            and x.stride(-1) == 1)


def _gated_kernel(kernel: Callable[[torch.Tensor, torch.Tensor], None],
                  x: torch.Tensor) -> torch.Tensor:
    """out [..., d] <- kernel(out, x [..., 2d]), leading dims flattened."""
    d = x.shape[-1] // 2
    out = torch.empty(x.shape[:-1] + (d, ), dtype=x.dtype, device=x.device)
    kernel(out.view(-1, d), x.reshape(-1, 2 * d))
    return out


class SiluAndMul(nn.Module):
    """``[..., 2d] -> [..., d]``: silu(x[..., :d]) * x[..., d:].

    The input is the output of a merged gate_up projection (gate first).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _gated_kernel_supports(x):
            return _gated_kernel(ops.silu_and_mul, x)
        return self._forward_torch(x)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: plain torch, any device."""
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    """``[..., 2d] -> [..., d]``: gelu(x[..., :d]) * x[..., d:].

    ``approximate`` is ``"none"`` (erf) or ``"tanh"``.
    """

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"Unknown approximate mode {approximate!r}; "
                             "use 'none' or 'tanh'.")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _gated_kernel_supports(x):
            kernel = (ops.gelu_tanh_and_mul
                      if self.approximate == "tanh" else ops.gelu_and_mul)
            return _gated_kernel(kernel, x)
        return self._forward_torch(x)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: plain torch, any device."""
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class NewGELU(nn.Module):
    """The tanh approximation of GELU, written out as GPT-2 (and HF's
    ``gelu_new``) computes it, so fp32 results match HF bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + torch.tanh(c *
                                           (x + 0.044715 * torch.pow(x, 3.0))))


class QuickGELU(nn.Module):

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": NewGELU,
    "gelu_fast": NewGELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
}


def get_act_fn(act_fn_name: str) -> nn.Module:
    """The activation module for a Hugging Face ``hidden_act`` name."""
    name = act_fn_name.lower()
    if name not in _ACTIVATIONS:
        raise ValueError(f"Activation function {act_fn_name!r} is not "
                         f"supported; supported: {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]()
