"""truncate_prompt_tokens: the engine keeps the last k prompt tokens."""
from pathlib import Path

import pytest

from vllm import LLM, EngineArgs, LLMEngine, SamplingParams

MAX_MODEL_LEN = 64
PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to "
          "play outside in the sun with her dog and her ball every day.")


@pytest.fixture(scope="module")
def llm(stories260k_path: Path) -> LLM:
    return LLM(str(stories260k_path), device="cpu", max_model_len=MAX_MODEL_LEN)


def _greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=8, **kwargs)


def test_keeps_the_last_k_tokens(llm: LLM) -> None:
    full = llm.get_tokenizer().encode(PROMPT)
    assert len(full) > 12
    out = llm.generate(PROMPT,
                       _greedy(truncate_prompt_tokens=12),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == full[-12:]
    # the text of the prompt is echoed as given
    assert out.prompt == PROMPT
    same = llm.generate({"prompt_token_ids": full[-12:]},
                        _greedy(),
                        use_tqdm=False)[0]
    assert out.outputs[0].token_ids == same.outputs[0].token_ids
    # k larger than the prompt keeps all of it
    whole = llm.generate(PROMPT,
                         _greedy(truncate_prompt_tokens=MAX_MODEL_LEN),
                         use_tqdm=False)[0]
    assert whole.prompt_token_ids == full


def test_minus_one_truncates_to_max_model_len(llm: LLM) -> None:
    long_ids = list(range(3, 3 + MAX_MODEL_LEN + 16))
    with pytest.raises(ValueError, match="longer than the maximum model"):
        llm.generate({"prompt_token_ids": long_ids}, _greedy(), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": long_ids},
                       _greedy(truncate_prompt_tokens=-1),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == long_ids[-MAX_MODEL_LEN:]
    # no room left: one token, then the context length stops it
    assert len(out.outputs[0].token_ids) == 1
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("value", [0, -2])
def test_bad_values_are_rejected(value: int) -> None:
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=value)


def test_larger_than_max_model_len_is_rejected(llm: LLM) -> None:
    params = _greedy(truncate_prompt_tokens=MAX_MODEL_LEN + 1)
    with pytest.raises(ValueError,
                       match=r"truncate_prompt_tokens \(65\).*max_model_len"):
        llm.generate(PROMPT, params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_engine_add_request_truncates(stories260k_path: Path) -> None:
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(stories260k_path), device="cpu"))
    engine.add_request("a", {"prompt_token_ids": list(range(3, 40))},
                       _greedy(truncate_prompt_tokens=5))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].prompt_token_ids == list(range(35, 40))
