"""Qwen2 / Qwen2.5: Llama's architecture with a bias on the q, k and v
projections (none on o_proj or the MLP). The LM head is tied when the config
says so (the small checkpoints); rope scaling comes from the config.

Sliding-window attention (``use_sliding_window`` with ``max_window_layers``)
is refused unless the window covers the whole context: HF's config turns
those keys into ``layer_types``, which ``check_no_sliding_window`` reads.
"""
from typing import Any

from vllm.model_executor.layers.linear import QKVParallelLinear
from vllm.model_executor.models.llama import (LlamaAttention, LlamaDecoderLayer,
                                              LlamaForCausalLM, LlamaModel,
                                              _join)


class Qwen2Attention(LlamaAttention):

    def __init__(self, config: Any, **kwargs: Any) -> None:
        kwargs["bias"] = False  # o_proj has none
        super().__init__(config, **kwargs)
        self.qkv_proj = QKVParallelLinear(kwargs["hidden_size"],
                                          self.head_dim,
                                          self.total_num_heads,
                                          self.total_num_kv_heads,
                                          bias=True,
                                          prefix=_join(kwargs.get("prefix", ""),
                                                       "qkv_proj"))


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2Model(LlamaModel):
    layer_cls = Qwen2DecoderLayer


class Qwen2ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2Model
