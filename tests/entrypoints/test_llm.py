"""The offline LLM API on stories260K: arguments, prompt forms, stops, outputs."""
from pathlib import Path

import pytest

from vllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(stories260k_path: Path) -> LLM:
    return LLM(str(stories260k_path), device="cpu", max_model_len=128)


def test_unknown_keyword_is_type_error(stories260k_path: Path) -> None:
    with pytest.raises(TypeError, match="'max_model_length'.*max_model_len"):
        LLM(str(stories260k_path), max_model_length=64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(trust_remote_code=True), "trust_remote_code"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype='fp8' is not supported"),
    (dict(block_size=12), "block_size must be one of"),
    (dict(max_model_len=4096), "larger than the model's maximum"),
    (dict(dtype="int3"), "Unknown dtype 'int3'"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
])
def test_bad_engine_arguments(stories260k_path: Path, kwargs: dict,
                              match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LLM(str(stories260k_path), device="cpu", **kwargs)


def test_missing_model_is_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))


def test_prompt_forms_and_order(llm: LLM) -> None:
    prompts = ["Once upon a time", "The dog", "Lily saw a"]
    by_text = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in by_text] == prompts
    ids = [o.prompt_token_ids for o in by_text]
    by_ids = llm.generate([{
        "prompt_token_ids": i
    } for i in ids],
                          GREEDY,
                          use_tqdm=False)
    assert [o.outputs[0].token_ids for o in by_ids] == \
        [o.outputs[0].token_ids for o in by_text]
    single = llm.generate(prompts[1], GREEDY, use_tqdm=False)
    assert len(single) == 1
    assert single[0].outputs[0].token_ids == by_text[1].outputs[0].token_ids
    assert all(o.finished for o in by_text)


def test_one_sampling_params_per_prompt(llm: LLM) -> None:
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (3, 7)]
    outs = llm.generate(["The dog", "The cat"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 7]
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 2
    with pytest.raises(ValueError, match="3 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], params + params[:1], use_tqdm=False)


def test_bad_prompt_in_batch_fails_before_any_work(llm: LLM) -> None:
    with pytest.raises(ValueError, match="is empty"):
        llm.generate(["The dog", ""], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="longer than the maximum model"):
        llm.generate(["The dog", {
            "prompt_token_ids": [3] * 129
        }],
                     GREEDY,
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate(["The dog"], GREEDY, use_tqdm=False)) == 1


def test_stop_string_truncates_text(llm: LLM) -> None:
    full = llm.generate("Once upon a time", GREEDY, use_tqdm=False)[0]
    text = full.outputs[0].text
    stop = text[10:16]  # a piece that may span tokens
    first = text.find(stop)
    out = llm.generate("Once upon a time",
                       SamplingParams(temperature=0, max_tokens=24,
                                      stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate("Once upon a time",
                        SamplingParams(temperature=0,
                                       max_tokens=24,
                                       stop=stop,
                                       include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:first + len(stop)]


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    full = llm.generate("Once upon a time", GREEDY,
                        use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[3]
    out = llm.generate("Once upon a time",
                       SamplingParams(temperature=0,
                                      max_tokens=24,
                                      stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens keeps the stop token id from being sampled at all
    late = llm.generate("Once upon a time",
                        SamplingParams(temperature=0,
                                       max_tokens=24,
                                       stop_token_ids=[stop_id],
                                       min_tokens=10),
                        use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= 10
    assert stop_id not in late.token_ids[:10]


def test_eos_stops_unless_ignored(llm: LLM) -> None:
    eos = llm.get_tokenizer().eos_token_id
    outs = llm.generate(["Once upon a time"] * 3,
                        SamplingParams(temperature=1.0, seed=3, max_tokens=120),
                        use_tqdm=False)
    for out in outs:
        completion = out.outputs[0]
        if completion.finish_reason == "stop":
            assert completion.token_ids[-1] == eos
            assert completion.stop_reason is None
        else:
            assert len(completion.token_ids) == 120
    ignored = llm.generate("Once upon a time",
                           SamplingParams(temperature=0,
                                          max_tokens=120,
                                          ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert len(ignored.token_ids) == 120


def test_logprobs_top_n_and_sampled(llm: LLM) -> None:
    out = llm.generate("The dog",
                       SamplingParams(temperature=0.8,
                                      seed=0,
                                      max_tokens=6,
                                      logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    total = 0.0
    for token, step in zip(out.token_ids, out.logprobs):
        assert token in step
        assert len(step) in (3, 4)
        ranks = sorted(lp.rank for lp in step.values())
        assert ranks[:3] == [1, 2, 3]
        assert all(lp.decoded_token is not None for lp in step.values())
        total += step[token].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_n_samples(llm: LLM) -> None:
    out = llm.generate("The dog",
                       SamplingParams(n=3,
                                      temperature=1.0,
                                      seed=7,
                                      max_tokens=10,
                                      ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_bad_sampling_inputs_are_rejected(llm: LLM) -> None:
    with pytest.raises(ValueError, match="logit_bias has token ids outside"):
        llm.generate("The dog",
                     SamplingParams(logit_bias={600: 1.0}),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="greater than max allowed: 20"):
        llm.generate("The dog", SamplingParams(logprobs=21), use_tqdm=False)
