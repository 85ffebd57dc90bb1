"""Model layers against Hugging Face's math, and their weight loaders."""
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaRMSNorm,
                                                      LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

from vllm.distributed import parallel_state
from vllm.model_executor.layers import vocab_parallel_embedding
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear,
                                               MergedColumnParallelLinear,
                                               QKVParallelLinear,
                                               ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import (
    DynamicNTKScalingRotaryEmbedding, get_rope, rope_params_from_config)
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead, VocabParallelEmbedding)


def _load(param: Any, loaded: torch.Tensor, *shard_id) -> None:
    """Load ``loaded`` into ``param`` through its weight_loader."""
    param.weight_loader(param, loaded, *shard_id)


# ---------------------------------------------------------------- RMSNorm


def _hf_and_ours_norm(hidden: int, dtype: torch.dtype):
    hf = LlamaRMSNorm(hidden, eps=1e-5)
    ours = RMSNorm(hidden, eps=1e-5)
    weight = 1 + 0.1 * torch.randn(hidden)
    hf.weight.data.copy_(weight)
    ours.weight.data.copy_(weight)
    return hf.to(dtype), ours.to(dtype)


def test_rmsnorm_matches_hf_exactly_in_fp32():
    torch.manual_seed(0)
    hf, ours = _hf_and_ours_norm(64, torch.float32)
    x = torch.randn(7, 64) * 3
    assert torch.equal(ours(x), hf(x))


def test_rmsnorm_with_residual_adds_then_normalises():
    torch.manual_seed(1)
    hf, ours = _hf_and_ours_norm(64, torch.float32)
    x, residual = torch.randn(5, 64), torch.randn(5, 64)
    out, new_residual = ours(x, residual)
    assert torch.equal(new_residual, residual + x)
    assert torch.equal(out, hf(residual + x))


def test_rmsnorm_bf16_close_to_hf():
    torch.manual_seed(2)
    hf, ours = _hf_and_ours_norm(64, torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    residual = torch.randn(5, 64, dtype=torch.bfloat16)
    out, new_residual = ours(x, residual)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, hf(residual + x))
    torch.testing.assert_close(new_residual, residual + x)


# ---------------------------------------------------------------- rotary

_ROPE_CASES = {
    "default": None,
    "linear": {
        "rope_type": "linear",
        "factor": 4.0
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "dynamic": {
        "rope_type": "dynamic",
        "factor": 2.0
    },
}


def _rope_config(scaling: dict | None) -> LlamaConfig:
    params = {"rope_theta": 5000.0, "rope_type": "default"}
    if scaling is not None:
        params = {"rope_theta": 5000.0, **scaling}
    return LlamaConfig(hidden_size=64,
                       num_attention_heads=4,
                       num_key_value_heads=2,
                       head_dim=32,
                       max_position_embeddings=128,
                       rope_parameters=params)


@pytest.mark.parametrize("case", list(_ROPE_CASES))
def test_rotary_matches_hf(case: str):
    torch.manual_seed(3)
    config = _rope_config(_ROPE_CASES[case])
    base, scaling = rope_params_from_config(config)
    rope = get_rope(32, 32, config.max_position_embeddings, base, scaling)
    num_tokens, heads, kv_heads, d = 23, 4, 2, 32
    max_pos = rope.cos_sin_cache.shape[0]
    positions = torch.randint(0, max_pos, (num_tokens, ))
    if case == "dynamic":
        # HF rescales for the current length; ours is static for the
        # longest length: they agree when the batch reaches it.
        assert isinstance(rope, DynamicNTKScalingRotaryEmbedding)
        assert max_pos == 2 * config.max_position_embeddings
        positions[-1] = max_pos - 1
    q = torch.randn(num_tokens, heads * d)
    k = torch.randn(num_tokens, kv_heads * d)

    hf_rope = LlamaRotaryEmbedding(config)
    q_hf = q.view(1, num_tokens, heads, d).transpose(1, 2)
    k_hf = k.view(1, num_tokens, kv_heads, d).transpose(1, 2)
    cos, sin = hf_rope(q_hf, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    q_ref = q_ref.transpose(1, 2).reshape(num_tokens, heads * d)
    k_ref = k_ref.transpose(1, 2).reshape(num_tokens, kv_heads * d)

    q_out, k_out = rope(positions, q, k)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    # bit-identical, except dynamic: HF scales the base in float32 math
    tol = 1e-5 if case == "dynamic" else 0.0
    torch.testing.assert_close(q_out, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_out, k_ref, atol=tol, rtol=tol)


def test_rotary_bf16_keeps_dtype_and_is_close():
    torch.manual_seed(4)
    rope = get_rope(16, 16, 64, 10000.0, None)
    positions = torch.arange(10)
    q = torch.randn(10, 64)
    k = torch.randn(10, 32)
    q32, k32 = rope(positions, q, k)
    q16, k16 = rope(positions, q.bfloat16(), k.bfloat16())
    assert q16.dtype == torch.bfloat16 and k16.dtype == torch.bfloat16
    torch.testing.assert_close(q16.float(), q32, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(k16.float(), k32, atol=3e-2, rtol=2e-2)


def test_partial_rotary_passes_the_rest_through():
    rope = get_rope(16, 8, 32, 10000.0, None)
    q = torch.randn(3, 2 * 16)
    q_out, _ = rope(torch.tensor([0, 5, 9]), q, None)
    q3, o3 = q.view(3, 2, 16), q_out.view(3, 2, 16)
    assert torch.equal(o3[..., 8:], q3[..., 8:])
    assert torch.equal(o3[0], q3[0])  # position 0 is the identity
    assert not torch.allclose(o3[1, :, :8], q3[1, :, :8])


def test_rope_params_from_new_and_legacy_layouts():
    # transformers 5: everything in rope_parameters
    assert rope_params_from_config(_rope_config(None)) == (5000.0, None)
    base, scaling = rope_params_from_config(_rope_config(_ROPE_CASES["linear"]))
    assert base == 5000.0
    assert scaling == {"rope_type": "linear", "factor": 4.0}
    # transformers 4 / old config.json: rope_theta + rope_scaling {"type"}
    legacy = SimpleNamespace(rope_theta=1e6,
                             rope_scaling={
                                 "type": "dynamic",
                                 "factor": 2.0
                             },
                             max_position_embeddings=64)
    assert rope_params_from_config(legacy) == (1e6, {
        "rope_type": "dynamic",
        "factor": 2.0
    })
    assert rope_params_from_config(
        SimpleNamespace(rope_theta=500.0, rope_scaling=None)) == (500.0, None)
    # llama3 without original_max_position_embeddings: the config's
    legacy3 = SimpleNamespace(rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0
    },
                              max_position_embeddings=77)
    base, scaling = rope_params_from_config(legacy3)
    assert base == 10000.0
    assert scaling is not None
    assert scaling["original_max_position_embeddings"] == 77


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError, match="yarn.*supported"):
        get_rope(16, 16, 32, 10000.0, {"rope_type": "yarn", "factor": 2.0})


# ---------------------------------------------------------------- linear


def test_qkv_weight_loader_packs_q_k_v():
    torch.manual_seed(5)
    hidden, d, heads, kv_heads = 32, 8, 4, 2
    layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=True)
    q_w, k_w, v_w = (torch.randn(n * d, hidden)
                     for n in (heads, kv_heads, kv_heads))
    q_b, k_b, v_b = (torch.randn(n * d) for n in (heads, kv_heads, kv_heads))
    # out of order on purpose: each shard has its own place
    for shard, w, b in (("v", v_w, v_b), ("q", q_w, q_b), ("k", k_w, k_b)):
        _load(layer.weight, w, shard)
        _load(layer.bias, b, shard)
    assert torch.equal(layer.weight, torch.cat([q_w, k_w, v_w]))
    assert torch.equal(layer.bias, torch.cat([q_b, k_b, v_b]))
    x = torch.randn(3, hidden)
    out, out_bias = layer(x)
    assert out_bias is None
    q, k, v = out.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    torch.testing.assert_close(q, F.linear(x, q_w, q_b))
    torch.testing.assert_close(k, F.linear(x, k_w, k_b))
    torch.testing.assert_close(v, F.linear(x, v_w, v_b))

    fused = QKVParallelLinear(hidden, d, heads, kv_heads, bias=False)
    _load(fused.weight, torch.cat([q_w, k_w, v_w]))
    assert torch.equal(fused.weight, layer.weight)


def test_merged_column_weight_loader_packs_parts():
    torch.manual_seed(6)
    layer = MergedColumnParallelLinear(16, [24, 24], bias=False)
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    _load(layer.weight, up, 1)
    _load(layer.weight, gate, 0)
    assert torch.equal(layer.weight, torch.cat([gate, up]))
    x = torch.randn(4, 16)
    out, _ = layer(x)
    torch.testing.assert_close(SiluAndMul()(out),
                               F.silu(x @ gate.T) * (x @ up.T))
    with pytest.raises(ValueError, match="shard_id"):
        _load(layer.weight, gate, 2)


def test_misshaped_tensor_error_names_both_shapes():
    layer = QKVParallelLinear(32, 8, 4, 2, bias=False)
    with pytest.raises(ValueError) as err:
        _load(layer.weight, torch.zeros(15, 32), "k")
    assert "(15, 32)" in str(err.value) and "(16, 32)" in str(err.value)

    row = RowParallelLinear(24, 16, bias=False)
    with pytest.raises(ValueError) as err:
        _load(row.weight, torch.zeros(16, 25))
    assert "(16, 25)" in str(err.value) and "(16, 24)" in str(err.value)

    emb = VocabParallelEmbedding(11, 8)
    with pytest.raises(ValueError) as err:
        _load(emb.weight, torch.zeros(12, 8))
    assert "(12, 8)" in str(err.value) and "(11, 8)" in str(err.value)

    norm = RMSNorm(8)
    with pytest.raises(ValueError) as err:
        _load(norm.weight, torch.zeros(9))
    assert "(9,)" in str(err.value) and "(8,)" in str(err.value)


def test_plain_linears_and_skip_bias_add():
    torch.manual_seed(7)
    w, b = torch.randn(12, 8), torch.randn(12)
    x = torch.randn(5, 8)
    for cls in (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear):
        layer = cls(8, 12, bias=True)
        _load(layer.weight, w)
        _load(layer.bias, b)
        out, out_bias = layer(x)
        assert out_bias is None
        torch.testing.assert_close(out, F.linear(x, w, b))
        skip = cls(8, 12, bias=True, skip_bias_add=True)
        skip.load_state_dict(layer.state_dict())
        out, out_bias = skip(x)
        assert out_bias is skip.bias
        torch.testing.assert_close(out + out_bias, F.linear(x, w, b))


def test_embedding_lm_head_and_logits_processor():
    torch.manual_seed(8)
    table = torch.randn(11, 8)
    emb = VocabParallelEmbedding(11, 8)
    _load(emb.weight, table)
    ids = torch.tensor([0, 10, 3, 3])
    assert torch.equal(emb(ids), table[ids])
    head = ParallelLMHead(11, 8).tie_weights(emb)
    assert head.weight is emb.weight
    h = torch.randn(2, 8)
    torch.testing.assert_close(LogitsProcessor(11)(head, h), h @ table.T)
    capped = LogitsProcessor(11, scale=0.5, soft_cap=2.0)(head, h)
    torch.testing.assert_close(capped,
                               torch.tanh(h @ table.T / 2.0) * 2.0 * 0.5)


# ----------------------------------------------- tensor-parallel sharding


@pytest.fixture
def fake_tp(monkeypatch):
    """Build layers as rank ``r`` of a group of ``size`` (no collectives)."""

    def set_rank(rank: int, size: int) -> None:
        monkeypatch.setattr(parallel_state, "_TP_RANK", rank)
        monkeypatch.setattr(parallel_state, "_TP_WORLD_SIZE", size)

    return set_rank


@pytest.mark.parametrize("tp,kv_heads", [(2, 2), (2, 1), (4, 2)])
def test_qkv_sharding_recombines(fake_tp, tp: int, kv_heads: int):
    torch.manual_seed(9)
    hidden, d, heads = 16, 4, 4
    q_w = torch.randn(heads * d, hidden)
    k_w, v_w = torch.randn(kv_heads * d,
                           hidden), torch.randn(kv_heads * d, hidden)
    x = torch.randn(3, hidden)
    qs, ks, vs = [], [], []
    for rank in range(tp):
        fake_tp(rank, tp)
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=False)
        for shard, w in (("q", q_w), ("k", k_w), ("v", v_w)):
            _load(layer.weight, w, shard)
        q, k, v = F.linear(x, layer.weight).split(
            [layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    torch.testing.assert_close(torch.cat(qs, -1), x @ q_w.T)
    replicas = max(1, tp // kv_heads)
    # each KV head lives on `replicas` consecutive ranks
    torch.testing.assert_close(torch.cat(ks[::replicas], -1), x @ k_w.T)
    torch.testing.assert_close(torch.cat(vs[::replicas], -1), x @ v_w.T)


def test_column_merged_row_and_vocab_sharding_recombine(fake_tp, monkeypatch):
    torch.manual_seed(10)
    tp = 2
    gate, up = torch.randn(8, 6), torch.randn(8, 6)
    down = torch.randn(6, 8)
    table = torch.randn(11, 6)  # 11 rows over 2 ranks: 6 + 5 (+1 padding)
    x = torch.randn(3, 6)
    ids = torch.tensor([0, 5, 6, 10])
    monkeypatch.setattr(vocab_parallel_embedding,
                        "tensor_model_parallel_all_reduce", lambda t: t)
    acts, row_out, emb_out = [], torch.zeros(3, 6), torch.zeros(4, 6)
    for rank in range(tp):
        fake_tp(rank, tp)
        merged = MergedColumnParallelLinear(6, [8, 8], bias=False)
        _load(merged.weight, gate, 0)
        _load(merged.weight, up, 1)
        act = SiluAndMul()(F.linear(x, merged.weight))
        acts.append(act)
        row = RowParallelLinear(8, 6, bias=False)
        _load(row.weight, down)
        row_out += F.linear(act, row.weight)
        emb = VocabParallelEmbedding(11, 6)
        _load(emb.weight, table)
        assert emb.weight.shape == (6, 6)
        emb_out += emb(ids)
    full_act = F.silu(x @ gate.T) * (x @ up.T)
    torch.testing.assert_close(torch.cat(acts, -1), full_act)
    torch.testing.assert_close(row_out, full_act @ down.T)
    torch.testing.assert_close(emb_out, table[ids])
