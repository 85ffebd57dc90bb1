"""vllm.attention.ops imports on installs without triton."""
import importlib
import sys

import pytest

import vllm.attention.ops


def test_ops_package_imports_without_triton(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import triton` fail, as on a
    # CPU-only install; re-running the package's code must not need it.
    monkeypatch.setitem(sys.modules, "triton", None)
    ops = importlib.reload(vllm.attention.ops)
    assert not ops.has_triton()
