// The paged_attention_decode op: input checks, launch configuration and the
// float32 workspace of the partitioned (flash-decoding) path. The kernels and
// the algorithm are in paged_attention_decode.cuh.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../cuda_utils.cuh"
#include "../ops.h"
#include "../torch_utils.h"
#include "paged_attention_decode.cuh"

namespace vllm {
namespace decode {

// Defined in decode_hd*.cu.
extern template void launch_paged_attention_decode<64>(const Params&,
                                                       c10::ScalarType, int,
                                                       int, cudaStream_t);
extern template void launch_paged_attention_decode<80>(const Params&,
                                                       c10::ScalarType, int,
                                                       int, cudaStream_t);
extern template void launch_paged_attention_decode<96>(const Params&,
                                                       c10::ScalarType, int,
                                                       int, cudaStream_t);
extern template void launch_paged_attention_decode<128>(const Params&,
                                                        c10::ScalarType, int,
                                                        int, cudaStream_t);
extern template void launch_paged_attention_decode<256>(const Params&,
                                                        c10::ScalarType, int,
                                                        int, cudaStream_t);

// Query heads per CTA: the queries of one kv head, rounded up to a power of
// two, at most kMaxGroup.
inline int group_tile_for(int queries_per_kv) {
  int tile = 1;
  while (tile < queries_per_kv && tile < kMaxGroup) tile *= 2;
  return tile;
}

// The largest partition size (512 ... 64) whose grid still gives every SM
// two CTAs; long contexts of few sequences get more, shorter partitions.
inline int partition_size_for(int64_t ctas_per_partition, int64_t max_seq_len) {
  const int64_t target = 2 * static_cast<int64_t>(sm_count());
  int size = kMaxPartitionSize;
  while (size > kMinPartitionSize) {
    const int64_t parts = (max_seq_len + size - 1) / size;
    if (ctas_per_partition * parts >= target) break;
    size /= 2;
  }
  return size;
}

// Arrival counters of the in-kernel merge (at least ``count``), zero
// between launches: the last CTA of each column resets its own. One buffer
// per device, grown only outside CUDA-graph capture and never freed (a
// captured graph keeps its pointer). nullptr when it is too small during
// capture: the reduce kernel merges instead.
inline int* merge_counters(const at::Tensor& like, int64_t count,
                           cudaStream_t stream) {
  static std::mutex mutex;
  static auto* buffers = new std::unordered_map<int, at::Tensor>();
  static auto* retired = new std::vector<at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[like.get_device()];
  if (!buffer.defined() || buffer.numel() < count) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    VLLM_CHECK(cudaStreamIsCapturing(stream, &status) == cudaSuccess,
               "paged_attention_decode: cudaStreamIsCapturing failed");
    if (status != cudaStreamCaptureStatusNone) return nullptr;
    if (buffer.defined()) retired->push_back(buffer);
    buffer = at::zeros({std::max<int64_t>(count, 1 << 14)},
                       like.options().dtype(at::kInt));
  }
  return buffer.data_ptr<int>();
}

}  // namespace decode
}  // namespace vllm

void paged_attention_decode(at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& key_cache,
                            const at::Tensor& value_cache,
                            const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale,
                            int64_t max_seq_len) {
  using namespace vllm::decode;
  constexpr const char* op = "paged_attention_decode";
  vllm::check_cuda(query, op, "query");
  vllm::check_same_device(out, query, op, "out");
  vllm::check_same_device(key_cache, query, op, "key_cache");
  vllm::check_same_device(value_cache, query, op, "value_cache");
  vllm::check_same_device(block_tables, query, op, "block_tables");
  vllm::check_same_device(seq_lens, query, op, "seq_lens");
  const auto dtype = vllm::check_float_dtype(query, op, "query");
  vllm::check_dtype(out, dtype, op, "out");
  vllm::check_dtype(key_cache, dtype, op, "key_cache");
  vllm::check_dtype(value_cache, dtype, op, "value_cache");
  vllm::check_dtype(block_tables, at::kInt, op, "block_tables");
  vllm::check_dtype(seq_lens, at::kInt, op, "seq_lens");

  VLLM_CHECK(query.dim() == 3, op,
             ": query must be [num_seqs, num_heads, head_size], got shape ",
             query.sizes());
  const int64_t num_seqs = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_size = query.size(2);
  VLLM_CHECK(out.sizes() == query.sizes(), op, ": out shape ", out.sizes(),
             " differs from query shape ", query.sizes());
  VLLM_CHECK(out.stride(2) == 1, op,
             ": out must be contiguous in its last dim, got strides ",
             out.strides());
  VLLM_CHECK(key_cache.dim() == 4, op,
             ": key_cache must be [num_blocks, block_size, num_kv_heads, "
             "head_size], got shape ",
             key_cache.sizes());
  VLLM_CHECK(value_cache.sizes() == key_cache.sizes(), op,
             ": value_cache shape ", value_cache.sizes(),
             " differs from key_cache shape ", key_cache.sizes());
  VLLM_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), op,
             ": key_cache and value_cache must be contiguous");
  VLLM_CHECK(vllm::is_aligned16(key_cache.data_ptr()) &&
                 vllm::is_aligned16(value_cache.data_ptr()),
             op, ": key_cache and value_cache must be 16-byte aligned");
  const int64_t block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  VLLM_CHECK(key_cache.size(3) == head_size, op, ": cache head size ",
             key_cache.size(3), " differs from the query's ", head_size);
  VLLM_CHECK(head_size == 64 || head_size == 80 || head_size == 96 ||
                 head_size == 128 || head_size == 256,
             op, ": head size ", head_size,
             " is not supported (supported: 64, 80, 96, 128, 256)");
  VLLM_CHECK(block_size == 8 || block_size == 16 || block_size == 32, op,
             ": block size ", block_size,
             " is not supported (supported: 8, 16, 32)");
  VLLM_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op,
             ": num_heads (", num_heads,
             ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  VLLM_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs &&
                 block_tables.stride(1) == 1,
             op, ": block_tables must be [num_seqs=", num_seqs,
             ", max_blocks] with contiguous rows, got shape ",
             block_tables.sizes(), " strides ", block_tables.strides());
  VLLM_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs &&
                 seq_lens.is_contiguous(),
             op, ": seq_lens must be a contiguous [num_seqs=", num_seqs,
             "] tensor, got shape ", seq_lens.sizes());
  VLLM_CHECK(max_seq_len >= 0, op, ": max_seq_len must be >= 0, got ",
             max_seq_len);
  if (num_seqs == 0) return;
  VLLM_CHECK(num_seqs <= 65535, op, ": at most 65535 sequences, got ",
             num_seqs);

  const c10::cuda::CUDAGuard device_guard(query.device());
  // 16-byte query loads need an aligned, row-contiguous query; anything
  // else (rare: a strided view) is copied once.
  const at::Tensor q =
      query.stride(2) == 1 && vllm::vectorizable16(query) ? query
                                                          : query.contiguous();

  const int queries_per_kv = static_cast<int>(num_heads / num_kv_heads);
  const int group_tile = group_tile_for(queries_per_kv);
  const int head_groups = (queries_per_kv + group_tile - 1) / group_tile;
  const int partition_size =
      partition_size_for(num_seqs * num_kv_heads * head_groups, max_seq_len);
  const int64_t num_partitions =
      std::max<int64_t>(1, (max_seq_len + partition_size - 1) / partition_size);
  // the reduce kernel keeps one float per partition in shared memory
  VLLM_CHECK(num_partitions <= 11 * 1024,
             op, ": max_seq_len ", max_seq_len, " is too long");

  Params params{};
  params.out = out.data_ptr();
  params.query = q.data_ptr();
  params.key_cache = key_cache.data_ptr();
  params.value_cache = value_cache.data_ptr();
  params.block_tables = block_tables.data_ptr<int>();
  params.seq_lens = seq_lens.data_ptr<int>();
  at::Tensor tmp_out, max_logits, exp_sums;
  if (num_partitions > 1) {
    // NOTE: plain allocations from the caching allocator: fine during
    // CUDA-graph capture (the graph's pool keeps them).
    const auto f32 = query.options().dtype(at::kFloat);
    tmp_out = at::empty({num_seqs, num_heads, num_partitions, head_size}, f32);
    max_logits = at::empty({num_seqs, num_heads, num_partitions}, f32);
    exp_sums = at::empty({num_seqs, num_heads, num_partitions}, f32);
    params.tmp_out = tmp_out.data_ptr<float>();
    params.max_logits = max_logits.data_ptr<float>();
    params.exp_sums = exp_sums.data_ptr<float>();
  }
  params.out_stride_b = out.stride(0);
  params.out_stride_h = out.stride(1);
  params.q_stride_b = q.stride(0);
  params.q_stride_h = q.stride(1);
  params.cache_block_stride = key_cache.stride(0);
  params.cache_slot_stride = key_cache.stride(1);
  params.block_tables_stride = block_tables.stride(0);
  params.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  params.num_heads = static_cast<int>(num_heads);
  params.num_kv_heads = static_cast<int>(num_kv_heads);
  params.queries_per_kv = queries_per_kv;
  params.head_groups = head_groups;
  params.block_size = static_cast<int>(block_size);
  params.log2_block_size = block_size == 8 ? 3 : block_size == 16 ? 4 : 5;
  params.partition_size = partition_size;
  params.num_partitions = static_cast<int>(num_partitions);
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const cudaStream_t stream = vllm::current_stream();
  if (num_partitions > 1 && num_partitions <= kMaxPartitionSize) {
    params.counters = merge_counters(
        query, num_seqs * num_kv_heads * head_groups, stream);
  }
  const int seqs = static_cast<int>(num_seqs);
  switch (head_size) {
    case 64:
      launch_paged_attention_decode<64>(params, dtype, group_tile, seqs,
                                        stream);
      break;
    case 80:
      launch_paged_attention_decode<80>(params, dtype, group_tile, seqs,
                                        stream);
      break;
    case 96:
      launch_paged_attention_decode<96>(params, dtype, group_tile, seqs,
                                        stream);
      break;
    case 128:
      launch_paged_attention_decode<128>(params, dtype, group_tile, seqs,
                                         stream);
      break;
    case 256:
      launch_paged_attention_decode<256>(params, dtype, group_tile, seqs,
                                         stream);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (num_partitions > 1 && params.counters == nullptr) {
    const dim3 grid(static_cast<unsigned>(num_heads),
                    static_cast<unsigned>(num_seqs));
    const size_t smem = static_cast<size_t>(num_partitions) * sizeof(float);
    VLLM_DISPATCH_FLOAT_TYPES(dtype, op, [&] {
      paged_attention_reduce_kernel<scalar_t>
          <<<grid, kNumThreads, smem, stream>>>(params,
                                                static_cast<int>(head_size));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}
