"""get_model: checkpoint discovery, error messages, dummy weights."""
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig,
                          PreTrainedModel)

from vllm.config import DeviceConfig
from vllm.model_executor.model_loader import get_model
from vllm.model_executor.models import ModelRegistry

from tests.models.test_model_forward import model_config_for, our_logits


def make_hf_model(seed: int = 0, **overrides) -> PreTrainedModel:
    kwargs: dict[str, Any] = dict(vocab_size=103,
                                  hidden_size=64,
                                  intermediate_size=96,
                                  num_hidden_layers=2,
                                  num_attention_heads=4,
                                  num_key_value_heads=2,
                                  max_position_embeddings=128,
                                  initializer_range=0.15,
                                  architectures=["LlamaForCausalLM"])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        model.model.norm.weight.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    make_hf_model().save_pretrained(path)
    return path


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file safetensors checkpoint with its tensors edited."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def _load(path: Path, **overrides) -> Any:
    return get_model(model_config_for(path, **overrides), DeviceConfig())


def test_missing_tensor_is_named(llama_dir: Path, tmp_path: Path):
    path = _edit_checkpoint(
        llama_dir, tmp_path / "m",
        lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="missing") as err:
        _load(path)
    assert "model.layers.1.self_attn.qkv_proj.weight" in str(err.value)
    assert "k_proj" in str(err.value)

    path = _edit_checkpoint(llama_dir, tmp_path / "n",
                            lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match="model.norm.weight"):
        _load(path)


def test_unexpected_tensor_is_named(llama_dir: Path, tmp_path: Path):

    def add(tensors):
        tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)

    path = _edit_checkpoint(llama_dir, tmp_path / "u", add)
    with pytest.raises(ValueError,
                       match="model.layers.0.mlp.extra_proj.weight"):
        _load(path)


def test_misshaped_tensor_is_named_with_both_shapes(llama_dir: Path,
                                                    tmp_path: Path):

    def shrink(tensors):
        name = "model.layers.0.mlp.down_proj.weight"
        tensors[name] = tensors[name][:, :-1].contiguous()

    path = _edit_checkpoint(llama_dir, tmp_path / "s", shrink)
    with pytest.raises(ValueError) as err:
        _load(path)
    message = str(err.value)
    assert "model.layers.0.mlp.down_proj.weight" in message
    assert "(64, 95)" in message and "(64, 96)" in message


def test_rotary_buffers_and_tied_lm_head_in_checkpoint_are_skipped(
        tmp_path: Path):
    hf = make_hf_model(seed=4, tie_word_embeddings=True)
    src = tmp_path / "src"
    hf.save_pretrained(src)

    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        # some tied checkpoints store the head as well
        tensors["lm_head.weight"] = torch.zeros(
            tensors["model.embed_tokens.weight"].shape)

    path = _edit_checkpoint(src, tmp_path / "dst", add)
    model = _load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, hf.model.embed_tokens.weight)


def test_sharded_index_is_respected(tmp_path: Path):
    hf = make_hf_model(seed=6)
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    # A stray weight file beside the shards (e.g. consolidated.safetensors)
    # must be ignored: its tensor names match nothing.
    save_file({"junk": torch.zeros(3)}, path / "consolidated.safetensors")
    model = _load(path)
    prompt = torch.arange(10)
    with torch.no_grad():
        ref = hf(prompt[None]).logits[0]
    torch.testing.assert_close(our_logits(model, [prompt])[0],
                               ref,
                               atol=1e-4,
                               rtol=0)

    # an index naming a file that is not there is an error
    next(path.glob("model-00001-of-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="model-00001-of"):
        _load(path)


def test_no_weight_files_names_folder_and_format(llama_dir: Path,
                                                 tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ValueError) as err:
        _load(empty)
    assert str(empty) in str(err.value) and "'auto'" in str(err.value)
    # a safetensors-only folder has nothing for load_format="pt"
    with pytest.raises(ValueError, match="load_format='pt'"):
        _load(llama_dir, load_format="pt")


def test_pt_format_reads_bin_files(tmp_path: Path):
    hf = make_hf_model(seed=7)
    path = tmp_path / "bin"
    hf.config.save_pretrained(path)
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    torch.save({"step": torch.tensor(1)}, path / "training_args.bin")
    model = _load(path, load_format="pt")
    assert torch.equal(model.model.norm.weight, hf.model.norm.weight)
    with pytest.raises(ValueError, match="load_format='safetensors'"):
        _load(path, load_format="safetensors")


def test_dummy_weights_are_small_seeded_and_finite_in_bf16(llama_dir: Path):
    model = _load(llama_dir, load_format="dummy", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert all(p.abs().max() <= 1e-3 for p in params.values())
    assert params["model.norm.weight"].std() > 0  # not left at ones
    again = _load(llama_dir, load_format="dummy", dtype=torch.bfloat16)
    assert all(
        torch.equal(p, q) for p, q in zip(params.values(), again.parameters()))
    other = _load(llama_dir, load_format="dummy", seed=1)
    assert not torch.equal(other.model.norm.weight.bfloat16(),
                           params["model.norm.weight"])
    logits = our_logits(model, [torch.arange(12)])[0]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert torch.get_default_dtype() == torch.float32


def test_unknown_architecture_lists_supported(llama_dir: Path):
    config = model_config_for(llama_dir).hf_config
    config.architectures = ["FooForCausalLM"]
    with pytest.raises(ValueError) as err:
        get_model(model_config_for(llama_dir, hf_config=config), DeviceConfig())
    assert "FooForCausalLM" in str(err.value)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(err.value)
        assert arch in ModelRegistry.get_supported_archs()


def test_sliding_window_is_refused_and_default_dtype_restored(tmp_path: Path):
    config = MistralConfig(vocab_size=64,
                           hidden_size=32,
                           intermediate_size=64,
                           num_hidden_layers=1,
                           num_attention_heads=2,
                           sliding_window=16,
                           architectures=["MistralForCausalLM"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="[Ss]liding-window"):
        _load(tmp_path, load_format="dummy", dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32


def test_hub_id_that_cannot_be_fetched_is_a_clear_error(llama_dir: Path):
    # conftest sets HF_HUB_OFFLINE=1: the hub cannot provide anything
    config = model_config_for(llama_dir).hf_config
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        get_model(
            model_config_for(llama_dir,
                             model="no-such-org/no-such-model",
                             hf_config=config), DeviceConfig())


def test_config_without_architectures_uses_model_type(llama_dir: Path):
    config = model_config_for(llama_dir).hf_config
    config.architectures = None
    model = get_model(model_config_for(llama_dir, hf_config=config),
                      DeviceConfig())
    assert type(model).__name__ == "LlamaForCausalLM"
    config.model_type = "unknown-type"
    with pytest.raises(ValueError, match="no architecture"):
        get_model(model_config_for(llama_dir, hf_config=config), DeviceConfig())
