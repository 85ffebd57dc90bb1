"""GPT-2 for causal LM, written for the flattened batch.

``forward(input_ids [T], positions [T]) -> hidden_states [T, hidden]``.
What differs from Llama:

- learned absolute position embeddings (``wpe``, no offset);
- pre-LN blocks with LayerNorm (``layer_norm_epsilon``), biases everywhere,
  an unfused MLP with ``activation_function`` (``gelu_new``: tanh GELU);
- the checkpoint's linears are ``Conv1D``: weights stored ``[in, out]``,
  transposed here on load; q, k and v come fused in ``c_attn``;
- the LM head is tied to ``wte``.

Module names follow the checkpoint (``transformer.h.N.attn.c_attn`` ...).
Checkpoints whose names start at ``h.`` / ``wte.`` (saved from
``GPT2Model``, like the original openai-community/gpt2 files) load too; the
attention-mask buffers some of them store (``attn.bias``,
``attn.masked_bias``) are skipped.
"""
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from vllm.attention.layer import Attention
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import (ColumnParallelLinear,
                                               QKVParallelLinear,
                                               RowParallelLinear, divide)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead, VocabParallelEmbedding)
from vllm.model_executor.model_loader.weight_utils import load_weights_into

# Modules stored as Hugging Face Conv1D ([in, out] weights).
_CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_gpt2_config(config: Any) -> None:
    """Refuse GPT-2 variants this implementation would compute wrongly."""
    for flag, why in (
        ("scale_attn_by_inverse_layer_idx",
         "scales each layer's attention scores by 1 / (layer index + 1)"),
        ("reorder_and_upcast_attn",
         "computes the attention scores in float32 in a different order"),
        ("add_cross_attention", "adds encoder-decoder cross-attention"),
    ):
        if getattr(config, flag, False):
            raise ValueError(
                f"GPT-2 with {flag}=True is not supported (it {why}); this "
                f"engine would give different results. Set {flag} to false "
                "in config.json only if the checkpoint was trained without "
                "it.")


class GPT2Attention(nn.Module):

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        hidden = config.hidden_size
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.num_heads = divide(self.total_num_heads, tp_size)
        self.head_dim = divide(hidden, self.total_num_heads)
        self.q_size = self.num_heads * self.head_dim
        self.scaling = (self.head_dim**-0.5
                        if getattr(config, "scale_attn_weights", True) else 1.0)
        self.c_attn = QKVParallelLinear(hidden,
                                        self.head_dim,
                                        self.total_num_heads,
                                        bias=True,
                                        prefix=_join(prefix, "c_attn"))
        self.c_proj = RowParallelLinear(hidden,
                                        hidden,
                                        bias=True,
                                        prefix=_join(prefix, "c_proj"))
        self.attn = Attention(self.num_heads,
                              self.head_dim,
                              self.scaling,
                              prefix=_join(prefix, "attn"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden_states)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        attn_output = self.attn(q, k, v)  # [T, H * D]
        output, _ = self.c_proj(attn_output)
        return output


class GPT2MLP(nn.Module):

    def __init__(self,
                 intermediate_size: int,
                 config: Any,
                 prefix: str = "") -> None:
        super().__init__()
        hidden = config.hidden_size
        self.c_fc = ColumnParallelLinear(hidden,
                                         intermediate_size,
                                         bias=True,
                                         prefix=_join(prefix, "c_fc"))
        self.act = get_act_fn(config.activation_function)
        self.c_proj = RowParallelLinear(intermediate_size,
                                        hidden,
                                        bias=True,
                                        prefix=_join(prefix, "c_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.c_fc(x)
        x = self.act(x)
        x, _ = self.c_proj(x)
        return x


class GPT2Block(nn.Module):

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        hidden = config.hidden_size
        inner_dim = getattr(config, "n_inner", None) or 4 * hidden
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(config, prefix=_join(prefix, "attn"))
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(inner_dim, config, prefix=_join(prefix, "mlp"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states


class GPT2Model(nn.Module):

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        hidden = config.hidden_size
        self.wte = VocabParallelEmbedding(config.vocab_size,
                                          hidden,
                                          prefix=_join(prefix, "wte"))
        self.wpe = VocabParallelEmbedding(config.max_position_embeddings,
                                          hidden,
                                          prefix=_join(prefix, "wpe"))
        self.h = nn.ModuleList([
            GPT2Block(config, prefix=_join(prefix, f"h.{i}"))
            for i in range(config.num_hidden_layers)
        ])
        self.ln_f = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        check_gpt2_config(config)
        self.config = config
        self.transformer = GPT2Model(config,
                                     prefix=_join(prefix, "transformer"))
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
        self.lm_head = ParallelLMHead(config.vocab_size,
                                      config.hidden_size,
                                      prefix=_join(prefix, "lm_head"))
        if self.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden_states [T, hidden]."""
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden] -> logits [N, vocab]."""
        return self.logits_processor(self.lm_head, hidden_states)

    def _renamed(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            parts = name.split(".")
            # causal-mask buffers of old checkpoints, not parameters
            if (len(parts) >= 2 and parts[-2] == "attn"
                    and parts[-1] in ("bias", "masked_bias")):
                continue
            if name.startswith("lm_head."):
                if self.tie_word_embeddings:
                    continue  # the LM head is wte
            elif not name.startswith("transformer."):  # saved from GPT2Model
                name = "transformer." + name
            if (parts[-1] == "weight" and len(parts) >= 2
                    and parts[-2] in _CONV1D_MODULES):
                tensor = tensor.t()  # Conv1D [in, out] -> [out, in]
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str,
                                                   torch.Tensor]]) -> set[str]:
        """Load Hugging Face checkpoint tensors (names with or without the
        ``transformer.`` prefix; fused ``c_attn`` is split into q, k, v by
        the layer's loader); returns the names of the parameters loaded.
        Raises ValueError for a tensor with no parameter or a mis-shaped
        one."""
        return load_weights_into(self, self._renamed(weights))
