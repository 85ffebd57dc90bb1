"""Tensor-parallel group state.

A single process is rank 0 of a group of size 1; the layers are written for any
size so that a multi-process executor only has to initialise the group.
"""
import torch.distributed as dist

_TP_WORLD_SIZE = 1
_TP_RANK = 0


def initialize_model_parallel(tensor_parallel_size: int = 1) -> None:
    """Record the tensor-parallel layout (one group spanning all ranks)."""
    global _TP_WORLD_SIZE, _TP_RANK
    if tensor_parallel_size > 1:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before "
                               "tensor_parallel_size > 1")
        _TP_RANK = dist.get_rank()
    _TP_WORLD_SIZE = tensor_parallel_size


def get_tensor_model_parallel_world_size() -> int:
    return _TP_WORLD_SIZE


def get_tensor_model_parallel_rank() -> int:
    return _TP_RANK
