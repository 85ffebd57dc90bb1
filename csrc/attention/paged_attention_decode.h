// Interface between the paged_attention_decode op (host code, in
// paged_attention_decode.cu) and the kernels (paged_attention_decode.cuh),
// which are instantiated per head size in decode_hd*.cu so that those
// compile in parallel.
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vllm {
namespace decode {

constexpr int kNumThreads = 128;  // threads per CTA of both kernels
constexpr int kNumWarps = kNumThreads / 32;
// Context tokens one CTA attends over: 512, or down to 64 when the grid would
// otherwise leave SMs idle (few sequences). At batch 1 under a CUDA graph the
// grid is sized for the capture limit, and a short context is then spread
// over a few CTAs of 64 tokens: a shorter serial chain for each.
constexpr int kMaxPartitionSize = 512;
constexpr int kMinPartitionSize = 64;
constexpr int kMinBlockSize = 8;
// Query heads per CTA; more queries per kv head use several CTAs.
constexpr int kMaxGroup = 8;

// Everything the kernels need; strides are in elements.
struct Params {
  void* out;                // [B, H, D]
  const void* query;        // [B, H, D], last dim contiguous
  const void* key_cache;    // [N, block_size, Hkv, D], contiguous
  const void* value_cache;  // [N, block_size, Hkv, D], contiguous
  const int* block_tables;  // [B, max_blocks_per_seq]
  const int* seq_lens;      // [B]
  // Workspace, only when num_partitions > 1:
  float* tmp_out;     // [B, H, num_partitions, D] normalised partial outputs
  float* max_logits;  // [B, H, num_partitions] max logit (log2 units)
  float* exp_sums;    // [B, H, num_partitions] sum of exp2(logit - max)
  // [B, gridDim.x] arrival counts, zero between launches; nullptr: the
  // reduce kernel merges the partitions.
  int* counters;
  int64_t out_stride_b;
  int64_t out_stride_h;
  int64_t q_stride_b;
  int64_t q_stride_h;
  int64_t cache_block_stride;  // block_size * Hkv * D
  int64_t cache_slot_stride;   // Hkv * D
  int64_t block_tables_stride;
  int max_blocks_per_seq;
  int num_heads;
  int num_kv_heads;
  int queries_per_kv;  // H / Hkv
  int head_groups;     // CTAs per kv head: ceil(queries_per_kv / group tile)
  int block_size;
  int log2_block_size;
  int partition_size;
  int num_partitions;
  float scale_log2;  // softmax scale * log2(e): logits are in log2 units
};

// Launches the main kernel for head size D, grid
// (num_kv_heads * head_groups, B, num_partitions). group_tile: query heads
// per CTA (1, 2, 4 or 8).
template <int D>
void launch_paged_attention_decode(const Params& params, c10::ScalarType dtype,
                                   int group_tile, int num_seqs,
                                   cudaStream_t stream);

}  // namespace decode
}  // namespace vllm
