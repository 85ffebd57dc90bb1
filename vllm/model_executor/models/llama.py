"""Llama (and Mistral) for causal LM, written for the flattened batch.

``forward(input_ids [T], positions [T]) -> hidden_states [T, hidden]``; the
attention layers read the batch layout from the forward context. The decoder
layers carry the residual stream beside the hidden states so that each
RMSNorm fuses the residual add (``norm(x, residual) -> (normed, x+residual)``).

Module names follow vLLM: q/k/v are fused into ``qkv_proj`` and gate/up into
``gate_up_proj`` (see ``packed_modules_mapping``); ``load_weights`` maps the
Hugging Face checkpoint names onto them.
"""
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vllm.attention.layer import Attention
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (MergedColumnParallelLinear,
                                               QKVParallelLinear,
                                               RowParallelLinear, divide)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import (
    get_rope, partial_rotary_factor_from_config, rope_params_from_config)
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead, VocabParallelEmbedding)
from vllm.model_executor.model_loader.weight_utils import load_weights_into


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_no_sliding_window(config: Any,
                            max_model_len: int | None = None) -> None:
    """Refuse configs whose sliding-window attention would take effect.

    A window of ``W`` tokens (HF: position ``q`` attends to keys in
    ``(q - W, q]``) changes nothing while every sequence is at most ``W``
    tokens long, so ``W >= max_model_len`` is dense attention and accepted.
    Without ``max_model_len`` the bound is the config's
    ``max_position_embeddings``, the longest context the engine allows.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        uses_window = "sliding_attention" in layer_types
    else:
        uses_window = getattr(config, "sliding_window", None) is not None
    if not uses_window:
        return
    window = getattr(config, "sliding_window", None)
    context = max_model_len or getattr(config, "max_position_embeddings", None)
    if window is not None and context is not None and window >= context:
        return
    what = ("max_model_len" if max_model_len else "max_position_embeddings")
    raise ValueError(
        f"Sliding-window attention is not supported yet: config."
        f"sliding_window={window} is smaller than the context "
        f"({what}={context}), so this engine, which attends over the full "
        "context, would give different results. Use a context no longer "
        "than the window, or a checkpoint whose config sets sliding_window "
        "to null.")


class LlamaMLP(nn.Module):

    def __init__(self,
                 hidden_size: int,
                 intermediate_size: int,
                 hidden_act: str,
                 bias: bool = False,
                 prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2,
            bias=bias,
            prefix=_join(prefix, "gate_up_proj"))
        self.down_proj = RowParallelLinear(intermediate_size,
                                           hidden_size,
                                           bias=bias,
                                           prefix=_join(prefix, "down_proj"))
        if hidden_act != "silu":
            raise ValueError(f"Unsupported activation: {hidden_act}. "
                             "Only silu is supported for now.")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)  # [T, 2 * I/tp]
        x = self.act_fn(gate_up)  # [T, I/tp]
        x, _ = self.down_proj(x)  # [T, hidden]
        return x


class LlamaAttention(nn.Module):

    def __init__(self,
                 config: Any,
                 hidden_size: int,
                 num_heads: int,
                 num_kv_heads: int,
                 max_position_embeddings: int,
                 bias: bool = False,
                 prefix: str = "") -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = num_heads
        self.num_heads = divide(num_heads, tp_size)
        self.total_num_kv_heads = num_kv_heads
        if num_kv_heads >= tp_size:
            divide(num_kv_heads, tp_size)
        else:
            # fewer KV heads than ranks: each is replicated
            divide(tp_size, num_kv_heads)
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.head_dim = (getattr(config, "head_dim", None)
                         or hidden_size // num_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5

        self.qkv_proj = QKVParallelLinear(hidden_size,
                                          self.head_dim,
                                          self.total_num_heads,
                                          self.total_num_kv_heads,
                                          bias=bias,
                                          prefix=_join(prefix, "qkv_proj"))
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim,
                                        hidden_size,
                                        bias=bias,
                                        prefix=_join(prefix, "o_proj"))
        base, rope_scaling = rope_params_from_config(config)
        rotary_dim = int(self.head_dim *
                         partial_rotary_factor_from_config(config))
        self.rotary_emb = get_rope(self.head_dim,
                                   rotary_dim=rotary_dim,
                                   max_position=max_position_embeddings,
                                   base=base,
                                   rope_scaling=rope_scaling,
                                   is_neox_style=True)
        self.attn = Attention(self.num_heads,
                              self.head_dim,
                              self.scaling,
                              num_kv_heads=self.num_kv_heads,
                              prefix=_join(prefix, "attn"))

    def forward(self, positions: torch.Tensor,
                hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)  # [T, H * D]
        output, _ = self.o_proj(attn_output)
        return output


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        num_heads = config.num_attention_heads
        self.self_attn = self.attention_cls(
            config=config,
            hidden_size=self.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None)
            or num_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings",
                                            8192),
            bias=getattr(config, "attention_bias", False),
            prefix=_join(prefix, "self_attn"))
        self.mlp = LlamaMLP(self.hidden_size,
                            config.intermediate_size,
                            config.hidden_act,
                            bias=getattr(config, "mlp_bias", False),
                            prefix=_join(prefix, "mlp"))
        self.input_layernorm = RMSNorm(self.hidden_size,
                                       eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(self.hidden_size,
                                                eps=config.rms_norm_eps)

    def forward(
            self, positions: torch.Tensor, hidden_states: torch.Tensor,
            residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(
                hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(
            hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class LlamaModel(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size,
                                                   config.hidden_size,
                                                   prefix=_join(
                                                       prefix, "embed_tokens"))
        self.layers = nn.ModuleList([
            self.layer_cls(config, prefix=_join(prefix, f"layers.{i}"))
            for i in range(config.num_hidden_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    # checkpoint module -> (fused module, shard id)
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]
    model_cls: type[LlamaModel] = LlamaModel

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        check_no_sliding_window(config)
        self.config = config
        self.model = self.model_cls(config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size,
                                      config.hidden_size,
                                      prefix=_join(prefix, "lm_head"))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size,
                                                scale=getattr(
                                                    config, "logit_scale", 1.0))

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden_states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden] -> logits [N, vocab]."""
        return self.logits_processor(self.lm_head, hidden_states)

    def _skip_weight(self, name: str) -> bool:
        # Old checkpoints store rotary buffers; ours are recomputed.
        if "rotary_emb." in name:
            return True
        # Tied: the LM head is the embedding (some checkpoints store both).
        return (getattr(self.config, "tie_word_embeddings", False)
                and name.startswith("lm_head."))

    def load_weights(self, weights: Iterable[tuple[str,
                                                   torch.Tensor]]) -> set[str]:
        """Load Hugging Face checkpoint tensors; returns the names of the
        parameters loaded. Raises ValueError for a tensor with no parameter or
        a mis-shaped one."""
        return load_weights_into(self, weights, self.stacked_params_mapping,
                                 self._skip_weight)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's architecture (with head_dim in its config); the
    sliding window of early checkpoints is refused (see
    ``check_no_sliding_window``)."""
