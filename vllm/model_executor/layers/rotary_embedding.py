"""Rotary position embeddings (RoPE) with a precomputed cos/sin cache.

The inverse frequencies are computed in float32 with the same operations as
Hugging Face transformers, the cache ``[max_position, rotary_dim]`` (cos half,
then sin half) is kept in float32, and the rotation is applied in float32 and
cast back to the query's dtype. In float32 this is bit-identical to HF's
``apply_rotary_pos_emb``; in bf16/fp16 it is slightly *more* accurate than HF,
which rounds cos/sin to the model dtype first.

Scaling variants (``rope_scaling["rope_type"]``, or the legacy ``"type"``):
``default``, ``linear``, ``dynamic`` (static form, see
``DynamicNTKScalingRotaryEmbedding``) and ``llama3``. They differ only in the
cache, so all share ``forward``, which on CUDA (when ``vllm._C`` is built)
rotates in place with the kernel of csrc/pos_encoding_kernels.cu (same
numerics as ``_rotate``) and otherwise runs ``_rotate``, the reference.
"""
import math
import weakref
from typing import Any

import torch
from torch import nn

from vllm import _custom_ops as ops

_DEFAULT_ROPE_THETA = 10000.0
_SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Keys of a rope-parameters dict that are not scaling parameters.
_NON_SCALING_KEYS = ("rope_theta", "type", "partial_rotary_factor")


def rope_params_from_config(config: Any) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` of a Hugging Face config.

    Handles both layouts:
    - transformers >= 5: ``config.rope_parameters = {"rope_type": ...,
      "rope_theta": ..., <scaling keys>}`` (always present, with
      ``rope_type="default"`` when there is no scaling; ``config.rope_scaling``
      is an alias of it and ``config.rope_theta`` no longer exists);
    - transformers 4 / older config.json: ``config.rope_theta`` and
      ``config.rope_scaling = {"type" or "rope_type": ..., ...} | None``.

    The scaling dict returned has a ``"rope_type"`` key and no ``rope_theta``;
    it is None for plain RoPE. For ``llama3``, a missing
    ``original_max_position_embeddings`` defaults to
    ``config.max_position_embeddings`` (as transformers does).
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None)
    params = dict(params or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("Per-layer-type RoPE parameters "
                         f"({sorted(params)}) are not supported.")
    base = params.get("rope_theta")
    if base is None:
        base = getattr(config, "rope_theta", None)
    base = float(base if base is not None else _DEFAULT_ROPE_THETA)

    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return base, None
    scaling = {k: v for k, v in params.items() if k not in _NON_SCALING_KEYS}
    scaling["rope_type"] = rope_type
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings",
                           config.max_position_embeddings)
    return base, scaling


def partial_rotary_factor_from_config(config: Any) -> float:
    """The fraction of head_dim that is rotated (1.0 for Llama-style)."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor")
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None)
    return float(factor) if factor is not None else 1.0


class RotaryEmbedding(nn.Module):
    """Plain RoPE.

    ``forward(positions [T], query [T, H*D], key [T, Hkv*D])`` returns the
    rotated ``(query, key)`` in the input shapes and dtype. The first
    ``rotary_dim`` dims of each head are rotated, the rest pass through.
    ``is_neox_style``: rotate the two halves of those dims (Llama / HF
    ``rotate_half``); otherwise rotate interleaved pairs (GPT-J).

    NOTE: on the CUDA kernel path query and key are rotated in place and
    returned (the model's q/k are fresh slices of its qkv projection).
    """

    def __init__(self, head_size: int, rotary_dim: int,
                 max_position_embeddings: int, base: float, is_neox_style: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        if rotary_dim > head_size or rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim ({rotary_dim}) must be even and at "
                             f"most head_size ({head_size}).")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = float(base)
        self.is_neox_style = is_neox_style
        self.dtype = dtype
        cache = self._compute_cos_sin_cache()
        # NOTE: float32 whatever the model dtype; not saved in state dicts.
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        # HF: 1 / (base ** (arange(0, dim, 2) / dim)), in float32
        exponents = torch.arange(0, self.rotary_dim, 2,
                                 dtype=torch.int64).to(torch.float32)
        return 1.0 / (base**(exponents / self.rotary_dim))

    def _cache_length(self) -> int:
        return self.max_position_embeddings

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        inv_freq = self._compute_inv_freq(self.base)  # [rot/2]
        t = torch.arange(self._cache_length(), dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, rot/2]
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [P, rot]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] -> rotated [T, H, D]; cos/sin [T, 1, rot/2] fp32."""
        rot = self.rotary_dim
        x_rot = x[..., :rot].to(torch.float32)
        if self.is_neox_style:
            x1, x2 = x_rot[..., :rot // 2], x_rot[..., rot // 2:]
        else:
            x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if self.is_neox_style:
            out = torch.cat((o1, o2), dim=-1)
        else:
            out = torch.stack((o1, o2), dim=-1).flatten(-2)
        out = out.to(x.dtype)
        if rot < self.head_size:
            out = torch.cat((out, x[..., rot:]), dim=-1)
        return out

    def forward(
            self, positions: torch.Tensor, query: torch.Tensor,
            key: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        positions = positions.flatten()
        if self._kernel_supports(positions, query, key):
            return self._forward_kernel(positions, query, key)
        return self._forward_torch(positions, query, key)

    def _forward_kernel(
            self, positions: torch.Tensor, query: torch.Tensor,
            key: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The CUDA kernel: the same numerics as _forward_torch, in place."""
        ops.rotary_embedding(positions, query, key, self.head_size,
                             self.cos_sin_cache, self.is_neox_style)
        return query, key

    def _forward_torch(
            self, positions: torch.Tensor, query: torch.Tensor,
            key: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference: plain torch, any device (positions flattened)."""
        num_tokens = positions.shape[0]
        cos_sin = self.cos_sin_cache.index_select(0, positions)  # [T, rot]
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rot/2]
        q = query.view(num_tokens, -1, self.head_size)
        query = self._rotate(q, cos, sin).view(query.shape)
        if key is not None:
            k = key.view(num_tokens, -1, self.head_size)
            key = self._rotate(k, cos, sin).view(key.shape)
        return query, key

    def _kernel_supports(self, positions: torch.Tensor, query: torch.Tensor,
                         key: torch.Tensor | None) -> bool:
        """Whether the CUDA kernel handles these inputs: int64 positions,
        query/key [T, heads * head_size] (or [T, heads, head_size]) whose
        tokens may be strided but whose heads are contiguous."""
        tensors = [positions, query, self.cos_sin_cache]
        if key is not None:
            tensors.append(key)
        if not ops.kernels_usable(*tensors):
            return False
        if positions.dtype != torch.int64 or not positions.is_contiguous():
            return False
        if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        cache = self.cos_sin_cache
        if (cache.dtype not in (torch.float32, query.dtype)
                or not cache.is_contiguous()):
            return False
        if any(t.device != query.device for t in tensors):
            return False
        for x in (query, key):
            if x is None:
                continue
            if (x.dtype != query.dtype or x.shape[0] != positions.shape[0]
                    or not _heads_contiguous(x, self.head_size)):
                return False
        return True

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_position_embeddings={self.max_position_embeddings}, "
                f"base={self.base}, is_neox_style={self.is_neox_style}")


def _heads_contiguous(x: torch.Tensor, head_size: int) -> bool:
    """x is [T, H * head_size] or [T, H, head_size] with each token's
    elements contiguous (rows may be strided)."""
    if x.dim() == 2:
        return x.stride(1) == 1 and x.shape[1] % head_size == 0
    return (x.dim() == 3 and x.shape[2] == head_size and x.stride(2) == 1
            and x.stride(1) == head_size)


class LinearScalingRotaryEmbedding(RotaryEmbedding):
    """Position interpolation: positions divided by ``scaling_factor``.

    Computed like HF (inverse frequencies divided by the factor, which is the
    same rotation up to rounding); the cache covers
    ``max_position_embeddings * scaling_factor`` positions.
    """

    def __init__(self, head_size: int, rotary_dim: int,
                 max_position_embeddings: int, base: float, is_neox_style: bool,
                 scaling_factor: float, dtype: torch.dtype) -> None:
        self.scaling_factor = float(scaling_factor)
        super().__init__(head_size, rotary_dim, max_position_embeddings, base,
                         is_neox_style, dtype)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return super()._compute_inv_freq(base) / self.scaling_factor

    def _cache_length(self) -> int:
        return int(self.max_position_embeddings * self.scaling_factor)


class DynamicNTKScalingRotaryEmbedding(RotaryEmbedding):
    """Dynamic NTK scaling, in vLLM's *static* form.

    The base is scaled once, for the longest supported length
    ``L = max_position_embeddings * scaling_factor``:
    ``base' = base * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2))``,
    and that one cache (covering ``L`` positions) is used for every sequence.

    NOTE: Hugging Face recomputes the base per forward from the current length
    ``max(position) + 1``, and uses the *unscaled* base while that length is
    within ``max_position_embeddings``. The two agree only for sequences that
    reach length ``L``; shorter sequences rotate differently (more so the
    shorter they are). vLLM makes the same choice, so outputs match vLLM's.
    """

    def __init__(self, head_size: int, rotary_dim: int,
                 max_position_embeddings: int, base: float, is_neox_style: bool,
                 scaling_factor: float, dtype: torch.dtype) -> None:
        self.scaling_factor = float(scaling_factor)
        super().__init__(head_size, rotary_dim, max_position_embeddings, base,
                         is_neox_style, dtype)

    def _cache_length(self) -> int:
        return int(self.max_position_embeddings * self.scaling_factor)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        factor, dim = self.scaling_factor, self.rotary_dim
        max_len = self._cache_length()
        scaled_base = base * (
            (factor * max_len / self.max_position_embeddings) -
            (factor - 1))**(dim / (dim - 2))
        return super()._compute_inv_freq(scaled_base)


class Llama3RotaryEmbedding(RotaryEmbedding):
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``,
    short ones kept, the band between smoothly interpolated. Same operations
    as HF's ``_compute_llama3_parameters``."""

    def __init__(self, head_size: int, rotary_dim: int,
                 max_position_embeddings: int, base: float, is_neox_style: bool,
                 dtype: torch.dtype, scaling_factor: float,
                 low_freq_factor: float, high_freq_factor: float,
                 orig_max_position: int) -> None:
        self.scaling_factor = float(scaling_factor)
        self.low_freq_factor = float(low_freq_factor)
        self.high_freq_factor = float(high_freq_factor)
        self.orig_max_position = int(orig_max_position)
        super().__init__(head_size, rotary_dim, max_position_embeddings, base,
                         is_neox_style, dtype)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        inv_freq = super()._compute_inv_freq(base)
        factor = self.scaling_factor
        low, high = self.low_freq_factor, self.high_freq_factor
        old_context_len = self.orig_max_position
        low_freq_wavelen = old_context_len / low
        high_freq_wavelen = old_context_len / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths: divide by factor; short ones: keep
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen,
                                     inv_freq / factor, inv_freq)
        # in between: interpolate smoothly
        smooth_factor = (old_context_len / wavelen - low) / (high - low)
        smoothed = ((1 - smooth_factor) * inv_freq_llama / factor +
                    smooth_factor * inv_freq_llama)
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen
                                                       > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)


# Live instances only: a cache is freed with the last model that uses it.
_ROPE_CACHE: "weakref.WeakValueDictionary[tuple, RotaryEmbedding]" = (
    weakref.WeakValueDictionary())


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def get_rope(head_size: int,
             rotary_dim: int,
             max_position: int,
             base: float,
             rope_scaling: dict[str, Any] | None = None,
             is_neox_style: bool = True,
             dtype: torch.dtype | None = None) -> RotaryEmbedding:
    """The rotary embedding for these parameters, built on the current
    default device. Instances are shared (the cos/sin cache is read-only), so
    every layer of a model uses one cache."""
    dtype = dtype or torch.get_default_dtype()
    key = (head_size, rotary_dim, max_position, float(base), is_neox_style,
           _freeze(rope_scaling), dtype, str(torch.get_default_device()))
    cached = _ROPE_CACHE.get(key)
    if cached is not None:
        return cached

    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope: RotaryEmbedding
    if rope_type == "default":
        rope = RotaryEmbedding(head_size, rotary_dim, max_position, base,
                               is_neox_style, dtype)
    elif rope_type == "linear":
        rope = LinearScalingRotaryEmbedding(head_size, rotary_dim, max_position,
                                            base, is_neox_style,
                                            scaling["factor"], dtype)
    elif rope_type == "dynamic":
        rope = DynamicNTKScalingRotaryEmbedding(head_size, rotary_dim,
                                                max_position, base,
                                                is_neox_style,
                                                scaling["factor"], dtype)
    elif rope_type == "llama3":
        rope = Llama3RotaryEmbedding(
            head_size, rotary_dim, max_position, base, is_neox_style, dtype,
            scaling["factor"], scaling["low_freq_factor"],
            scaling["high_freq_factor"],
            scaling.get("original_max_position_embeddings", max_position))
    else:
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported; "
                         f"supported: {list(_SUPPORTED_ROPE_TYPES)}.")
    _ROPE_CACHE[key] = rope
    return rope
