// Registers the kernels as operators of the `_C` namespace
// (torch.ops._C.<name>), CUDA implementations only, and defines the Python
// module entry point so that `import vllm._C` loads this library (and thereby
// runs the registrations). The schemas mark written tensors with `!`.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(_C, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  m.impl("reshape_and_cache", c10::kCUDA, &reshape_and_cache);

  m.def(
      "paged_attention_decode(Tensor(a!) out, Tensor query, Tensor key_cache, "
      "Tensor value_cache, Tensor block_tables, Tensor seq_lens, float scale, "
      "int max_seq_len) -> ()");
  m.impl("paged_attention_decode", c10::kCUDA, &paged_attention_decode);

  m.def(
      "rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float epsilon) "
      "-> ()");
  m.impl("rms_norm", c10::kCUDA, &rms_norm);

  m.def(
      "fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, "
      "Tensor weight, float epsilon) -> ()");
  m.impl("fused_add_rms_norm", c10::kCUDA, &fused_add_rms_norm);

  m.def(
      "gemma_rms_norm(Tensor(a!) out, Tensor input, Tensor weight, "
      "float epsilon) -> ()");
  m.impl("gemma_rms_norm", c10::kCUDA, &gemma_rms_norm);

  m.def(
      "gemma_fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, "
      "Tensor weight, float epsilon) -> ()");
  m.impl("gemma_fused_add_rms_norm", c10::kCUDA, &gemma_fused_add_rms_norm);

  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, "
      "int head_size, Tensor cos_sin_cache, bool is_neox) -> ()");
  m.impl("rotary_embedding", c10::kCUDA, &rotary_embedding);

  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.impl("silu_and_mul", c10::kCUDA, &silu_and_mul);

  m.def("gelu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.impl("gelu_and_mul", c10::kCUDA, &gelu_and_mul);

  m.def("gelu_tanh_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.impl("gelu_tanh_and_mul", c10::kCUDA, &gelu_tanh_and_mul);

  m.def("gemv(Tensor(a!) out, Tensor input, Tensor weight) -> ()");
  m.impl("gemv", c10::kCUDA, &gemv);
}

// `import vllm._C` looks for PyInit__C. The module itself is empty: the
// operators are reached through torch.ops._C once the library is loaded.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",     // m_name
      nullptr,  // m_doc
      -1,       // m_size: no per-module state
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module);
}
