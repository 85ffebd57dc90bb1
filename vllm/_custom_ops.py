"""Python entry points of the CUDA kernels in csrc/ (the ``vllm._C``
extension, built by setup.py on machines with a CUDA torch and nvcc).

Each function is a one-line call of ``torch.ops._C.<name>``; the kernels'
contracts (shapes, dtypes, what is written) are documented in csrc/ops.h and
csrc/README.md. ``HAS_C`` says whether the extension loaded; without it
(CPU-only installs) calling these raises, so layers check
:func:`kernels_usable` first and otherwise run their plain-torch code, which
stays the reference the kernels are tested against (tests/kernels/).
"""
import torch

from vllm.logger import init_logger

logger = init_logger(__name__)

try:
    import vllm._C  # noqa: F401  (loading it registers torch.ops._C.*)
    HAS_C = True
except ImportError as e:
    HAS_C = False
    if not isinstance(e, ModuleNotFoundError):
        # Built but not loadable (e.g. built against another torch).
        logger.warning("vllm._C failed to load, using torch fallbacks: %s", e)


def kernels_usable(*tensors: torch.Tensor) -> bool:
    """True when the CUDA kernels can run on ``tensors``: the extension is
    loaded, every tensor is on a CUDA device, and none needs autograd (the
    kernels are inference-only and some write in place)."""
    if not HAS_C:
        return False
    grad = torch.is_grad_enabled()
    return all(t.is_cuda and not (grad and t.requires_grad) for t in tensors)


# ------------------------------------------------------------ attention


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor,
                      key_cache: torch.Tensor, value_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, Hkv, D] at their slots of the caches
    [N, block_size, Hkv, D]; slot -1 skips a token."""
    torch.ops._C.reshape_and_cache(key, value, key_cache, value_cache,
                                   slot_mapping)


def paged_attention_decode(out: torch.Tensor, query: torch.Tensor,
                           key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, max_seq_len: int) -> None:
    """out [B, H, D] <- attention of query [B, H, D] over each sequence's
    seq_lens[b] cached tokens; max_seq_len must bound seq_lens."""
    torch.ops._C.paged_attention_decode(out, query, key_cache, value_cache,
                                        block_tables, seq_lens, scale,
                                        max_seq_len)


# ------------------------------------------------------------ layernorm


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
             epsilon: float) -> None:
    """out <- RMSNorm(input) (RMSNorm._norm's numerics)."""
    torch.ops._C.rms_norm(out, input, weight, epsilon)


def fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor,
                       weight: torch.Tensor, epsilon: float) -> None:
    """residual <- input + residual; input <- RMSNorm(residual)."""
    torch.ops._C.fused_add_rms_norm(input, residual, weight, epsilon)


def gemma_rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                   epsilon: float) -> None:
    """out <- GemmaRMSNorm(input) (scales by 1 + weight in float32)."""
    torch.ops._C.gemma_rms_norm(out, input, weight, epsilon)


def gemma_fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor,
                             weight: torch.Tensor, epsilon: float) -> None:
    """residual <- input + residual; input <- GemmaRMSNorm(residual)."""
    torch.ops._C.gemma_fused_add_rms_norm(input, residual, weight, epsilon)


# ------------------------------------------------------- rotary embedding


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor,
                     key: torch.Tensor | None, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Rotate query [T, H*D] and key [T, Hkv*D] in place."""
    torch.ops._C.rotary_embedding(positions, query, key, head_size,
                                  cos_sin_cache, is_neox)


# ------------------------------------------------------------ activation


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """out [T, d] <- silu(input[:, :d]) * input[:, d:]."""
    torch.ops._C.silu_and_mul(out, input)


def gelu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """out [T, d] <- gelu(input[:, :d]) * input[:, d:] (erf GELU)."""
    torch.ops._C.gelu_and_mul(out, input)


def gelu_tanh_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """out [T, d] <- gelu_tanh(input[:, :d]) * input[:, d:]."""
    torch.ops._C.gelu_tanh_and_mul(out, input)


# ------------------------------------------------------------------ gemv


def gemv(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor) -> None:
    """out [M, N] <- input [M, K] @ weight [N, K].T for M <= 4 (fp16/bf16,
    K % 8 == 0): the decode GEMV, float32 accumulation."""
    torch.ops._C.gemv(out, input, weight)
