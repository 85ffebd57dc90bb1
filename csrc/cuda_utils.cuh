// Device-side helpers of the CUDA kernels: dtype dispatch, float
// conversions, 16-byte vectors, warp/block reductions. Only light c10
// headers, so that kernel-only files compile fast; the host-side tensor
// helpers are in torch_utils.h.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include "check.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace vllm {

// ---------------------------------------------------------------- dispatch

// Runs the lambda __VA_ARGS__ with `scalar_t` bound to the CUDA element type
// of DTYPE (float, __half or __nv_bfloat16); other dtypes fail with OP_NAME.
#define VLLM_DISPATCH_FLOAT_TYPES(DTYPE, OP_NAME, ...)                     \
  switch (DTYPE) {                                                         \
    case c10::ScalarType::Float: {                                          \
      using scalar_t = float;                                              \
      __VA_ARGS__();                                                       \
      break;                                                               \
    }                                                                      \
    case c10::ScalarType::Half: {                                           \
      using scalar_t = __half;                                             \
      __VA_ARGS__();                                                       \
      break;                                                               \
    }                                                                      \
    case c10::ScalarType::BFloat16: {                                       \
      using scalar_t = __nv_bfloat16;                                      \
      __VA_ARGS__();                                                       \
      break;                                                               \
    }                                                                      \
    default:                                                               \
      VLLM_CHECK(false, OP_NAME, ": unsupported dtype ", DTYPE,           \
                 "; expected float32, float16 or bfloat16");               \
  }

// ------------------------------------------------------------ conversions

// Exact widening to float and round-to-nearest-even narrowing, the same
// roundings as torch's `.to(dtype)`.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and widened back: what torch's result in dtype T holds.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// ------------------------------------------------------- 16-byte vectors

// Elements of T in one 16-byte vector (one LDG.128 / STG.128).
template <typename T>
struct Vec16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ uint4 load16(const void* ptr) {
  return *reinterpret_cast<const uint4*>(ptr);
}
__device__ __forceinline__ void store16(void* ptr, const uint4& v) {
  *reinterpret_cast<uint4*>(ptr) = v;
}

// Two 16-bit values packed in a 32-bit word, low element first.
__device__ __forceinline__ float2 unpack2(uint32_t w, __half) {
  __half2 h;
  memcpy(&h, &w, sizeof(h));
  return __half22float2(h);
}
__device__ __forceinline__ float2 unpack2(uint32_t w, __nv_bfloat16) {
  // bf16 is the upper half of a float32: widening is a shift.
  return make_float2(__uint_as_float(w << 16),
                     __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __half) {
  __half2 h = __floats2half2_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

// The Vec16<T>::kSize elements of a 16-byte vector, widened to float.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v,
                                         float (&out)[Vec16<T>::kSize]) {
  if constexpr (sizeof(T) == 4) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  } else {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = unpack2(words[i], T{});
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
}

// Vec16<T>::kSize floats rounded to T (round-to-nearest-even) and packed.
template <typename T>
__device__ __forceinline__ uint4 pack16(const float (&in)[Vec16<T>::kSize]) {
  uint4 v;
  if constexpr (sizeof(T) == 4) {
    v.x = __float_as_uint(in[0]);
    v.y = __float_as_uint(in[1]);
    v.z = __float_as_uint(in[2]);
    v.w = __float_as_uint(in[3]);
  } else {
    v.x = pack2(in[0], in[1], T{});
    v.y = pack2(in[2], in[3], T{});
    v.z = pack2(in[4], in[5], T{});
    v.w = pack2(in[6], in[7], T{});
  }
  return v;
}

// VEC elements at ptr, widened to float: one 16-byte access when VEC is
// Vec16<T>::kSize (ptr must then be 16-byte aligned), else VEC scalar ones.
template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[VEC]) {
  if constexpr (VEC == Vec16<T>::kSize) {
    unpack16<T>(load16(ptr), out);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(ptr[i]);
  }
}

// VEC floats rounded to T and stored at ptr (see load_floats).
template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* ptr, const float (&in)[VEC]) {
  if constexpr (VEC == Vec16<T>::kSize) {
    store16(ptr, pack16<T>(in));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) ptr[i] = from_float<T>(in[i]);
  }
}

// ------------------------------------------------------------- reductions

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  }
  return x;
}

// Sum (or max) of x over the CTA, returned to every thread. blockDim.x must
// be a multiple of 32 (at most 1024); every thread must call it.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float x) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int num_warps = blockDim.x / 32;
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < num_warps ? partial[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? warp_max(x) : warp_sum(x);
}

__device__ __forceinline__ float block_sum(float x) {
  return block_reduce<false>(x);
}
__device__ __forceinline__ float block_max(float x) {
  return block_reduce<true>(x);
}

}  // namespace vllm
