// reshape_and_cache: stores the new tokens' keys and values in the paged KV
// cache. The cache is [num_blocks, block_size, Hkv, D] (contiguous), so slot
// s = block * block_size + offset is simply row s of a [num_slots, Hkv * D]
// matrix; one CTA copies one token's K and V rows, 16 bytes per thread and
// access when sizes and addresses allow it. The copy is bitwise, so the
// kernel only depends on the element size.
#include "cuda_utils.cuh"
#include "ops.h"
#include "torch_utils.h"

#include <limits>

namespace vllm {

// Unit: the copied word (uint4 = 16 bytes, or one element).
template <typename Unit>
__global__ void reshape_and_cache_kernel(
    const Unit* __restrict__ key,    // [T, row_units], rows key_stride apart
    const Unit* __restrict__ value,  // [T, row_units], rows value_stride apart
    Unit* __restrict__ key_cache,    // [num_slots, row_units]
    Unit* __restrict__ value_cache,  // [num_slots, row_units]
    const int64_t* __restrict__ slot_mapping,  // [T]
    const int64_t key_stride, const int64_t value_stride, const int row_units,
    const int64_t num_slots) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // a padding token: nothing to store
  CUDA_KERNEL_ASSERT(slot < num_slots);
  const Unit* k = key + token * key_stride;
  const Unit* v = value + token * value_stride;
  Unit* kc = key_cache + slot * row_units;
  Unit* vc = value_cache + slot * row_units;
  for (int i = threadIdx.x; i < row_units; i += blockDim.x) {
    kc[i] = k[i];
    vc[i] = v[i];
  }
}

template <typename Unit>
void launch_reshape_and_cache(const at::Tensor& key,
                              const at::Tensor& value,
                              at::Tensor& key_cache,
                              at::Tensor& value_cache,
                              const at::Tensor& slot_mapping,
                              int64_t row_bytes) {
  const int64_t esize = key.element_size();
  const int64_t unit = sizeof(Unit);
  const int row_units = static_cast<int>(row_bytes / unit);
  const int64_t num_tokens = slot_mapping.size(0);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const dim3 grid(static_cast<unsigned>(num_tokens));
  const dim3 block(threads_for(row_units, 512));
  const cudaStream_t stream = current_stream();
  reshape_and_cache_kernel<Unit><<<grid, block, 0, stream>>>(
      reinterpret_cast<const Unit*>(key.data_ptr()),
      reinterpret_cast<const Unit*>(value.data_ptr()),
      reinterpret_cast<Unit*>(key_cache.data_ptr()),
      reinterpret_cast<Unit*>(value_cache.data_ptr()),
      slot_mapping.data_ptr<int64_t>(), key.stride(0) * esize / unit,
      value.stride(0) * esize / unit, row_units, num_slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vllm

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                       at::Tensor& key_cache, at::Tensor& value_cache,
                       const at::Tensor& slot_mapping) {
  constexpr const char* op = "reshape_and_cache";
  vllm::check_cuda(key, op, "key");
  vllm::check_same_device(value, key, op, "value");
  vllm::check_same_device(key_cache, key, op, "key_cache");
  vllm::check_same_device(value_cache, key, op, "value_cache");
  vllm::check_same_device(slot_mapping, key, op, "slot_mapping");
  const auto dtype = vllm::check_float_dtype(key, op, "key");
  vllm::check_dtype(value, dtype, op, "value");
  vllm::check_dtype(key_cache, dtype, op, "key_cache");
  vllm::check_dtype(value_cache, dtype, op, "value_cache");
  vllm::check_dtype(slot_mapping, at::kLong, op, "slot_mapping");

  VLLM_CHECK(key_cache.dim() == 4, op,
             ": key_cache must be [num_blocks, block_size, num_kv_heads, "
             "head_size], got shape ",
             key_cache.sizes());
  VLLM_CHECK(value_cache.sizes() == key_cache.sizes(), op,
             ": value_cache shape ", value_cache.sizes(),
             " differs from key_cache shape ", key_cache.sizes());
  VLLM_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), op,
             ": key_cache and value_cache must be contiguous");
  const int64_t num_kv_heads = key_cache.size(2);
  const int64_t head_size = key_cache.size(3);
  VLLM_CHECK(slot_mapping.dim() == 1 && slot_mapping.is_contiguous(), op,
             ": slot_mapping must be a contiguous 1-D tensor, got shape ",
             slot_mapping.sizes());
  const int64_t num_tokens = slot_mapping.size(0);
  const auto check_rows = [&](const at::Tensor& t, const char* name) {
    VLLM_CHECK(t.dim() == 3 && t.size(0) == num_tokens &&
                   t.size(1) == num_kv_heads && t.size(2) == head_size,
               op, ": ", name, " must be [num_tokens=", num_tokens,
               ", num_kv_heads=", num_kv_heads, ", head_size=", head_size,
               "] like the cache and slot_mapping, got shape ", t.sizes());
    // Heads and head dims of one token must be contiguous; tokens may be
    // strided (e.g. slices of a fused qkv projection).
    VLLM_CHECK(t.stride(2) == 1 && t.stride(1) == head_size, op, ": ", name,
               " must be contiguous within a token (strides [*, ",
               head_size, ", 1]), got strides ", t.strides());
  };
  check_rows(key, "key");
  check_rows(value, "value");
  if (num_tokens == 0) return;
  VLLM_CHECK(num_tokens <= std::numeric_limits<int32_t>::max(), op,
             ": too many tokens");

  const c10::cuda::CUDAGuard device_guard(key.device());
  const int64_t esize = key.element_size();
  const int64_t row_bytes = num_kv_heads * head_size * esize;
  const bool vectorized =
      row_bytes % 16 == 0 && (key.stride(0) * esize) % 16 == 0 &&
      (value.stride(0) * esize) % 16 == 0 &&
      vllm::is_aligned16(key.data_ptr()) &&
      vllm::is_aligned16(value.data_ptr()) &&
      vllm::is_aligned16(key_cache.data_ptr()) &&
      vllm::is_aligned16(value_cache.data_ptr());
  if (vectorized) {
    vllm::launch_reshape_and_cache<uint4>(key, value, key_cache, value_cache,
                                          slot_mapping, row_bytes);
  } else if (esize == 4) {
    vllm::launch_reshape_and_cache<uint32_t>(key, value, key_cache,
                                             value_cache, slot_mapping,
                                             row_bytes);
  } else {
    vllm::launch_reshape_and_cache<uint16_t>(key, value, key_cache,
                                             value_cache, slot_mapping,
                                             row_bytes);
  }
}
