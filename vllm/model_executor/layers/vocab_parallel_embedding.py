"""Token embeddings and the LM head, sharded over the vocabulary.

Rank r holds rows ``[r * per_rank, (r + 1) * per_rank)`` of the
``[vocab, hidden]`` table, ``per_rank = ceil(vocab / tp)``; the last shard is
zero-padded. At tensor-parallel size 1 the weight is exactly
``[vocab, hidden]``, as in the checkpoint.
"""
import torch
import torch.nn.functional as F
from torch import nn

from vllm.distributed import (get_tensor_model_parallel_rank,
                              get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.utils import set_weight_attrs


class VocabParallelEmbedding(nn.Module):
    """``forward(input_ids [T]) -> [T, embedding_dim]``. Ids outside this
    rank's shard give zeros locally; the all-reduce fills them in."""

    def __init__(self,
                 num_embeddings: int,
                 embedding_dim: int,
                 params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start_index = (self.tp_rank *
                                  self.num_embeddings_per_partition)
        self.vocab_end_index = min(
            self.vocab_start_index + self.num_embeddings_per_partition,
            num_embeddings)
        self.weight = nn.Parameter(torch.empty(
            self.num_embeddings_per_partition,
            embedding_dim,
            dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {
            "weight_loader": self.weight_loader,
            "output_dim": 0
        })

    def weight_loader(self, param: nn.Parameter,
                      loaded_weight: torch.Tensor) -> None:
        """Take this rank's rows of the full ``[vocab, ...]`` tensor."""
        expected = (self.num_embeddings, *param.shape[1:])
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(
                f"shape mismatch: checkpoint tensor has shape "
                f"{tuple(loaded_weight.shape)}, expected {expected} "
                f"(this rank's parameter has shape {tuple(param.shape)})")
        num_rows = self.vocab_end_index - self.vocab_start_index
        shard = loaded_weight.narrow(0, self.vocab_start_index, num_rows)
        with torch.no_grad():
            param.data[:num_rows].copy_(shard)
            param.data[num_rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = ((input_ids >= self.vocab_start_index) &
                    (input_ids < self.vocab_end_index))
        local_ids = torch.where(in_shard, input_ids - self.vocab_start_index, 0)
        output = F.embedding(local_ids, self.weight)
        output = output.masked_fill(~in_shard.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(output)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, "
                f"embedding_dim={self.embedding_dim}, "
                f"per_partition={self.num_embeddings_per_partition}, "
                f"tp_size={self.tp_size}")


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection ``hidden -> vocab``, same weight layout as the
    embedding. Apply it through ``LogitsProcessor``; tie it to the input
    embedding with ``tie_weights(embed_tokens)``."""

    def __init__(self,
                 num_embeddings: int,
                 embedding_dim: int,
                 bias: bool = False,
                 params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype, prefix)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(
                self.num_embeddings_per_partition,
                dtype=params_dtype or torch.get_default_dtype()),
                                     requires_grad=False)
            set_weight_attrs(self.bias, {
                "weight_loader": self.weight_loader,
                "output_dim": 0
            })

    def tie_weights(self,
                    embed_tokens: VocabParallelEmbedding) -> "ParallelLMHead":
        """Share the embedding's weight (tie_word_embeddings)."""
        if (embed_tokens.num_embeddings_per_partition
                != self.num_embeddings_per_partition
                or embed_tokens.embedding_dim != self.embedding_dim):
            raise ValueError("Cannot tie the LM head to an embedding of a "
                             "different shape.")
        self.weight = embed_tokens.weight
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor, "
                           "not called directly.")
