"""rotary_embedding against RotaryEmbedding's torch code (the layer's
_forward_torch), which it matches bit for bit up to rare last-place
differences, and the layer's dispatch to it."""
import pytest
import torch

from tests.kernels.utils import DTYPES, KERNEL_MARKS
from vllm import _custom_ops as ops
from vllm.model_executor.layers.rotary_embedding import (RotaryEmbedding,
                                                         get_rope)

pytestmark = KERNEL_MARKS

# 1 ulp of each dtype, relative
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _rope(head_size: int,
          rotary_dim: int,
          is_neox: bool,
          dtype: torch.dtype,
          scaling: dict | None = None) -> RotaryEmbedding:
    with torch.device("cuda"):
        return get_rope(head_size, rotary_dim, 4096, 10000.0, scaling, is_neox,
                        dtype)


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Same numerics: nearly every element bit-identical, none off by more
    than one unit in the last place."""
    equal = (out == ref).float().mean().item()
    assert equal > 0.999, f"only {equal:.4%} of elements bit-identical"
    torch.testing.assert_close(out.float(),
                               ref.float(),
                               rtol=ULP[out.dtype],
                               atol=1e-30)


def _qkv(num_tokens: int, heads: int, kv_heads: int, head_size: int,
         dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(num_tokens, (heads + 2 * kv_heads) * head_size,
                       dtype=dtype,
                       device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rotary_dim", [(64, 64), (80, 80),
                                                  (128, 128), (256, 256),
                                                  (128, 64), (96, 32)])
@pytest.mark.parametrize("num_tokens", [1, 7, 513])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (32, 8), (4, 4)])
def test_rotary_embedding(dtype: torch.dtype, is_neox: bool, head_size: int,
                          rotary_dim: int, num_tokens: int, heads: int,
                          kv_heads: int):
    torch.manual_seed(num_tokens + head_size)
    rope = _rope(head_size, rotary_dim, is_neox, dtype)
    positions = torch.randint(0, 4096, (num_tokens, ), device="cuda")
    qkv = _qkv(num_tokens, heads, kv_heads, head_size, dtype)
    q_size, kv_size = heads * head_size, kv_heads * head_size
    # strided rows, as the model passes them: slices of the qkv output
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q_ref, k_ref = rope._forward_torch(positions, q.clone(), k.clone())
    v_before = v.clone()

    ops.rotary_embedding(positions, q, k, head_size, rope.cos_sin_cache,
                         is_neox)
    assert k_ref is not None
    _assert_matches(q, q_ref)
    _assert_matches(k, k_ref)
    assert torch.equal(v, v_before)  # the rest of the row is untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_layouts(dtype: torch.dtype):
    """Contiguous 2-D and 3-D query/key, no key, and a cache in the model
    dtype instead of float32."""
    torch.manual_seed(3)
    rope = _rope(128, 128, True, dtype)
    positions = torch.randint(0, 4096, (33, ), device="cuda")
    q = torch.randn(33, 8, 128, dtype=dtype, device="cuda")
    k = torch.randn(33, 2 * 128, dtype=dtype, device="cuda")
    q_ref, k_ref = rope._forward_torch(positions, q.clone(), k.clone())
    q_out, k_out = q.clone(), k.clone()
    ops.rotary_embedding(positions, q_out, k_out, 128, rope.cos_sin_cache, True)
    assert k_ref is not None
    _assert_matches(q_out, q_ref)
    _assert_matches(k_out, k_ref)

    q_out = q.clone()
    ops.rotary_embedding(positions, q_out, None, 128, rope.cos_sin_cache, True)
    _assert_matches(q_out, q_ref)

    cache = rope.cos_sin_cache.to(dtype)
    ref = q.clone().view(33, 8, 128)
    cos, sin = cache[positions].unsqueeze(1).chunk(2, dim=-1)
    ref = rope._rotate(ref, cos, sin)  # promotes to float32 as the kernel
    q_out = q.clone()
    ops.rotary_embedding(positions, q_out, None, 128, cache, True)
    _assert_matches(q_out, ref)


@pytest.mark.parametrize("scaling", [
    None,
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024
    },
    {
        "rope_type": "linear",
        "factor": 2.0
    },
    {
        "rope_type": "dynamic",
        "factor": 2.0
    },
])
def test_rotary_layer_uses_the_kernel(scaling: dict | None):
    torch.manual_seed(4)
    rope = _rope(64, 64, True, torch.bfloat16, scaling)
    positions = torch.randint(0, 4096, (1, 20), device="cuda")  # flattened
    qkv = _qkv(20, 4, 2, 64, torch.bfloat16)
    q, k, _ = qkv.split([256, 128, 128], dim=-1)
    assert rope._kernel_supports(positions.flatten(), q, k)
    q_ref, k_ref = rope._forward_torch(positions.flatten(), q.clone(),
                                       k.clone())
    q_out, k_out = rope(positions, q, k)
    assert q_out.data_ptr() == q.data_ptr()  # in place
    assert k_ref is not None and k_out is not None
    _assert_matches(q_out, q_ref)
    _assert_matches(k_out, k_ref)


def test_rotary_rejects_bad_inputs():
    rope = _rope(64, 64, True, torch.float16)
    q = torch.randn(4, 128, dtype=torch.float16, device="cuda")
    positions = torch.arange(4, device="cuda")
    with pytest.raises(RuntimeError, match="positions must be Long"):
        ops.rotary_embedding(positions.int(), q, None, 64, rope.cos_sin_cache,
                             True)
    with pytest.raises(RuntimeError, match="whole number of heads"):
        ops.rotary_embedding(positions, q[:, :100], None, 64,
                             rope.cos_sin_cache, True)
    with pytest.raises(RuntimeError, match="rot_dim"):
        ops.rotary_embedding(positions, q, None, 32, rope.cos_sin_cache, True)
