"""Shared pytest set-up: CUDA skips, offline Hugging Face, test model paths."""
import os
from pathlib import Path

import pytest
import torch

# No test may reach the network: Hugging Face loads resolve local paths only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


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
def shared_models_dir() -> Path:
    """../shared/models beside the repository (may not exist)."""
    return REPO_ROOT.parent / "shared" / "models"


def _shared_model(shared_models_dir: Path, name: str) -> Path:
    path = shared_models_dir / name
    if not path.is_dir():
        pytest.skip(f"../shared/models/{name} is absent: the test data lives "
                    f"beside the repository, at {path}")
    return path


@pytest.fixture(scope="session")
def stories260k_path(shared_models_dir: Path) -> Path:
    """The real 260K-parameter Llama model (HF format) with its tokenizer."""
    return _shared_model(shared_models_dir, "stories260K")


@pytest.fixture(scope="session")
def gpt2_tokenizer_path(shared_models_dir: Path) -> Path:
    """The GPT-2 byte-level BPE tokenizer (no weights)."""
    return _shared_model(shared_models_dir, "gpt2-tokenizer")
