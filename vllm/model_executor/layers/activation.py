"""Activation functions, including the fused gate * up ones of gated MLPs."""
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``[..., 2d] -> [..., d]``: silu(x[..., :d]) * x[..., d:].

    The input is the output of a merged gate_up projection (gate first).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
