// Gated activations of gated MLPs: out[:, :] = act(x[:, :d]) * x[:, d:], with
// the numerics of vllm/model_executor/layers/activation.py, where
// `F.silu(gate) * up` rounds act(gate) to the input dtype before the
// product (float32 math inside each op, as torch's CUDA kernels do):
//   silu:       g / (1 + exp(-g))
//   gelu:       0.5 * g * (1 + erf(g / sqrt(2)))
//   gelu_tanh:  0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g^3)))
// (gelu_tanh is evaluated as g * sigmoid(2 * inner), the same function.)
// Element-wise: grid (rows, column chunks), one 16-byte vector (or one
// element when unaligned) per thread.
#include "cuda_utils.cuh"
#include "ops.h"
#include "torch_utils.h"

#include <limits>

namespace vllm {

struct SiluOp {
  static __device__ __forceinline__ float apply(float g) {
    return g / (1.0f + expf(-g));
  }
};

struct GeluOp {
  static __device__ __forceinline__ float apply(float g) {
    constexpr float kInvSqrt2 = 0.70710678118654752440f;
    return 0.5f * g * (1.0f + erff(g * kInvSqrt2));
  }
};

struct GeluTanhOp {
  static __device__ __forceinline__ float apply(float g) {
    constexpr float kSqrt2OverPi = 0.79788456080286535588f;
    constexpr float kKappa = 0.044715f;
    const float inner = kSqrt2OverPi * (g + kKappa * (g * g * g));
    // 0.5 * (1 + tanh(y)) == 1 / (1 + exp(-2y)). Written this way because
    // --use_fast_math turns tanhf into tanh.approx (about 11 bits).
    return g / (1.0f + expf(-2.0f * inner));
  }
};

template <typename T, int VEC, typename Act>
__global__ void act_and_mul_kernel(T* __restrict__ out,
                                   const T* __restrict__ input,
                                   const int64_t out_stride,
                                   const int64_t in_stride, const int d) {
  const int64_t row = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;  // vector index
  if (i >= d / VEC) return;
  const T* gate = input + row * in_stride + i * VEC;
  float g[VEC], u[VEC];
  load_floats<T, VEC>(gate, g);
  load_floats<T, VEC>(gate + d, u);
#pragma unroll
  for (int e = 0; e < VEC; ++e) g[e] = round_to<T>(Act::apply(g[e])) * u[e];
  store_floats<T, VEC>(out + row * out_stride + i * VEC, g);
}

template <typename Act>
void act_and_mul(const char* op, at::Tensor& out, const at::Tensor& input) {
  check_cuda(input, op, "input");
  check_same_device(out, input, op, "out");
  const auto dtype = vllm::check_float_dtype(input, op, "input");
  check_dtype(out, dtype, op, "out");
  VLLM_CHECK(input.dim() == 2 && out.dim() == 2, op,
             ": input must be [num_tokens, 2 * d] and out [num_tokens, d], "
             "got shapes ",
             input.sizes(), " and ", out.sizes());
  const int64_t rows = input.size(0);
  const int64_t d = out.size(1);
  VLLM_CHECK(out.size(0) == rows && input.size(1) == 2 * d, op,
             ": input must be [num_tokens, 2 * d] and out [num_tokens, d], "
             "got shapes ",
             input.sizes(), " and ", out.sizes());
  VLLM_CHECK(input.stride(1) == 1 && out.stride(1) == 1, op,
             ": input and out must be contiguous in their last dim, got "
             "strides ",
             input.strides(), " and ", out.strides());
  VLLM_CHECK(rows <= std::numeric_limits<int32_t>::max() &&
                 d <= std::numeric_limits<int32_t>::max() / 2,
             op, ": tensors too large");
  if (rows == 0 || d == 0) return;

  const c10::cuda::CUDAGuard device_guard(input.device());
  const bool vec = vectorizable16(input) && vectorizable16(out);
  const cudaStream_t stream = current_stream();
  VLLM_DISPATCH_FLOAT_TYPES(dtype, op, [&] {
    constexpr int kVec = Vec16<scalar_t>::kSize;
    const int64_t num_vecs = d / (vec ? kVec : 1);
    const int threads = threads_for(num_vecs, 256);
    const dim3 grid(static_cast<unsigned>(rows),
                    static_cast<unsigned>((num_vecs + threads - 1) / threads));
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x = reinterpret_cast<const scalar_t*>(input.data_ptr());
    if (vec) {
      act_and_mul_kernel<scalar_t, kVec, Act><<<grid, threads, 0, stream>>>(
          o, x, out.stride(0), input.stride(0), static_cast<int>(d));
    } else {
      act_and_mul_kernel<scalar_t, 1, Act><<<grid, threads, 0, stream>>>(
          o, x, out.stride(0), input.stride(0), static_cast<int>(d));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace vllm

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  vllm::act_and_mul<vllm::SiluOp>("silu_and_mul", out, input);
}

void gelu_and_mul(at::Tensor& out, const at::Tensor& input) {
  vllm::act_and_mul<vllm::GeluOp>("gelu_and_mul", out, input);
}

void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input) {
  vllm::act_and_mul<vllm::GeluTanhOp>("gelu_tanh_and_mul", out, input);
}
