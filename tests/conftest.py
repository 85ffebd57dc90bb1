"""Shared pytest set-up: CUDA skips, offline Hugging Face, test model paths."""
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from tests.utils import shared_model

# No test may reach the network: Hugging Face loads resolve local paths only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Skip tests marked @pytest.mark.cuda when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    """The real 260K-parameter Llama model (HF format) with its tokenizer."""
    return shared_model("stories260K")


@pytest.fixture(scope="session")
def gpt2_tokenizer_path() -> Path:
    """The GPT-2 byte-level BPE tokenizer (no weights)."""
    return shared_model("gpt2-tokenizer")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hugging Face Hub access; huggingface_hub reads HF_HUB_OFFLINE once,
    at import, so both the variable and its constant are patched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
