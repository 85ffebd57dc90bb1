"""The quick check of CONTRIBUTING.md: the package imports and generates."""
from pathlib import Path

import vllm
from vllm import LLM, SamplingParams


def test_public_api() -> None:
    for name in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput",
                 "EngineArgs", "LLMEngine"):
        assert hasattr(vllm, name)


def test_generate_stories260k(stories260k_path: Path) -> None:
    llm = LLM(model=str(stories260k_path))
    outputs = llm.generate(["Once upon a time", "The little dog"],
                           SamplingParams(temperature=0, max_tokens=16))
    assert [o.prompt for o in outputs] == ["Once upon a time", "The little dog"]
    for out in outputs:
        completion = out.outputs[0]
        assert completion.text and len(completion.token_ids) <= 16
        assert completion.finish_reason in ("stop", "length")
