"""Hidden states -> logits over the vocabulary."""
import torch
import torch.nn.functional as F
from torch import nn

from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.layers.vocab_parallel_embedding import (
    VocabParallelEmbedding)


class LogitsProcessor(nn.Module):
    """``forward(lm_head, hidden_states [N, hidden]) -> logits [N, vocab]``.

    Computes the logits of exactly the rows it is given (the model runner
    selects the rows that sample first), gathers the vocabulary shards of all
    ranks, drops the padding columns beyond ``org_vocab_size``, then applies
    the optional soft cap ``tanh(logits / soft_cap) * soft_cap`` and
    ``scale``. The logits keep the model's dtype; the sampler casts them.
    """

    def __init__(self,
                 vocab_size: int,
                 org_vocab_size: int | None = None,
                 scale: float = 1.0,
                 soft_cap: float | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.org_vocab_size = org_vocab_size or vocab_size
        self.scale = scale
        self.soft_cap = soft_cap

    def forward(self,
                lm_head: VocabParallelEmbedding,
                hidden_states: torch.Tensor,
                embedding_bias: torch.Tensor | None = None) -> torch.Tensor:
        bias = embedding_bias
        if bias is None:
            bias = getattr(lm_head, "bias", None)
        logits = F.linear(hidden_states, lm_head.weight, bias)
        logits = tensor_model_parallel_all_gather(logits, dim=-1)
        if logits.shape[-1] != self.org_vocab_size:
            logits = logits[..., :self.org_vocab_size]
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, "
                f"org_vocab_size={self.org_vocab_size}, scale={self.scale}, "
                f"soft_cap={self.soft_cap}")
