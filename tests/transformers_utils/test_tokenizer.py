"""Tests for vllm.transformers_utils.tokenizer."""
from pathlib import Path

import pytest

from vllm.transformers_utils.tokenizer import encode_prompt, get_tokenizer

from tests.utils import SHARED_MODELS_DIR, shared_model

MODELS_DIR = SHARED_MODELS_DIR
STORIES = MODELS_DIR / "stories260K"
GPT2 = MODELS_DIR / "gpt2-tokenizer"


def _require(path: Path) -> str:
    return str(shared_model(path.name))


def test_stories_prompt_gets_bos() -> None:
    tokenizer = get_tokenizer(_require(STORIES))
    assert tokenizer.is_fast
    assert encode_prompt(tokenizer,
                         "Once upon a time") == [1, 403, 407, 261, 378]


def test_gpt2_adds_no_special_tokens() -> None:
    tokenizer = get_tokenizer(_require(GPT2))
    ids = encode_prompt(tokenizer, "Hello world")
    assert ids == [15496, 995]
    assert tokenizer.decode(ids) == "Hello world"


def test_slow_mode_encodes_the_same() -> None:
    # transformers 5 may still hand back a fast tokenizer when no slow one
    # can be built; either way the ids must agree.
    tokenizer = get_tokenizer(_require(STORIES), tokenizer_mode="slow")
    assert encode_prompt(tokenizer,
                         "Once upon a time") == [1, 403, 407, 261, 378]


def test_each_call_loads_a_new_tokenizer() -> None:
    path = _require(GPT2)
    assert get_tokenizer(path) is not get_tokenizer(path)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mistral"):
        get_tokenizer("gpt2", tokenizer_mode="mistral")


def test_trust_remote_code_is_rejected() -> None:
    with pytest.raises(ValueError, match="trust_remote_code"):
        get_tokenizer("gpt2", trust_remote_code=True)


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(ValueError, match="no-such-tokenizer"):
        get_tokenizer(str(missing))


def test_file_instead_of_directory() -> None:
    path = Path(_require(GPT2)) / "tokenizer.json"
    with pytest.raises(ValueError, match="not a directory"):
        get_tokenizer(str(path))


def test_directory_without_tokenizer_files(tmp_path: Path,
                                           offline: None) -> None:
    with pytest.raises(ValueError, match="Could not load tokenizer"):
        get_tokenizer(str(tmp_path))


def test_unknown_hub_name_offline(offline: None) -> None:
    with pytest.raises(ValueError,
                       match="Could not load tokenizer 'no-such-org/x'"):
        get_tokenizer("no-such-org/x")
