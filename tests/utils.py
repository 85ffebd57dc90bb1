"""Helpers shared by tests: test-model paths, comparing outputs with Hugging
Face's."""
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

# ../shared/models beside the repository; a machine without it (e.g. a lent
# GPU) can point VLLM_TEST_MODELS_DIR at a copy.
SHARED_MODELS_DIR = Path(
    os.environ.get("VLLM_TEST_MODELS_DIR",
                   Path(__file__).resolve().parents[2] / "shared" /
                   "models")).resolve()


def shared_model(name: str) -> Path:
    """A folder of ../shared/models, or skip the test when it is absent."""
    path = SHARED_MODELS_DIR / name
    if not path.is_dir():
        pytest.skip(f"test data {path} is absent (see shared/models/README.md)")
    return path


# (token ids, text or None, per-token {token_id: logprob} or None)
TokensTextLogprobs = tuple[list[int], str | None, list[dict[int, float]] | None]


def check_outputs_equal(outputs_0: Sequence[list[int]],
                        outputs_1: Sequence[list[int]], name_0: str,
                        name_1: str) -> None:
    """Greedy outputs must be token-for-token equal."""
    assert len(outputs_0) == len(outputs_1)
    for i, (ids_0, ids_1) in enumerate(zip(outputs_0, outputs_1)):
        assert ids_0 == ids_1, (f"prompt {i}: {name_0} {ids_0} != "
                                f"{name_1} {ids_1}")


def check_logprobs_close(outputs_0: Sequence[TokensTextLogprobs],
                         outputs_1: Sequence[TokensTextLogprobs], name_0: str,
                         name_1: str) -> None:
    """vLLM's rule: walk both token lists; at the first position where they
    differ, each side's token must be in the other side's top-N logprobs, and
    the comparison stops there."""
    assert len(outputs_0) == len(outputs_1)
    for i, (out_0, out_1) in enumerate(zip(outputs_0, outputs_1)):
        ids_0, _, lps_0 = out_0
        ids_1, _, lps_1 = out_1
        assert lps_0 is not None and lps_1 is not None
        for pos, (tok_0, tok_1) in enumerate(zip(ids_0, ids_1)):
            if tok_0 == tok_1:
                continue
            assert tok_0 in lps_1[pos], (
                f"prompt {i} position {pos}: {name_0} token {tok_0} not in "
                f"{name_1}'s top logprobs {lps_1[pos]}")
            assert tok_1 in lps_0[pos], (
                f"prompt {i} position {pos}: {name_1} token {tok_1} not in "
                f"{name_0}'s top logprobs {lps_0[pos]}")
            break
