// Paged attention for decode steps: each sequence has one query token that
// attends over its whole context of seq_lens[b] tokens, stored in the paged
// KV cache [num_blocks, block_size, Hkv, D] at the blocks of block_tables[b].
//
// Algorithm (flash-decoding, GQA-aware):
//  * Grid (Hkv * head_groups, B, num_partitions). A CTA takes one kv head,
//    up to GROUP (<= 8) of the query heads that share it, one sequence and
//    one partition of `partition_size` context tokens, so each K/V row is
//    read from memory once for all those query heads. CTAs whose partition
//    starts past the sequence's end exit at once (max_seq_len only sizes the
//    grid); for an empty sequence partition 0 writes zeros.
//  * Lanes: a "row group" of LANES threads reads one token's K (then V) row
//    of D elements in 16-byte vectors, lane i taking vectors i, i + LANES,
//    ...; a warp covers 32 / LANES tokens per load, and each thread keeps
//    UNROLL tokens' loads in flight. LANES is the smallest power of two
//    (>= 4, >= GROUP) that keeps the per-thread query (then accumulator)
//    registers at <= 64 floats.
//  * Phase 1 (scores): each thread dots its slices of the GROUP query rows
//    (float32, pre-scaled by scale * log2(e)) with the K row; a "transpose"
//    butterfly reduces the GROUP partial sums across the row group with
//    GROUP - 1 + log2(LANES / GROUP) shuffles instead of
//    GROUP * log2(LANES): at each step a lane keeps half of the values and
//    sends the other half to its partner. The logits go to shared memory.
//  * Softmax: one warp per query head takes the max over the partition,
//    then replaces each logit by exp2(logit - max) and sums them.
//  * Phase 2 (values): each thread accumulates p * V for its slices of D and
//    all GROUP heads in float32; the row groups' sums are added with warp
//    shuffles, then across warps in shared memory, and divided by the sum.
//  * If the sequence fits in one partition the CTA writes the output
//    directly. Otherwise it writes its normalised partial output, max and
//    sum (float32), and the partitions are merged:
//    out = sum_p w_p * o_p / sum_p w_p with w_p = sum_p * exp2(max_p - max),
//    by the last CTA of the sequence and head group to finish (an atomic
//    arrival counter per CTA column, reset by that CTA: one kernel, no
//    second launch), or by paged_attention_reduce_kernel when there is no
//    counter buffer (more than kMaxPartitionSize partitions, or one could
//    not be allocated during CUDA-graph capture).
#pragma once

#include "../cuda_utils.cuh"
#include "paged_attention_decode.h"

namespace vllm {
namespace decode {

// Threads per K/V row: see the header comment.
constexpr int lanes_per_row(int chunks, int group, int vec) {
  int lanes = group > 4 ? group : 4;
  while (lanes < 32 && group * ((chunks + lanes - 1) / lanes) * vec > 64) {
    lanes *= 2;
  }
  return lanes;
}

template <typename T, int D, int GROUP>
struct Layout {
  static constexpr int kVec = Vec16<T>::kSize;  // elements per 16 bytes
  static_assert(D % kVec == 0, "head size must be a whole number of vectors");
  static constexpr int kChunks = D / kVec;  // 16-byte vectors per row
  static constexpr int kLanes = lanes_per_row(kChunks, GROUP, kVec);
  static_assert(kLanes >= GROUP && kLanes <= 32 && 32 % kLanes == 0,
                "bad lanes per row");
  static constexpr int kChunksPerLane = (kChunks + kLanes - 1) / kLanes;
  static constexpr int kRows = kNumThreads / kLanes;  // rows per CTA step
  static constexpr int kUnroll = kChunksPerLane >= 8 ? 1 : 8 / kChunksPerLane;
  // Logits [GROUP][kMaxPartitionSize], later the per-warp partial outputs
  // [kNumWarps][GROUP][D].
  static constexpr int kLogitFloats = GROUP * kMaxPartitionSize;
  static constexpr int kPartialFloats = kNumWarps * GROUP * D;
  static constexpr int kSmemFloats =
      kLogitFloats > kPartialFloats ? kLogitFloats : kPartialFloats;
};

// Sums v[0..N) over the LANES lanes of a row group (lane = index in it).
// Returns, on every lane, the total of value number lane / (LANES / N).
template <int N, int OFFSET>
struct TransposeReduce {
  template <int M>
  static __device__ __forceinline__ void run(float (&v)[M], const int lane) {
    static_assert(OFFSET >= 1, "more values than lanes");
    const bool upper = (lane & OFFSET) != 0;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      // Keep half the values, send the other half to the partner (which
      // keeps that half): both end up with half as many, twice-summed.
      const float send = upper ? v[i] : v[i + N / 2];
      const float keep = upper ? v[i + N / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, OFFSET);
    }
    TransposeReduce<N / 2, OFFSET / 2>::run(v, lane);
  }
};

template <int OFFSET>
struct TransposeReduce<1, OFFSET> {
  template <int M>
  static __device__ __forceinline__ void run(float (&v)[M], const int) {
#pragma unroll
    for (int offset = OFFSET; offset >= 1; offset /= 2) {
      v[0] += __shfl_xor_sync(kFullMask, v[0], offset);
    }
  }
};

// Merges the ``parts`` partitions of query heads first_head .. + num_q of
// one sequence: out = sum_i w_i o_i / sum_i w_i, w_i = sum_i * exp2(max_i -
// max). The partials were written by other CTAs: read through L2 (__ldcg).
// s_weights holds GROUP x kMaxPartitionSize floats (parts must fit).
template <typename T, int D, int GROUP>
__device__ void merge_partitions(const Params& p, const int seq,
                                 const int first_head, const int num_q,
                                 const int parts, float* s_weights,
                                 float* s_total) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t first =
      (static_cast<int64_t>(seq) * p.num_heads + first_head) *
      p.num_partitions;
  for (int g = warp; g < num_q; g += kNumWarps) {  // a warp per head
    const float* max_logits = p.max_logits + first + g * p.num_partitions;
    const float* exp_sums = p.exp_sums + first + g * p.num_partitions;
    float max_logit = -INFINITY;
    for (int i = lane; i < parts; i += 32) {
      max_logit = fmaxf(max_logit, __ldcg(max_logits + i));
    }
    max_logit = warp_max(max_logit);
    float total = 0.0f;
    for (int i = lane; i < parts; i += 32) {
      const float w = __ldcg(exp_sums + i) * exp2f(__ldcg(max_logits + i) -
                                                    max_logit);
      s_weights[g * kMaxPartitionSize + i] = w;
      total += w;
    }
    total = warp_sum(total);
    if (lane == 0) s_total[g] = total;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < num_q * D; i += kNumThreads) {
    const int g = i / D;
    const int d = i % D;
    const float* partial = p.tmp_out + (first + g * p.num_partitions) * D + d;
    const float* weights = s_weights + g * kMaxPartitionSize;
    float o = 0.0f;
    for (int k = 0; k < parts; ++k) o += weights[k] * __ldcg(partial + k * D);
    out[seq * p.out_stride_b + (first_head + g) * p.out_stride_h + d] =
        from_float<T>(o / s_total[g]);
  }
}

template <typename T, int D, int GROUP>
__global__ void __launch_bounds__(kNumThreads)
    paged_attention_decode_kernel(const Params p) {
  using L = Layout<T, D, GROUP>;
  constexpr int kVec = L::kVec;
  constexpr int kChunks = L::kChunks;
  constexpr int kLanes = L::kLanes;
  constexpr int kCpl = L::kChunksPerLane;
  constexpr int kRows = L::kRows;
  constexpr int kUnroll = L::kUnroll;
  constexpr int kStep = kRows * kUnroll;  // tokens per loop iteration
  constexpr int kLanesPerHead = kLanes / GROUP;

  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int kv_head = blockIdx.x / p.head_groups;
  const int group_idx = blockIdx.x % p.head_groups;
  const int first_head = kv_head * p.queries_per_kv + group_idx * GROUP;
  // Query heads served here (GROUP, less in a ragged last group).
  const int num_q = min(GROUP, p.queries_per_kv - group_idx * GROUP);
  const int seq_len = p.seq_lens[seq];
  const int start = part * p.partition_size;
  T* out = static_cast<T*>(p.out);

  if (start >= seq_len) {
    if (part == 0) {  // empty sequence (e.g. CUDA-graph padding): zeros
      for (int i = threadIdx.x; i < num_q * D; i += kNumThreads) {
        const int head = first_head + i / D;
        out[seq * p.out_stride_b + head * p.out_stride_h + i % D] =
            from_float<T>(0.0f);
      }
    }
    return;
  }
  // max_seq_len (which sized the grid) must bound every seq_len.
  CUDA_KERNEL_ASSERT(seq_len <= p.num_partitions * p.partition_size);
  const int n = min(p.partition_size, seq_len - start);  // tokens here
  const bool single_partition = seq_len <= p.partition_size;

  __shared__ int s_blocks[kMaxPartitionSize / kMinBlockSize];
  __shared__ float s_max[GROUP];
  __shared__ float s_sum[GROUP];
  __shared__ float s_buf[L::kSmemFloats];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int row = tid / kLanes;       // row group: one token at a time
  const int row_lane = tid % kLanes;  // lane within the row group

  // The partition's physical blocks (start is a multiple of block_size).
  {
    const int first_block = start >> p.log2_block_size;
    const int num_blocks =
        ((start + n - 1) >> p.log2_block_size) - first_block + 1;
    const int* table = p.block_tables + seq * p.block_tables_stride;
    for (int i = tid; i < num_blocks; i += kNumThreads) {
      const int idx = first_block + i;
      s_blocks[i] = idx < p.max_blocks_per_seq ? table[idx] : 0;
    }
  }

  // This thread's slices of the GROUP query rows, pre-scaled.
  float q[GROUP][kCpl][kVec];
  {
    const T* query = static_cast<const T*>(p.query) + seq * p.q_stride_b;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        const int c = row_lane + j * kLanes;
        if (g < num_q && c < kChunks) {
          load_floats<T, kVec>(
              query + (first_head + g) * p.q_stride_h + c * kVec, q[g][j]);
#pragma unroll
          for (int e = 0; e < kVec; ++e) q[g][j][e] *= p.scale_log2;
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) q[g][j][e] = 0.0f;
        }
      }
    }
  }
  __syncthreads();  // s_blocks

  const int block_mask = p.block_size - 1;
  // Element offset of token t (of this partition) in the cache.
  const auto token_offset = [&](const int t) -> int64_t {
    return static_cast<int64_t>(s_blocks[t >> p.log2_block_size]) *
               p.cache_block_stride +
           static_cast<int64_t>(t & block_mask) * p.cache_slot_stride;
  };
  // Loads the kUnroll rows of this thread's row group for iteration `base`.
  const auto load_rows = [&](const T* cache, const int base,
                             uint4 (&raw)[kUnroll][kCpl]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kRows + row;
      const T* ptr = t < n ? cache + token_offset(t) : nullptr;
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        const int c = row_lane + j * kLanes;
        raw[u][j] = (ptr != nullptr && c < kChunks) ? load16(ptr + c * kVec)
                                                     : make_uint4(0, 0, 0, 0);
      }
    }
  };

  // ---- Phase 1: logits of the partition's tokens, in shared memory.
  float* s_logits = s_buf;  // [GROUP][kMaxPartitionSize]
  const T* k_cache = static_cast<const T*>(p.key_cache) + kv_head * D;
  // NOTE: the loop bounds are the same for the whole CTA, so every lane
  // reaches the shuffles; rows past the end compute and discard.
  for (int base = 0; base < n; base += kStep) {
    uint4 k_raw[kUnroll][kCpl];
    load_rows(k_cache, base, k_raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float dot[GROUP];
#pragma unroll
      for (int g = 0; g < GROUP; ++g) dot[g] = 0.0f;
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        float k[kVec];
        unpack16<T>(k_raw[u][j], k);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) dot[g] += q[g][j][e] * k[e];
        }
      }
      TransposeReduce<GROUP, kLanes / 2>::run(dot, row_lane);
      const int t = base + u * kRows + row;
      if (t < n && row_lane % kLanesPerHead == 0) {
        s_logits[(row_lane / kLanesPerHead) * kMaxPartitionSize + t] = dot[0];
      }
    }
  }
  __syncthreads();

  // ---- Softmax within the partition: logits -> exp2(logit - max).
  for (int g = warp; g < num_q; g += kNumWarps) {
    float* logits = s_logits + g * kMaxPartitionSize;
    float max_logit = -INFINITY;
    for (int t = lane; t < n; t += 32) max_logit = fmaxf(max_logit, logits[t]);
    max_logit = warp_max(max_logit);
    float sum = 0.0f;
    for (int t = lane; t < n; t += 32) {
      const float e = exp2f(logits[t] - max_logit);
      logits[t] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      s_max[g] = max_logit;
      s_sum[g] = sum;
    }
  }
  __syncthreads();

  // ---- Phase 2: sum of p * V over the partition, per query head.
  // (Heads g >= num_q have logits 0 and results that are never stored.)
  float acc[GROUP][kCpl][kVec];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int j = 0; j < kCpl; ++j) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][j][e] = 0.0f;
    }
  }
  const T* v_cache = static_cast<const T*>(p.value_cache) + kv_head * D;
  for (int base = 0; base < n; base += kStep) {
    uint4 v_raw[kUnroll][kCpl];
    load_rows(v_cache, base, v_raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kRows + row;
      if (t >= n) continue;
      float prob[GROUP];
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        prob[g] = s_logits[g * kMaxPartitionSize + t];
      }
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        float v[kVec];
        unpack16<T>(v_raw[u][j], v);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[g][j][e] += prob[g] * v[e];
        }
      }
    }
  }

  // Add up the row groups of each warp...
#pragma unroll
  for (int offset = kLanes; offset < 32; offset *= 2) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          acc[g][j][e] += __shfl_xor_sync(kFullMask, acc[g][j][e], offset);
        }
      }
    }
  }
  __syncthreads();  // every thread is done with the logits: reuse s_buf
  float* s_partial = s_buf;  // [kNumWarps][GROUP][D]
  if (lane < kLanes) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      if (g >= num_q) break;
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        const int c = lane + j * kLanes;
        if (c < kChunks) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            s_partial[(warp * GROUP + g) * D + c * kVec + e] = acc[g][j][e];
          }
        }
      }
    }
  }
  __syncthreads();

  // ... then the warps, normalise and store.
  for (int i = tid; i < num_q * D; i += kNumThreads) {
    const int g = i / D;
    const int d = i % D;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) o += s_partial[(w * GROUP + g) * D + d];
    o /= s_sum[g];
    const int head = first_head + g;
    if (single_partition) {
      out[seq * p.out_stride_b + head * p.out_stride_h + d] = from_float<T>(o);
    } else {
      const int64_t idx =
          (static_cast<int64_t>(seq) * p.num_heads + head) * p.num_partitions +
          part;
      p.tmp_out[idx * D + d] = o;
      if (d == 0) {
        p.max_logits[idx] = s_max[g];
        p.exp_sums[idx] = s_sum[g];
      }
    }
  }
  if (single_partition || p.counters == nullptr) return;

  // The last CTA of this (sequence, head group) to finish merges all its
  // partitions: no second kernel. Each CTA publishes its partials, then
  // counts itself; the counter goes back to 0 for the next launch.
  __shared__ bool s_last;
  const int parts = (seq_len + p.partition_size - 1) / p.partition_size;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int* counter = p.counters + seq * gridDim.x + blockIdx.x;
    s_last = atomicAdd(counter, 1) == parts - 1;
    if (s_last) *counter = 0;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  merge_partitions<T, D, GROUP>(p, seq, first_head, num_q, parts, s_buf,
                                s_sum);
}

// Merges the partitions of one (sequence, query head): grid (H, B),
// dynamic shared memory num_partitions floats.
template <typename T>
__global__ void __launch_bounds__(kNumThreads)
    paged_attention_reduce_kernel(const Params p, const int head_size) {
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int seq_len = p.seq_lens[seq];
  const int parts = (seq_len + p.partition_size - 1) / p.partition_size;
  if (parts <= 1) return;  // the main kernel wrote the output directly

  extern __shared__ float s_weights[];  // [num_partitions]
  const int64_t base =
      (static_cast<int64_t>(seq) * p.num_heads + head) * p.num_partitions;
  float max_logit = -INFINITY;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) {
    max_logit = fmaxf(max_logit, p.max_logits[base + i]);
  }
  max_logit = block_max(max_logit);
  float total = 0.0f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) {
    const float w =
        p.exp_sums[base + i] * exp2f(p.max_logits[base + i] - max_logit);
    s_weights[i] = w;
    total += w;
  }
  total = block_sum(total);  // its barriers also publish s_weights
  const float inv_total = 1.0f / total;

  T* out =
      static_cast<T*>(p.out) + seq * p.out_stride_b + head * p.out_stride_h;
  const float* partial = p.tmp_out + base * head_size;
  for (int d = threadIdx.x; d < head_size; d += blockDim.x) {
    float o = 0.0f;
#pragma unroll 4
    for (int i = 0; i < parts; ++i) {
      o += s_weights[i] * partial[i * head_size + d];
    }
    out[d] = from_float<T>(o * inv_total);
  }
}

template <typename T, int D, int GROUP>
void launch_main_kernel(const Params& params, int num_seqs,
                        cudaStream_t stream) {
  const dim3 grid(params.num_kv_heads * params.head_groups, num_seqs,
                  params.num_partitions);
  paged_attention_decode_kernel<T, D, GROUP>
      <<<grid, kNumThreads, 0, stream>>>(params);
}

template <int D>
void launch_paged_attention_decode(const Params& params, c10::ScalarType dtype,
                                   int group_tile, int num_seqs,
                                   cudaStream_t stream) {
  VLLM_DISPATCH_FLOAT_TYPES(dtype, "paged_attention_decode", [&] {
    switch (group_tile) {
      case 1:
        launch_main_kernel<scalar_t, D, 1>(params, num_seqs, stream);
        break;
      case 2:
        launch_main_kernel<scalar_t, D, 2>(params, num_seqs, stream);
        break;
      case 4:
        launch_main_kernel<scalar_t, D, 4>(params, num_seqs, stream);
        break;
      case 8:
        launch_main_kernel<scalar_t, D, 8>(params, num_seqs, stream);
        break;
      default:
        TORCH_CHECK(false, "paged_attention_decode: bad group tile ",
                    group_tile);
    }
  });
}

}  // namespace decode
}  // namespace vllm
