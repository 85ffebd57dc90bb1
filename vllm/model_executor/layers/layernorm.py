"""RMSNorm, with the residual add fused in (the decoder-layer pattern)."""
import torch
from torch import nn

from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.utils import set_weight_attrs


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed as HF's LlamaRMSNorm does:
    the statistics and the scaling in float32, cast back to the input dtype,
    then multiplied by the weight.

    ``forward(x)`` returns norm(x). ``forward(x, residual)`` first adds
    ``x = x + residual`` (in the input dtype, like HF's residual stream) and
    returns ``(norm(x), x)``: the new residual rides along to the next norm.
    """

    def __init__(self,
                 hidden_size: int,
                 eps: float = 1e-6,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(input_dtype)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, eps={self.variance_epsilon}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm, as HF's GemmaRMSNorm computes it: the weight is an
    offset from one, and the scaling by ``1 + weight`` happens in float32
    before the cast back (Llama's multiplies after the cast). The weight
    starts at zero, the identity scale. Same ``forward(x, residual=None)``
    contract as :class:`RMSNorm`."""

    def __init__(self,
                 hidden_size: int,
                 eps: float = 1e-6,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden_size, eps, params_dtype)
        with torch.no_grad():
            self.weight.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return (h * (1.0 + self.weight.to(torch.float32))).to(x.dtype)
