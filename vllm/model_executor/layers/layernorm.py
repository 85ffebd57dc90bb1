"""RMSNorm, with the residual add fused in (the decoder-layer pattern).

On CUDA, when ``vllm._C`` is built, ``forward`` runs the fused kernels of
csrc/layernorm_kernels.cu, which compute ``_norm``'s numerics; everywhere
else it runs ``_norm`` itself, the reference the kernels are tested against.
"""
import torch
from torch import nn

from vllm import _custom_ops as ops
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.utils import set_weight_attrs

# dtypes the CUDA kernels are built for
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed as HF's LlamaRMSNorm does:
    the statistics and the scaling in float32, cast back to the input dtype,
    then multiplied by the weight.

    ``forward(x)`` returns norm(x). ``forward(x, residual)`` first adds
    ``x = x + residual`` (in the input dtype, like HF's residual stream) and
    returns ``(norm(x), x)``: the new residual rides along to the next norm.

    NOTE: on the CUDA kernel path ``forward(x, residual)`` works in place: it
    returns ``(x, residual)`` overwritten with the norm and the new residual,
    as the decoder layers expect (they never reuse their inputs).
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
        if self._kernel_supports(x, residual):
            return self._forward_kernel(x, residual)
        return self._forward_torch(x, residual)

    def _forward_torch(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reference: plain torch, any device."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _kernel_supports(self, x: torch.Tensor,
                         residual: torch.Tensor | None) -> bool:
        """Whether the CUDA kernels handle these inputs: x [T, d] or
        [A, B, d] (rows may be strided, the last dim contiguous) and the
        residual like it, all in the weight's dtype and on its device."""
        tensors = [x, self.weight]
        if residual is not None:
            tensors.append(residual)
        if not ops.kernels_usable(*tensors):
            return False
        if (x.dtype not in _KERNEL_DTYPES or x.dim() not in (2, 3)
                or x.shape[-1] != self.hidden_size
                or not self.weight.is_contiguous()):
            return False
        if residual is not None and residual.shape != x.shape:
            return False
        return all(
            t.dtype == x.dtype and t.device == x.device and t.stride(-1) == 1
            for t in tensors)

    def _forward_kernel(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The CUDA kernels: same results as _forward_torch (up to float32
        summation order), the residual form in place."""
        if residual is None:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            self._norm_kernel(out, x)
            return out
        self._fused_add_norm_kernel(x, residual)  # in place
        return x, residual

    def _norm_kernel(self, out: torch.Tensor, x: torch.Tensor) -> None:
        ops.rms_norm(out, x, self.weight, self.variance_epsilon)

    def _fused_add_norm_kernel(self, x: torch.Tensor,
                               residual: torch.Tensor) -> None:
        ops.fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)

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

    # The Gemma variants of the kernels compute this class's _norm.
    def _norm_kernel(self, out: torch.Tensor, x: torch.Tensor) -> None:
        ops.gemma_rms_norm(out, x, self.weight, self.variance_epsilon)

    def _fused_add_norm_kernel(self, x: torch.Tensor,
                               residual: torch.Tensor) -> None:
        ops.gemma_fused_add_rms_norm(x, residual, self.weight,
                                     self.variance_epsilon)
