// Host-side helpers of the ops: input checks, layout tests, the current
// stream and device facts.
#pragma once

// NOTE: ATen/cuda/CUDAContext.h is deliberately not included: it needs the
// cuBLAS/cuSPARSE/cuSOLVER headers, which an nvcc-only CUDA install lacks.
// The c10 headers give the current stream, the device guard and the checks.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "check.h"

#include <algorithm>
#include <cstdint>

namespace vllm {

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  VLLM_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ",
             t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref,
                              const char* op, const char* name) {
  check_cuda(t, op, name);
  VLLM_CHECK(t.device() == ref.device(), op, ": ", name, " is on ",
             t.device(), " but the other tensors are on ", ref.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype,
                        const char* op, const char* name) {
  VLLM_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype,
             ", got ", t.scalar_type());
}

// The dtype of `t`, which every kernel supports: float32, float16, bfloat16.
inline at::ScalarType check_float_dtype(const at::Tensor& t, const char* op,
                                        const char* name) {
  const auto dtype = t.scalar_type();
  VLLM_CHECK(dtype == at::kFloat || dtype == at::kHalf ||
                dtype == at::kBFloat16,
             op, ": ", name, " has unsupported dtype ", dtype,
             "; expected float32, float16 or bfloat16");
  return dtype;
}

inline bool is_aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// True when `t` (last dim contiguous) can be read in 16-byte vectors along
// its last dim: aligned start, and every other stride a whole number of
// vectors.
inline bool vectorizable16(const at::Tensor& t) {
  const int64_t esize = t.element_size();
  if (!is_aligned16(t.data_ptr()) || (t.size(-1) * esize) % 16 != 0) {
    return false;
  }
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if ((t.stride(i) * esize) % 16 != 0) return false;
  }
  return true;
}

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

// Streaming multiprocessors of the current device (queried once per device).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  if (device < 0 || device >= kMaxDevices) return 132;
  if (counts[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device] = n;
  }
  return counts[device];
}

// Threads per CTA for `work` items: a multiple of 32 in [32, max_threads].
inline int threads_for(int64_t work, int max_threads) {
  const int64_t rounded = (work + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(rounded, 32),
                                            max_threads));
}

}  // namespace vllm
