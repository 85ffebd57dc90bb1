"""Gemma (v1): Llama's layout with a GeGLU MLP (GELU, tanh approximation),
embeddings scaled by sqrt(hidden_size) in the model dtype, RMSNorms that
scale by ``1 + weight`` in float32, head_dim from the config and the LM head
always tied to the embedding."""
from typing import Any

import torch
from torch import nn

from vllm.logger import init_logger
from vllm.model_executor.layers.activation import GeluAndMul
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.linear import (MergedColumnParallelLinear,
                                               RowParallelLinear)
from vllm.model_executor.models.llama import (LlamaAttention, LlamaDecoderLayer,
                                              LlamaForCausalLM, LlamaModel,
                                              _join)

logger = init_logger(__name__)

_TANH_GELU = "gelu_pytorch_tanh"


def check_gemma_activation(config: Any) -> None:
    """vLLM's rule: Gemma's MLP uses the tanh approximation of GELU.
    ``hidden_activation``, when set, must say so; the first checkpoints'
    ``hidden_act: "gelu"`` is a known mistake of their configs and is
    overridden with a warning (transformers 5 reads ``hidden_act`` as
    written, so it runs exact GELU for those configs)."""
    hidden_activation = getattr(config, "hidden_activation", None)
    if hidden_activation is None:
        hidden_act = getattr(config, "hidden_act", _TANH_GELU)
        if hidden_act != _TANH_GELU:
            logger.warning(
                "Gemma's config sets hidden_act=%r; Gemma uses the tanh "
                "approximation of GELU (%s), which is what runs.", hidden_act,
                _TANH_GELU)
    elif hidden_activation != _TANH_GELU:
        raise ValueError(f"Gemma uses {_TANH_GELU!r} activations; got "
                         f"hidden_activation={hidden_activation!r}.")


class GemmaMLP(nn.Module):

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2,
            bias=False,
            prefix=_join(prefix, "gate_up_proj"))
        self.down_proj = RowParallelLinear(config.intermediate_size,
                                           config.hidden_size,
                                           bias=False,
                                           prefix=_join(prefix, "down_proj"))
        self.act_fn = GeluAndMul(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)  # [T, 2 * I/tp]
        x, _ = self.down_proj(self.act_fn(gate_up))  # [T, hidden]
        return x


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Llama's layer (and its forward) with Gemma's MLP and norms."""

    def __init__(self, config: Any, prefix: str = "") -> None:
        nn.Module.__init__(self)  # Llama's __init__ builds a silu MLP
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(
            config=config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings,
            bias=getattr(config, "attention_bias", False),
            prefix=_join(prefix, "self_attn"))
        mlp = GemmaMLP(config, prefix=_join(prefix, "mlp"))
        self.mlp = mlp  # type: ignore[assignment]  # LlamaMLP's interface
        self.input_layernorm = GemmaRMSNorm(config.hidden_size,
                                            eps=config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size,
                                                     eps=config.rms_norm_eps)


class GemmaModel(LlamaModel):
    layer_cls = GemmaDecoderLayer

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__(config, prefix)
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # HF multiplies by sqrt(hidden_size) rounded to the model dtype.
        normalizer = torch.tensor(config.hidden_size**0.5, dtype=torch.float32)
        self.register_buffer("normalizer",
                             normalizer.to(torch.get_default_dtype()),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids) * self.normalizer
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class GemmaForCausalLM(LlamaForCausalLM):
    model_cls = GemmaModel

    def __init__(self, config: Any, prefix: str = "") -> None:
        if not getattr(config, "tie_word_embeddings", True):
            raise ValueError("Gemma's LM head is its embedding; a config with "
                             "tie_word_embeddings=False is not supported.")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma with use_bidirectional_attention is an "
                             "encoder, not a causal LM; not supported.")
        check_gemma_activation(config)
        super().__init__(config, prefix)
