// RMSNorm, alone and fused with the residual add, with the numerics of
// vllm/model_executor/layers/layernorm.py:
//   RMSNorm._norm:       y = to_dtype(x * rsqrt(mean(x^2) + eps)), then
//                        out = to_dtype(weight * y)          (Llama / HF)
//   GemmaRMSNorm._norm:  out = to_dtype(x * rsqrt(mean(x^2) + eps)
//                                       * (1 + float(weight)))
// with x widened to float32 and the statistics in float32. The fused variant
// first rounds residual = to_dtype(input + residual), as the layer's
// `x = x + residual` does, and normalises that.
//
// One CTA per row: a first pass sums the squares (block reduction), a
// second pass re-reads the row (now in L1/L2) and writes the result; 16-byte
// accesses when the row length and strides allow, scalar ones otherwise.
// Rows are those of a 2-D [T, d] or 3-D [A, B, d] tensor whose last dim is
// contiguous (e.g. Qwen3's per-head q/k norm over a strided qkv slice).
#include "cuda_utils.cuh"
#include "ops.h"
#include "torch_utils.h"

#include <limits>

namespace vllm {

// Element offset of row r of a [A, B, d] tensor (B = rows_b; 2-D tensors
// are [T, 1, d]).
struct RowIndex {
  int64_t stride_a;
  int64_t stride_b;
  int64_t rows_b;
  __device__ __forceinline__ int64_t operator()(int64_t row) const {
    return (row / rows_b) * stride_a + (row % rows_b) * stride_b;
  }
};

inline RowIndex row_index(const at::Tensor& t) {
  if (t.dim() == 2) return RowIndex{t.stride(0), 0, 1};
  return RowIndex{t.stride(0), t.stride(1), t.size(1)};
}

// One element of the output, before rounding to T, from x (float), the
// row's 1/rms and the weight w (float).
template <typename T, bool kGemma>
__device__ __forceinline__ float normalize(float x, float inv_rms, float w) {
  if constexpr (kGemma) {
    return x * inv_rms * (1.0f + w);
  } else {
    return round_to<T>(x * inv_rms) * w;
  }
}

template <typename T, int VEC, bool kGemma>
__global__ void rms_norm_kernel(T* __restrict__ out, const RowIndex out_index,
                                const T* __restrict__ input,
                                const RowIndex in_index,
                                const T* __restrict__ weight, const int d,
                                const float inv_d, const float eps) {
  const T* x = input + in_index(blockIdx.x);
  T* y = out + out_index(blockIdx.x);
  const int num_vecs = d / VEC;

  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC];
    load_floats<T, VEC>(x + i * VEC, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum_sq += v[e] * v[e];
  }
  // mean as torch computes it: sum times the float32 factor 1/d
  const float inv_rms = rsqrtf(block_sum(sum_sq) * inv_d + eps);

  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC], w[VEC];
    load_floats<T, VEC>(x + i * VEC, v);
    load_floats<T, VEC>(weight + i * VEC, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      v[e] = normalize<T, kGemma>(v[e], inv_rms, w[e]);
    }
    store_floats<T, VEC>(y + i * VEC, v);
  }
}

template <typename T, int VEC, bool kGemma>
__global__ void fused_add_rms_norm_kernel(
    T* __restrict__ input, const RowIndex in_index, T* __restrict__ residual,
    const RowIndex res_index, const T* __restrict__ weight, const int d,
    const float inv_d, const float eps) {
  T* x = input + in_index(blockIdx.x);
  T* r = residual + res_index(blockIdx.x);
  const int num_vecs = d / VEC;

  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float a[VEC], b[VEC];
    load_floats<T, VEC>(x + i * VEC, a);
    load_floats<T, VEC>(r + i * VEC, b);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      a[e] = round_to<T>(a[e] + b[e]);  // the new residual, in T
      sum_sq += a[e] * a[e];
    }
    store_floats<T, VEC>(r + i * VEC, a);
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) * inv_d + eps);

  // Each thread re-reads exactly the residual elements it wrote above.
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC], w[VEC];
    load_floats<T, VEC>(r + i * VEC, v);
    load_floats<T, VEC>(weight + i * VEC, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      v[e] = normalize<T, kGemma>(v[e], inv_rms, w[e]);
    }
    store_floats<T, VEC>(x + i * VEC, v);
  }
}

// Shapes, dtypes and layout shared by all four ops; returns the row count.
inline int64_t check_norm_args(const char* op, const at::Tensor& a,
                               const char* a_name, const at::Tensor& b,
                               const char* b_name, const at::Tensor& weight) {
  check_cuda(a, op, a_name);
  check_same_device(b, a, op, b_name);
  check_same_device(weight, a, op, "weight");
  const auto dtype = check_float_dtype(a, op, a_name);
  check_dtype(b, dtype, op, b_name);
  check_dtype(weight, dtype, op, "weight");
  VLLM_CHECK(a.dim() == 2 || a.dim() == 3, op, ": ", a_name,
             " must be [num_tokens, hidden] or [A, B, hidden], got shape ",
             a.sizes());
  VLLM_CHECK(b.sizes() == a.sizes(), op, ": ", b_name, " shape ", b.sizes(),
             " differs from ", a_name, " shape ", a.sizes());
  VLLM_CHECK(a.stride(-1) == 1 && b.stride(-1) == 1, op, ": ", a_name,
             " and ", b_name, " must be contiguous in their last dim, got "
             "strides ", a.strides(), " and ", b.strides());
  const int64_t d = a.size(-1);
  VLLM_CHECK(weight.dim() == 1 && weight.size(0) == d &&
                 weight.is_contiguous(),
             op, ": weight must be a contiguous [", d, "] tensor, got shape ",
             weight.sizes());
  VLLM_CHECK(d > 0 && d <= std::numeric_limits<int32_t>::max(), op,
             ": bad hidden size ", d);
  const int64_t rows = a.numel() / d;
  VLLM_CHECK(rows <= std::numeric_limits<int32_t>::max(), op,
             ": too many rows (", rows, ")");
  return rows;
}

template <bool kGemma>
void rms_norm_impl(const char* op, at::Tensor& out, const at::Tensor& input,
                   const at::Tensor& weight, double epsilon) {
  const int64_t rows = check_norm_args(op, input, "input", out, "out", weight);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int d = static_cast<int>(input.size(-1));
  const float inv_d = 1.0f / static_cast<float>(d);
  const float eps = static_cast<float>(epsilon);
  const bool vec = vectorizable16(input) && vectorizable16(out) &&
                   vectorizable16(weight);
  const cudaStream_t stream = current_stream();
  VLLM_DISPATCH_FLOAT_TYPES(input.scalar_type(), op, [&] {
    constexpr int kVec = Vec16<scalar_t>::kSize;
    const int vec_size = vec ? kVec : 1;
    const dim3 grid(static_cast<unsigned>(rows));
    const dim3 block(threads_for(d / vec_size, 1024));
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x = reinterpret_cast<const scalar_t*>(input.data_ptr());
    const auto* w = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    if (vec) {
      rms_norm_kernel<scalar_t, kVec, kGemma><<<grid, block, 0, stream>>>(
          o, row_index(out), x, row_index(input), w, d, inv_d, eps);
    } else {
      rms_norm_kernel<scalar_t, 1, kGemma><<<grid, block, 0, stream>>>(
          o, row_index(out), x, row_index(input), w, d, inv_d, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <bool kGemma>
void fused_add_rms_norm_impl(const char* op, at::Tensor& input,
                             at::Tensor& residual, const at::Tensor& weight,
                             double epsilon) {
  const int64_t rows =
      check_norm_args(op, input, "input", residual, "residual", weight);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int d = static_cast<int>(input.size(-1));
  const float inv_d = 1.0f / static_cast<float>(d);
  const float eps = static_cast<float>(epsilon);
  const bool vec = vectorizable16(input) && vectorizable16(residual) &&
                   vectorizable16(weight);
  const cudaStream_t stream = current_stream();
  VLLM_DISPATCH_FLOAT_TYPES(input.scalar_type(), op, [&] {
    constexpr int kVec = Vec16<scalar_t>::kSize;
    const int vec_size = vec ? kVec : 1;
    const dim3 grid(static_cast<unsigned>(rows));
    const dim3 block(threads_for(d / vec_size, 1024));
    auto* x = reinterpret_cast<scalar_t*>(input.data_ptr());
    auto* r = reinterpret_cast<scalar_t*>(residual.data_ptr());
    const auto* w = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    if (vec) {
      fused_add_rms_norm_kernel<scalar_t, kVec, kGemma>
          <<<grid, block, 0, stream>>>(x, row_index(input), r,
                                       row_index(residual), w, d, inv_d, eps);
    } else {
      fused_add_rms_norm_kernel<scalar_t, 1, kGemma>
          <<<grid, block, 0, stream>>>(x, row_index(input), r,
                                       row_index(residual), w, d, inv_d, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace vllm

void rms_norm(at::Tensor& out, const at::Tensor& input,
              const at::Tensor& weight, double epsilon) {
  vllm::rms_norm_impl<false>("rms_norm", out, input, weight, epsilon);
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual,
                        const at::Tensor& weight, double epsilon) {
  vllm::fused_add_rms_norm_impl<false>("fused_add_rms_norm", input, residual,
                                       weight, epsilon);
}

void gemma_rms_norm(at::Tensor& out, const at::Tensor& input,
                    const at::Tensor& weight, double epsilon) {
  vllm::rms_norm_impl<true>("gemma_rms_norm", out, input, weight, epsilon);
}

void gemma_fused_add_rms_norm(at::Tensor& input, at::Tensor& residual,
                              const at::Tensor& weight, double epsilon) {
  vllm::fused_add_rms_norm_impl<true>("gemma_fused_add_rms_norm", input,
                                      residual, weight, epsilon);
}
