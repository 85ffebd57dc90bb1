// Rotary position embedding, in place, with the numerics of
// RotaryEmbedding._rotate (vllm/model_executor/layers/rotary_embedding.py):
// for each pair (x1, x2) of the first rot_dim dims of a head, with cos/sin
// read from row `position` of the cache [max_position, rot_dim] (cos half,
// then sin half; float32 there, or the query's dtype),
//   o1 = x1 * cos - x2 * sin,   o2 = x2 * cos + x1 * sin
// in float32, each product rounded before the sum (as torch's separate
// element-wise ops do: __fmul_rn/__fadd_rn stop nvcc from fusing them into an
// FMA), then rounded to the query's dtype. NeoX style pairs dim i with
// i + rot_dim/2; GPT-J style pairs 2i with 2i + 1. Dims past rot_dim are not
// touched.
//
// One CTA per token; its threads walk the (head, pair) items of the query
// heads, then of the key heads. Rows may be strided (slices of a fused qkv
// projection): only each token's heads must be contiguous.
#include "cuda_utils.cuh"
#include "ops.h"
#include "torch_utils.h"

#include <limits>

namespace vllm {

template <typename T, typename CacheT, bool kNeox>
__device__ __forceinline__ void rotate_heads(T* __restrict__ row,
                                             const CacheT* __restrict__ cos,
                                             const CacheT* __restrict__ sin,
                                             const int num_heads,
                                             const int head_size,
                                             const int half_rot) {
  const int items = num_heads * half_rot;
  for (int i = threadIdx.x; i < items; i += blockDim.x) {
    const int head = i / half_rot;
    const int pair = i % half_rot;
    const int i1 = kNeox ? pair : 2 * pair;
    const int i2 = kNeox ? pair + half_rot : 2 * pair + 1;
    T* h = row + head * head_size;
    const float x1 = to_float(h[i1]);
    const float x2 = to_float(h[i2]);
    const float c = to_float(cos[pair]);
    const float s = to_float(sin[pair]);
    const float o1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    const float o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    h[i1] = from_float<T>(o1);
    h[i2] = from_float<T>(o2);
  }
}

template <typename T, typename CacheT, bool kNeox>
__global__ void rotary_embedding_kernel(
    const int64_t* __restrict__ positions,  // [T]
    T* __restrict__ query,                  // [T, H * D], rows q_stride apart
    T* __restrict__ key,  // [T, Hkv * D], rows k_stride apart, or nullptr
    const CacheT* __restrict__ cos_sin_cache,  // [max_position, rot_dim]
    const int64_t q_stride, const int64_t k_stride, const int num_heads,
    const int num_kv_heads, const int head_size, const int rot_dim,
    const int64_t max_position) {
  const int64_t token = blockIdx.x;
  const int64_t pos = positions[token];
  CUDA_KERNEL_ASSERT(pos >= 0 && pos < max_position);
  const int half_rot = rot_dim / 2;
  const CacheT* cos = cos_sin_cache + pos * rot_dim;
  const CacheT* sin = cos + half_rot;
  rotate_heads<T, CacheT, kNeox>(query + token * q_stride, cos, sin,
                                 num_heads, head_size, half_rot);
  if (key != nullptr) {
    rotate_heads<T, CacheT, kNeox>(key + token * k_stride, cos, sin,
                                   num_kv_heads, head_size, half_rot);
  }
}

// Heads of `t` ([T, H * D] or [T, H, D]) for head_size D, after checking that
// each token's H * D elements are contiguous.
inline int64_t heads_of(const at::Tensor& t, int64_t num_tokens,
                        int64_t head_size, const char* op, const char* name) {
  VLLM_CHECK(t.dim() == 2 || t.dim() == 3, op, ": ", name,
             " must be [num_tokens, heads * head_size] or [num_tokens, "
             "heads, head_size], got shape ",
             t.sizes());
  VLLM_CHECK(t.size(0) == num_tokens, op, ": ", name, " has ", t.size(0),
             " tokens but positions has ", num_tokens);
  const int64_t width = t.numel() / std::max<int64_t>(num_tokens, 1);
  VLLM_CHECK(num_tokens == 0 || width % head_size == 0, op, ": ", name,
             " row of ", width, " elements is not a whole number of heads "
             "of size ", head_size);
  const bool row_contiguous =
      t.stride(-1) == 1 && (t.dim() == 2 || t.stride(1) == t.size(2));
  VLLM_CHECK(row_contiguous, op, ": ", name,
             " must be contiguous within a token, got strides ",
             t.strides());
  if (t.dim() == 3) {
    VLLM_CHECK(t.size(2) == head_size, op, ": ", name, " head size ",
               t.size(2), " differs from head_size ", head_size);
  }
  return width / head_size;
}

}  // namespace vllm

void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      std::optional<at::Tensor> key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox) {
  constexpr const char* op = "rotary_embedding";
  vllm::check_cuda(query, op, "query");
  vllm::check_same_device(positions, query, op, "positions");
  vllm::check_same_device(cos_sin_cache, query, op, "cos_sin_cache");
  const auto dtype = vllm::check_float_dtype(query, op, "query");
  vllm::check_dtype(positions, at::kLong, op, "positions");
  VLLM_CHECK(positions.dim() == 1 && positions.is_contiguous(), op,
             ": positions must be a contiguous 1-D tensor (flatten it), got "
             "shape ",
             positions.sizes());
  const auto cache_dtype = cos_sin_cache.scalar_type();
  VLLM_CHECK(cache_dtype == at::kFloat || cache_dtype == dtype, op,
             ": cos_sin_cache must be float32 or ", dtype, ", got ",
             cache_dtype);
  VLLM_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(), op,
             ": cos_sin_cache must be a contiguous [max_position, rot_dim] "
             "tensor, got shape ",
             cos_sin_cache.sizes());
  const int64_t rot_dim = cos_sin_cache.size(1);
  VLLM_CHECK(head_size > 0 && rot_dim > 0 && rot_dim % 2 == 0 &&
                 rot_dim <= head_size,
             op, ": rot_dim (", rot_dim,
             ") must be even and at most head_size (", head_size, ")");

  const int64_t num_tokens = positions.size(0);
  const int64_t num_heads =
      vllm::heads_of(query, num_tokens, head_size, op, "query");
  int64_t num_kv_heads = 0;
  if (key.has_value()) {
    vllm::check_same_device(*key, query, op, "key");
    vllm::check_dtype(*key, dtype, op, "key");
    num_kv_heads = vllm::heads_of(*key, num_tokens, head_size, op, "key");
  }
  if (num_tokens == 0) return;
  VLLM_CHECK(num_tokens <= std::numeric_limits<int32_t>::max() &&
                 num_heads * head_size <= std::numeric_limits<int32_t>::max(),
             op, ": tensors too large");

  const c10::cuda::CUDAGuard device_guard(query.device());
  const dim3 grid(static_cast<unsigned>(num_tokens));
  const dim3 block(vllm::threads_for(
      std::max(num_heads, num_kv_heads) * (rot_dim / 2), 512));
  const cudaStream_t stream = vllm::current_stream();
  const int64_t q_stride = query.stride(0);
  const int64_t k_stride = key.has_value() ? key->stride(0) : 0;
  VLLM_DISPATCH_FLOAT_TYPES(dtype, op, [&] {
    auto* q = reinterpret_cast<scalar_t*>(query.data_ptr());
    auto* k = key.has_value() ? reinterpret_cast<scalar_t*>(key->data_ptr())
                              : nullptr;
    const auto launch = [&](auto cache_tag, auto neox_tag) {
      using cache_t = decltype(cache_tag);
      constexpr bool kNeox = decltype(neox_tag)::value;
      vllm::rotary_embedding_kernel<scalar_t, cache_t, kNeox>
          <<<grid, block, 0, stream>>>(
              positions.data_ptr<int64_t>(), q, k,
              reinterpret_cast<const cache_t*>(cos_sin_cache.data_ptr()),
              q_stride, k_stride, static_cast<int>(num_heads),
              static_cast<int>(num_kv_heads), static_cast<int>(head_size),
              static_cast<int>(rot_dim), cos_sin_cache.size(0));
    };
    if (cache_dtype == at::kFloat) {
      is_neox ? launch(float{}, std::true_type{})
              : launch(float{}, std::false_type{});
    } else {
      is_neox ? launch(scalar_t{}, std::true_type{})
              : launch(scalar_t{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
