"""OPT (Meta's Open Pre-trained Transformers) for causal LM, written for the
flattened batch.

``forward(input_ids [T], positions [T]) -> hidden_states [T, word_embed_dim]``.
What differs from Llama:

- learned absolute position embeddings, looked up at ``positions + 2`` (the
  offset Hugging Face's checkpoints were trained with: rows 0 and 1 unused);
- LayerNorm (no fused residual) and biases on every linear (``enable_bias``);
  the activation is ``config.activation_function`` (ReLU) on an unfused MLP;
- ``do_layer_norm_before=False`` (opt-350m) is post-LN: each sub-block's
  norm comes after its residual add, and the decoder has no final norm;
- ``word_embed_proj_dim != hidden_size`` (opt-350m): the embeddings are
  projected in (``project_in``) and the final hidden states back out
  (``project_out``); the tied LM head works in the word-embedding width.

Module names follow the checkpoint (``model.decoder.layers.N...``) except
that q/k/v are fused into ``qkv_proj``. Checkpoints whose names start at
``decoder.`` (facebook/opt-125m) load too.
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
                                               ReplicatedLinear,
                                               RowParallelLinear, divide)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead, VocabParallelEmbedding)
from vllm.model_executor.model_loader.weight_utils import load_weights_into

# Hugging Face's OPTLearnedPositionalEmbedding reads row ``position + 2``.
_POSITION_OFFSET = 2


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _layer_norm(config: Any, size: int) -> nn.LayerNorm:
    return nn.LayerNorm(size,
                        elementwise_affine=getattr(
                            config, "layer_norm_elementwise_affine", True))


class OPTLearnedPositionalEmbedding(VocabParallelEmbedding):
    """``forward(positions [T]) -> [T, hidden]``: row ``positions + 2``."""

    def __init__(self,
                 num_embeddings: int,
                 embedding_dim: int,
                 prefix: str = "") -> None:
        super().__init__(num_embeddings + _POSITION_OFFSET,
                         embedding_dim,
                         prefix=prefix)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + _POSITION_OFFSET)


class OPTAttention(nn.Module):

    def __init__(self,
                 embed_dim: int,
                 num_heads: int,
                 bias: bool = True,
                 prefix: str = "") -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = num_heads
        self.num_heads = divide(num_heads, tp_size)
        self.head_dim = divide(embed_dim, num_heads)
        self.q_size = self.num_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(embed_dim,
                                          self.head_dim,
                                          self.total_num_heads,
                                          bias=bias,
                                          prefix=_join(prefix, "qkv_proj"))
        self.out_proj = RowParallelLinear(embed_dim,
                                          embed_dim,
                                          bias=bias,
                                          prefix=_join(prefix, "out_proj"))
        self.attn = Attention(self.num_heads,
                              self.head_dim,
                              self.scaling,
                              prefix=_join(prefix, "attn"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        attn_output = self.attn(q, k, v)  # [T, H * D]
        output, _ = self.out_proj(attn_output)
        return output


class OPTDecoderLayer(nn.Module):

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        bias = getattr(config, "enable_bias", True)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(self.embed_dim,
                                      config.num_attention_heads,
                                      bias=bias,
                                      prefix=_join(prefix, "self_attn"))
        self.self_attn_layer_norm = _layer_norm(config, self.embed_dim)
        self.fc1 = ColumnParallelLinear(self.embed_dim,
                                        config.ffn_dim,
                                        bias=bias,
                                        prefix=_join(prefix, "fc1"))
        self.activation_fn = get_act_fn(config.activation_function)
        self.fc2 = RowParallelLinear(config.ffn_dim,
                                     self.embed_dim,
                                     bias=bias,
                                     prefix=_join(prefix, "fc2"))
        self.final_layer_norm = _layer_norm(config, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # self-attention block
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        # feed-forward block
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states, _ = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states)
        hidden_states, _ = self.fc2(hidden_states)
        hidden_states = residual + hidden_states
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class OPTDecoder(nn.Module):

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        word_dim = getattr(config, "word_embed_proj_dim", None) or hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size,
                                                   word_dim,
                                                   prefix=_join(
                                                       prefix, "embed_tokens"))
        self.embed_positions = OPTLearnedPositionalEmbedding(
            config.max_position_embeddings,
            hidden,
            prefix=_join(prefix, "embed_positions"))
        # opt-350m: embeddings narrower than the decoder
        self.project_in: ReplicatedLinear | None = None
        self.project_out: ReplicatedLinear | None = None
        if word_dim != hidden:
            self.project_in = ReplicatedLinear(word_dim,
                                               hidden,
                                               bias=False,
                                               prefix=_join(
                                                   prefix, "project_in"))
            self.project_out = ReplicatedLinear(hidden,
                                                word_dim,
                                                bias=False,
                                                prefix=_join(
                                                    prefix, "project_out"))
        # Post-LN models (do_layer_norm_before=False) have no final norm.
        self.final_layer_norm: nn.LayerNorm | None = None
        if config.do_layer_norm_before and not getattr(
                config, "_remove_final_layer_norm", False):
            self.final_layer_norm = _layer_norm(config, hidden)
        self.layers = nn.ModuleList([
            OPTDecoderLayer(config, prefix=_join(prefix, f"layers.{i}"))
            for i in range(config.num_hidden_layers)
        ])

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        inputs_embeds = self.embed_tokens(input_ids)  # [T, word_dim]
        if self.project_in is not None:
            inputs_embeds, _ = self.project_in(inputs_embeds)  # [T, hidden]
        hidden_states = inputs_embeds + self.embed_positions(positions)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states, _ = self.project_out(hidden_states)  # [T, word_dim]
        return hidden_states


class OPTModel(nn.Module):

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        self.decoder = OPTDecoder(config, prefix=_join(prefix, "decoder"))

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids, positions)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    # checkpoint module -> (fused module, shard id)
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
    ]

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config, prefix=_join(prefix, "model"))
        word_dim = (getattr(config, "word_embed_proj_dim", None)
                    or config.hidden_size)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
        self.lm_head = ParallelLMHead(config.vocab_size,
                                      word_dim,
                                      prefix=_join(prefix, "lm_head"))
        if self.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(
                self.model.decoder.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden_states [T, word_embed_dim]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, word_embed_dim] -> logits [N, vocab]."""
        return self.logits_processor(self.lm_head, hidden_states)

    def _renamed(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith("decoder."):  # saved from OPTModel
                name = "model." + name
            if name.startswith("lm_head.") and self.tie_word_embeddings:
                continue  # the LM head is the embedding
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str,
                                                   torch.Tensor]]) -> set[str]:
        """Load Hugging Face checkpoint tensors (names with or without the
        ``model.`` prefix); returns the names of the parameters loaded.
        Raises ValueError for a tensor with no parameter or a mis-shaped
        one."""
        return load_weights_into(self, self._renamed(weights),
                                 self.stacked_params_mapping)
