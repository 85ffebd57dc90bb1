"""reshape_and_cache against the reference backend's write_to_paged_cache."""
import pytest
import torch

from tests.kernels.utils import DTYPES, KERNEL_MARKS
from vllm import _custom_ops as ops
from vllm.attention.backends.torch_sdpa import write_to_paged_cache

pytestmark = KERNEL_MARKS


def _key_value(layout: str, num_tokens: int, num_kv_heads: int, head_size: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """key/value [T, Hkv, D]: contiguous, slices of a fused qkv projection
    output (strided rows), or misaligned slices (scalar copy path)."""
    kv_width = num_kv_heads * head_size
    if layout == "contiguous":
        key = torch.randn(num_tokens, num_kv_heads, head_size, dtype=dtype)
        value = torch.randn(num_tokens, num_kv_heads, head_size, dtype=dtype)
        return key.cuda(), value.cuda()
    q_width = 2 * kv_width
    offset = 1 if layout == "misaligned" else 0
    qkv = torch.randn(num_tokens,
                      offset + q_width + 2 * kv_width,
                      dtype=dtype,
                      device="cuda")
    k_start = offset + q_width
    key = qkv[:, k_start:k_start + kv_width]
    value = qkv[:, k_start + kv_width:k_start + 2 * kv_width]
    return (key.view(num_tokens, num_kv_heads,
                     head_size), value.view(num_tokens, num_kv_heads,
                                            head_size))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 17, 64])
@pytest.mark.parametrize("num_kv_heads,head_size", [(1, 64), (8, 128), (2, 80),
                                                    (4, 256), (3, 96)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("layout", ["contiguous", "qkv_slice", "misaligned"])
def test_reshape_and_cache(dtype: torch.dtype, num_tokens: int,
                           num_kv_heads: int, head_size: int, block_size: int,
                           layout: str):
    torch.manual_seed(num_tokens * 1000 + head_size)
    key, value = _key_value(layout, num_tokens, num_kv_heads, head_size, dtype)
    num_blocks = 2 * num_tokens // block_size + 3
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_size),
                          float("nan"),
                          dtype=dtype,
                          device="cuda")
    slot_mapping = torch.randperm(num_blocks * block_size,
                                  device="cuda")[:num_tokens]
    slot_mapping[1::3] = -1  # padding tokens: nothing written
    expected = kv_cache.clone()
    written = slot_mapping >= 0
    write_to_paged_cache(key[written], value[written], expected,
                         slot_mapping[written])

    ops.reshape_and_cache(key, value, kv_cache[0], kv_cache[1], slot_mapping)
    # a bitwise copy; untouched slots stay NaN
    torch.testing.assert_close(kv_cache,
                               expected,
                               rtol=0,
                               atol=0,
                               equal_nan=True)


def test_reshape_and_cache_no_tokens():
    kv_cache = torch.zeros(2, 4, 16, 2, 64, device="cuda")
    empty = torch.empty(0, 2, 64, device="cuda")
    ops.reshape_and_cache(empty, empty, kv_cache[0], kv_cache[1],
                          torch.empty(0, dtype=torch.int64, device="cuda"))
    assert kv_cache.eq(0).all()


def test_reshape_and_cache_rejects_bad_inputs():
    kv_cache = torch.zeros(2, 4, 16, 2, 64, device="cuda")
    key = torch.randn(3, 2, 64, device="cuda")
    slots = torch.arange(3, device="cuda")
    with pytest.raises(RuntimeError, match="slot_mapping must be Long"):
        ops.reshape_and_cache(key, key, kv_cache[0], kv_cache[1], slots.int())
    with pytest.raises(RuntimeError, match="key must be"):
        ops.reshape_and_cache(key[:, :1], key, kv_cache[0], kv_cache[1], slots)
    with pytest.raises(RuntimeError, match="value must be"):
        ops.reshape_and_cache(key, key.half(), kv_cache[0], kv_cache[1], slots)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ops.reshape_and_cache(key.cpu(), key, kv_cache[0], kv_cache[1], slots)
