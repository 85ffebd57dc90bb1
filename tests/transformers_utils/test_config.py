"""Tests for vllm.transformers_utils.config."""
from pathlib import Path

import pytest

from vllm.transformers_utils.config import (get_config, get_generation_config,
                                            get_model_path)

from tests.utils import SHARED_MODELS_DIR, shared_model

MODELS_DIR = SHARED_MODELS_DIR
STORIES = MODELS_DIR / "stories260K"
GPT2 = MODELS_DIR / "gpt2-tokenizer"

UNKNOWN_HUB_NAME = "no-such-org/no-such-model"


def _require(path: Path) -> str:
    return str(shared_model(path.name))


def test_get_config_local() -> None:
    config = get_config(_require(STORIES))
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.vocab_size == 512
    assert config.num_key_value_heads == 4


def test_get_config_rejects_remote_code() -> None:
    with pytest.raises(ValueError, match="remote code"):
        get_config(_require(STORIES), trust_remote_code=True)


def test_get_config_file_path() -> None:
    config_file = Path(_require(STORIES)) / "config.json"
    with pytest.raises(ValueError, match="is a file, not a directory"):
        get_config(str(config_file))


def test_get_config_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json") as info:
        get_config(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_get_config_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        get_config(str(tmp_path / "missing"))


def test_get_config_unknown_hub_name_offline(offline: None) -> None:
    with pytest.raises(ValueError) as info:
        get_config(UNKNOWN_HUB_NAME)
    message = str(info.value)
    assert message.startswith(f"Could not load model '{UNKNOWN_HUB_NAME}': "
                              "it is not a local directory")
    assert "HF_HUB_OFFLINE" in message
    assert isinstance(info.value.__cause__, OSError)


def test_get_generation_config_local() -> None:
    generation_config = get_generation_config(_require(STORIES))
    assert generation_config["eos_token_id"] == 2
    assert generation_config["bos_token_id"] == 1
    # Only what the file sets, without transformers' bookkeeping.
    assert "transformers_version" not in generation_config
    assert "temperature" not in generation_config


def test_get_generation_config_absent() -> None:
    # The tokenizer folder has no generation_config.json.
    assert get_generation_config(_require(GPT2)) == {}


def test_get_generation_config_unknown_hub_name_offline(offline: None) -> None:
    assert get_generation_config(UNKNOWN_HUB_NAME) == {}


def test_get_model_path_local() -> None:
    path = _require(STORIES)
    assert get_model_path(path, None, ["*.safetensors", "*.json"]) == path


def test_get_model_path_file() -> None:
    weights = Path(_require(STORIES)) / "model.safetensors"
    with pytest.raises(ValueError, match="is a file, not a directory"):
        get_model_path(str(weights), None, ["*.safetensors"])


def test_get_model_path_unknown_hub_name_offline(offline: None) -> None:
    with pytest.raises(ValueError,
                       match=f"Could not load model '{UNKNOWN_HUB_NAME}'"):
        get_model_path(UNKNOWN_HUB_NAME, None, ["*.safetensors", "*.json"])
