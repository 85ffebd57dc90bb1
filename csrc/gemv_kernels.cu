// Skinny GEMM ("GEMV") for decode batches of 1..4 rows:
//   out[m, n] = sum_k input[m, k] * weight[n, k]      (F.linear, no bias)
// with float32 accumulation and one rounding to the dtype at the end.
//
// At M <= 4 a linear layer only has to stream its weight [N, K] from device
// memory once; the arithmetic is negligible. cuBLAS reaches ~98% of copy
// bandwidth on large weights but only ~75% on 4096x4096 / 6144x4096 ones
// (splitK reduce kernels, partial waves), which this kernel targets:
//
// - Each warp owns kRows consecutive output columns n (weight rows) and
//   walks their whole K: lane l reads 16-byte vectors l, l + 32, l + 64, ...
//   of each row, so one warp instruction reads 512 contiguous bytes.
// - A lane's loads of a chunk (kLoadsPerLane 16-byte vectors over the
//   warp's rows) are written before any of them is used, so that many
//   bytes are in flight to hide the memory latency (ptxas interleaves them
//   with the math as registers allow: at M = 1, 64 registers, it issues 4
//   ahead, about 64 KB in flight per SM at 32 warps). They use
//   ld.global.nc.L1::no_allocate: the weight is read exactly once, so it
//   must not push the input out of L1.
// - The input rows (M * K elements: 8 KB at M = 1, K = 4096) are re-read
//   by every warp through L1 with ordinary read-only loads; with kRows = 2
//   (M >= 3) each input vector serves two weight rows, halving that L1
//   traffic.
// - Per-lane partial sums are reduced with warp shuffles and written by
//   one lane each. No shared memory, no atomics, no second kernel.
//
// Requirements (checked on the host): float16 or bfloat16; weight [N, K]
// contiguous; input [M, K] and out [M, N] with contiguous rows (out's row
// stride is free); K a multiple of 8 (whole 16-byte vectors); input rows
// and weight 16-byte aligned.
#include "cuda_utils.cuh"
#include "ops.h"
#include "torch_utils.h"

#include <limits>

namespace vllm {

constexpr int kGemvThreads = 256;  // 8 warps per CTA
constexpr int kVecElems = 8;       // 16-byte vector of fp16/bf16
// 16-byte weight loads per lane per chunk (split over the warp's rows):
// 4 KB per warp, 128 bytes of registers per lane.
constexpr int kLoadsPerLane = 8;

// A 16-byte load that bypasses L1 (streamed data read once).
__device__ __forceinline__ uint4 load16_stream(const uint4* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

// Adds vectors [first, first + 32 * kLoads) step 32 (one per load slot) of
// each weight row, times the input rows, to acc. kTail: some of those
// vectors may be >= num_vecs and are skipped (the last, partial chunk).
template <typename T, int M, int kRows, int kLoads, bool kTail>
__device__ __forceinline__ void gemv_chunk(float (&acc)[M][kRows],
                                           const uint4* const (&w)[kRows],
                                           const uint4* const (&x)[M],
                                           const int first,
                                           const int num_vecs) {
  // All loads first, then the math: kRows * kLoads loads in flight.
  uint4 wv[kRows][kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int v = first + 32 * u;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (!kTail || v < num_vecs) wv[r][u] = load16_stream(w[r] + v);
    }
  }
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int v = first + 32 * u;
    if (!kTail || v < num_vecs) {
      float wf[kRows][kVecElems];
#pragma unroll
      for (int r = 0; r < kRows; ++r) unpack16<T>(wv[r][u], wf[r]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[kVecElems];
        unpack16<T>(__ldg(x[m] + v), xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int e = 0; e < kVecElems; ++e) {
            acc[m][r] = fmaf(xf[e], wf[r][e], acc[m][r]);
          }
        }
      }
    }
  }
}

// Grid: one warp per kRows weight rows, kGemvThreads / 32 warps per CTA.
template <typename T, int M, int kRows>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(T* __restrict__ out, const int64_t out_stride,
                const T* __restrict__ input, const int64_t in_stride,
                const T* __restrict__ weight, const int n, const int k) {
  constexpr int kLoads = kLoadsPerLane / kRows;
  constexpr int kChunk = 32 * kLoads;  // vectors per row per chunk
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * (kGemvThreads / 32) + threadIdx.x / 32;
  const int row0 = warp * kRows;
  if (row0 >= n) return;  // whole warps only: the shuffles stay full

  const uint4* w[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    // A row past the end (odd n) re-reads the last row; it is not written.
    const int64_t row = min(row0 + r, n - 1);
    w[r] = reinterpret_cast<const uint4*>(weight + row * k);
  }
  const uint4* x[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    x[m] = reinterpret_cast<const uint4*>(input + m * in_stride);
  }

  float acc[M][kRows];
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[m][r] = 0.0f;
  }

  const int num_vecs = k / kVecElems;
  const int full = num_vecs - num_vecs % kChunk;  // vectors in whole chunks
  for (int base = 0; base < full; base += kChunk) {
    gemv_chunk<T, M, kRows, kLoads, false>(acc, w, x, base + lane, num_vecs);
  }
  if (full < num_vecs) {
    gemv_chunk<T, M, kRows, kLoads, true>(acc, w, x, full + lane, num_vecs);
  }

  // After the butterfly every lane holds every sum; lane m * kRows + r
  // writes out[m, row0 + r].
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float sum = warp_sum(acc[m][r]);
      if (lane == m * kRows + r && row0 + r < n) {
        out[m * out_stride + row0 + r] = from_float<T>(sum);
      }
    }
  }
}

template <typename T, int M>
void launch_gemv(at::Tensor& out, const at::Tensor& input,
                 const at::Tensor& weight, cudaStream_t stream) {
  // Two weight rows per warp once the input has 3+ rows: see the top.
  constexpr int kRows = M >= 3 ? 2 : 1;
  constexpr int kRowsPerCta = kRows * kGemvThreads / 32;
  const int n = static_cast<int>(weight.size(0));
  const int k = static_cast<int>(weight.size(1));
  const auto grid = static_cast<unsigned>(
      (static_cast<int64_t>(n) + kRowsPerCta - 1) / kRowsPerCta);
  gemv_kernel<T, M, kRows><<<grid, kGemvThreads, 0, stream>>>(
      reinterpret_cast<T*>(out.data_ptr()), out.stride(0),
      reinterpret_cast<const T*>(input.data_ptr()), input.stride(0),
      reinterpret_cast<const T*>(weight.data_ptr()), n, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void gemv_dispatch_m(at::Tensor& out, const at::Tensor& input,
                     const at::Tensor& weight, cudaStream_t stream) {
  switch (input.size(0)) {
    case 1:
      launch_gemv<T, 1>(out, input, weight, stream);
      break;
    case 2:
      launch_gemv<T, 2>(out, input, weight, stream);
      break;
    case 3:
      launch_gemv<T, 3>(out, input, weight, stream);
      break;
    default:
      launch_gemv<T, 4>(out, input, weight, stream);
      break;
  }
}

}  // namespace vllm

void gemv(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  using namespace vllm;
  constexpr const char* op = "gemv";
  check_cuda(input, op, "input");
  check_same_device(weight, input, op, "weight");
  check_same_device(out, input, op, "out");
  const auto dtype = input.scalar_type();
  VLLM_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op,
             ": unsupported dtype ", dtype, "; expected float16 or bfloat16");
  check_dtype(weight, dtype, op, "weight");
  check_dtype(out, dtype, op, "out");
  VLLM_CHECK(input.dim() == 2 && weight.dim() == 2 && out.dim() == 2, op,
             ": expected input [M, K], weight [N, K], out [M, N], got "
             "shapes ",
             input.sizes(), ", ", weight.sizes(), ", ", out.sizes());
  const int64_t m = input.size(0);
  const int64_t k = input.size(1);
  const int64_t n = weight.size(0);
  VLLM_CHECK(weight.size(1) == k && out.size(0) == m && out.size(1) == n, op,
             ": expected input [M, K], weight [N, K], out [M, N], got "
             "shapes ",
             input.sizes(), ", ", weight.sizes(), ", ", out.sizes());
  VLLM_CHECK(m <= 4, op, ": at most 4 input rows, got ", m);
  VLLM_CHECK(k % 8 == 0, op, ": K must be a multiple of 8, got ", k);
  VLLM_CHECK(n <= std::numeric_limits<int32_t>::max() &&
                 k <= std::numeric_limits<int32_t>::max(),
             op, ": weight too large, shape ", weight.sizes());
  VLLM_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  VLLM_CHECK(input.stride(1) == 1 && out.stride(1) == 1, op,
             ": input and out rows must be contiguous, got strides ",
             input.strides(), " and ", out.strides());
  // 16-byte vectors: aligned starts and (with several rows) a row stride
  // of whole vectors; a single row's stride is never used.
  VLLM_CHECK(is_aligned16(input.data_ptr()) &&
                 is_aligned16(weight.data_ptr()) &&
                 (m <= 1 || input.stride(0) % 8 == 0),
             op, ": input rows and weight must be 16-byte aligned");
  if (m == 0 || n == 0) return;

  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = current_stream();
  if (dtype == at::kHalf) {
    gemv_dispatch_m<__half>(out, input, weight, stream);
  } else {
    gemv_dispatch_m<__nv_bfloat16>(out, input, weight, stream);
  }
}
