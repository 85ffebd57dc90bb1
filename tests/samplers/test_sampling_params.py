"""SamplingParams: vLLM's defaults, validation and normalisation."""
import logging
import math

import pytest

from vllm.sampling_params import (RequestOutputKind, SamplingParams,
                                  SamplingType)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty,
            p.repetition_penalty) == (1, 0.0, 0.0, 1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False
    assert (p.max_tokens, p.min_tokens) == (16, 0)
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize and p.skip_special_tokens
    assert p.spaces_between_special_tokens
    assert p.include_stop_str_in_output is False
    assert p.logit_bias is None and p.allowed_token_ids is None
    assert p.bad_words is None and p.truncate_prompt_tokens is None
    assert p.output_kind is RequestOutputKind.CUMULATIVE
    assert p.extra_args is None
    assert p.sampling_type is SamplingType.RANDOM
    assert p.all_stop_token_ids == set()
    assert p.output_text_buffer_length == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("presence_penalty", math.nan),
        ("frequency_penalty", 2.1),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("temperature", -0.5),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("seed", 1.5),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -2),
        ("prompt_logprobs", -5),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop_token_ids", [1, "2"]),
        ("bad_words", [""]),
        ("bad_words", "word"),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [1.5]),
        ("truncate_prompt_tokens", 0),
        ("truncate_prompt_tokens", -2),
    ],
)
def test_invalid_value_names_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"^{field} ") as excinfo:
        SamplingParams(**{field: value})
    assert repr(value) in str(excinfo.value)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens.*max_tokens=4.*5"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4
    assert SamplingParams(min_tokens=100, max_tokens=None).min_tokens == 100


def test_stop_strings_need_detokenize():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop="x", detokenize=False)
    assert SamplingParams(detokenize=False).stop == []


@pytest.mark.parametrize("value", [-1, 0, 5])
def test_valid_logprobs(value):
    p = SamplingParams(logprobs=value, prompt_logprobs=value)
    assert p.logprobs == value and p.prompt_logprobs == value


def test_no_upper_bound_on_temperature():
    assert SamplingParams(temperature=5.0).temperature == 5.0


def test_small_temperature_clamped_with_warning(caplog, monkeypatch):
    # The "vllm" logger may not propagate to the root, where caplog listens.
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        p = SamplingParams(temperature=0.001)
    assert p.temperature == 0.01
    assert p.sampling_type is SamplingType.RANDOM
    assert "temperature" in caplog.text


def test_greedy_resets_filters_and_needs_n_1():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert p.sampling_type is SamplingType.GREEDY
    with pytest.raises(ValueError, match="^n must be 1 .* got 2"):
        SamplingParams(temperature=0.0, n=2)


def test_sampling_type():
    assert SamplingParams(temperature=0.0,
                          seed=3).sampling_type is SamplingType.GREEDY
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(seed=0).sampling_type is SamplingType.RANDOM_SEED


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=7).top_k == 7


def test_seed_minus_one_means_none():
    p = SamplingParams(seed=-1)
    assert p.seed is None and p.sampling_type is SamplingType.RANDOM


def test_stop_string_normalised():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]


def test_output_text_buffer_length():
    assert SamplingParams(stop=["ab", "wxyz"]).output_text_buffer_length == 3
    assert SamplingParams(
        stop=["wxyz"],
        include_stop_str_in_output=True).output_text_buffer_length == 0


def test_stop_token_ids_deduplicated_in_order():
    p = SamplingParams(stop_token_ids=[5, 3, 5, 1, 3])
    assert p.stop_token_ids == [5, 3, 1]
    assert p.all_stop_token_ids == {1, 3, 5}


def test_logit_bias_keys_become_ints():
    p = SamplingParams(logit_bias={"7": 1.5})
    assert p.logit_bias == {7: 1.5}


def test_unimplemented_fields_are_accepted():
    # The engine, not SamplingParams, decides what it supports.
    p = SamplingParams(n=3,
                       presence_penalty=0.5,
                       frequency_penalty=-0.5,
                       repetition_penalty=1.2,
                       logit_bias={1: -100.0},
                       allowed_token_ids=[1, 2],
                       bad_words=["foo"],
                       truncate_prompt_tokens=-1,
                       output_kind=RequestOutputKind.DELTA,
                       extra_args={"x": 1})
    assert p.n == 3 and p.bad_words == ["foo"]


def test_clone_is_independent():
    p = SamplingParams(stop=["a"], stop_token_ids=[1], extra_args={"k": [1]})
    c = p.clone()
    assert c == p and c is not p
    c.stop.append("b")  # type: ignore[union-attr]
    c.update_from_generation_config({"eos_token_id": [9, 10]}, 2)
    assert c.extra_args is not None
    c.extra_args["k"].append(2)
    assert p.stop == ["a"] and p.stop_token_ids == [1]
    assert p.all_stop_token_ids == {1}
    assert p.extra_args == {"k": [1]}


def test_update_from_generation_config():
    p = SamplingParams(stop_token_ids=[5])
    p.update_from_generation_config({"eos_token_id": [2, 7]}, 2)
    # The tokenizer's EOS ends the request; the generation config's extra
    # EOS ids become stop ids, reported as stop_reason like in vLLM.
    assert p.stop_token_ids == [5, 7]
    assert p.all_stop_token_ids == {2, 5, 7}

    p = SamplingParams()
    p.update_from_generation_config({"eos_token_id": 4}, None)
    assert p.all_stop_token_ids == {4} and p.stop_token_ids == [4]

    p = SamplingParams()
    p.update_from_generation_config({}, [0, 1])
    assert p.all_stop_token_ids == {0, 1} and p.stop_token_ids == []


def test_update_from_generation_config_ignore_eos():
    p = SamplingParams(stop_token_ids=[5], ignore_eos=True)
    p.update_from_generation_config({"eos_token_id": [2, 7]}, 2)
    assert p.stop_token_ids == [5]
    assert p.all_stop_token_ids == {5}


def test_repr_shows_changed_fields():
    assert repr(SamplingParams()) == "SamplingParams()"
    assert repr(SamplingParams(temperature=0.5,
                               stop="x")) == ("SamplingParams(temperature=0.5, "
                                              "stop=['x'])")
