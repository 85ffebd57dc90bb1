from vllm.distributed.communication_op import (tensor_model_parallel_all_gather,
                                               tensor_model_parallel_all_reduce)
from vllm.distributed.parallel_state import (
    get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
    initialize_model_parallel)

__all__ = [
    "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size",
    "initialize_model_parallel", "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce"
]
