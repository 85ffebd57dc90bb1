// Instantiates the decode kernels for head size 256 (see
// paged_attention_decode.cuh); one file per head size so they build in
// parallel.
#include "paged_attention_decode.cuh"

template void vllm::decode::launch_paged_attention_decode<256>(
    const vllm::decode::Params&, c10::ScalarType, int, int, cudaStream_t);
