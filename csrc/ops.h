// C++ entry points of the CUDA kernels. Each is registered as the CUDA
// implementation of an operator `torch.ops._C.<name>` in torch_bindings.cpp,
// with the schema written there; the Python wrappers are in
// vllm/_custom_ops.py. Tensor arguments that are written are non-const.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

// key/value [T, Hkv, D] (rows may be strided) -> their slots of
// key_cache/value_cache [N, block_size, Hkv, D]; slot_mapping [T] int64,
// slots < 0 are skipped.
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                       at::Tensor& key_cache, at::Tensor& value_cache,
                       const at::Tensor& slot_mapping);

// out [B, H, D] <- attention of query [B, H, D] (one token per sequence) over
// the seq_lens[b] cached tokens in the blocks of block_tables[b].
void paged_attention_decode(at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& key_cache,
                            const at::Tensor& value_cache,
                            const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale,
                            int64_t max_seq_len);

// out <- RMSNorm(input) * weight (Llama numerics).
void rms_norm(at::Tensor& out, const at::Tensor& input,
              const at::Tensor& weight, double epsilon);

// residual <- input + residual; input <- RMSNorm(residual) * weight.
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual,
                        const at::Tensor& weight, double epsilon);

// Gemma's variants: the weight scales as (1 + weight), in float32.
void gemma_rms_norm(at::Tensor& out, const at::Tensor& input,
                    const at::Tensor& weight, double epsilon);
void gemma_fused_add_rms_norm(at::Tensor& input, at::Tensor& residual,
                              const at::Tensor& weight, double epsilon);

// Rotates query [T, H*D] and key [T, Hkv*D] in place by the cos/sin of
// cos_sin_cache [max_position, rot_dim] at positions [T].
void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      std::optional<at::Tensor> key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox);

// out [T, d] <- act(input[:, :d]) * input[:, d:].
void silu_and_mul(at::Tensor& out, const at::Tensor& input);
void gelu_and_mul(at::Tensor& out, const at::Tensor& input);
void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input);

// out [M, N] <- input [M, K] @ weight[N, K]^T (F.linear without bias) for
// M <= 4, float16/bfloat16, K % 8 == 0: the memory-bound decode GEMV.
void gemv(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);
