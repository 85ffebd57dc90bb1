"""Presence, frequency and repetition penalties against a plain-Python
reference, on logits the test controls."""
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.samplers.utils import (NUM_DRAWS, assert_matches, draw_many,
                                  make_metadata, sample)
from vllm.model_executor.layers.sampler import apply_penalties
from vllm.model_executor.sampling_metadata import (SamplingMetadata,
                                                   TokenHistoryCache)
from vllm.sampling_params import SamplingParams


def reference(logits: list[float], prompt: list[int], output: list[int],
              presence: float, frequency: float,
              repetition: float) -> list[float]:
    """vLLM's penalties, one token at a time."""
    counts = Counter(output)
    seen = set(prompt) | set(output)
    result = []
    for token, x in enumerate(logits):
        if token in seen:
            x = x / repetition if x > 0 else x * repetition
        x -= frequency * counts[token]
        if counts[token] > 0:
            x -= presence
        result.append(x)
    return result


def penalised(logits: torch.Tensor, params: list[SamplingParams],
              prompts: list[list[int]],
              outputs: list[list[int]]) -> torch.Tensor:
    md = make_metadata(params,
                       logits.shape[-1],
                       output_token_ids=outputs,
                       prompt_token_ids=prompts)
    return apply_penalties(logits.clone(), md)


def test_repetition_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 3.0, -3.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0)]
    # Token 0 in the prompt, 1 in the output, 2 and 3 in neither.
    out = penalised(logits, params, prompts=[[0, 0]], outputs=[[1, 4, 4]])
    assert out.tolist() == [[1.0, -4.0, 3.0, -3.0, 0.5]]
    # Below 1 it encourages.
    out = penalised(logits, [SamplingParams(repetition_penalty=0.5)],
                    prompts=[[0]],
                    outputs=[[1]])
    assert out.tolist() == [[4.0, -1.0, 3.0, -3.0, 1.0]]


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.zeros(1, 6)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    out = penalised(logits, params, prompts=[[0, 0, 5]], outputs=[[1, 2, 2]])
    # 1: once; 2: twice; 0 and 5 only in the prompt: untouched.
    assert out.tolist() == [[0.0, -0.75, -1.0, 0.0, 0.0, 0.0]]
    # Negative values reward.
    params = [SamplingParams(presence_penalty=-1.0, frequency_penalty=-2.0)]
    out = penalised(logits, params, prompts=[[0]], outputs=[[3, 3, 3]])
    assert out.tolist() == [[0.0, 0.0, 0.0, 7.0, 0.0, 0.0]]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_penalties_match_reference(data):
    vocab_size = data.draw(st.integers(2, 40))
    num_rows = data.draw(st.integers(1, 5))
    token = st.integers(0, vocab_size - 1)
    prompts = [
        data.draw(st.lists(token, min_size=1, max_size=12))
        for _ in range(num_rows)
    ]
    outputs = [data.draw(st.lists(token, max_size=12)) for _ in range(num_rows)]
    penalty = st.one_of(st.just(0.0), st.floats(-2.0, 2.0))
    params = [
        SamplingParams(presence_penalty=data.draw(penalty),
                       frequency_penalty=data.draw(penalty),
                       repetition_penalty=data.draw(
                           st.one_of(st.just(1.0), st.floats(0.1, 3.0))))
        for _ in range(num_rows)
    ]
    seed = data.draw(st.integers(0, 2**16))
    logits = torch.randn(
        num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3
    out = penalised(logits, params, prompts, outputs)
    expected = torch.tensor([
        reference(row, prompt, output, p.presence_penalty, p.frequency_penalty,
                  p.repetition_penalty) for row, prompt, output, p in zip(
                      logits.tolist(), prompts, outputs, params)
    ])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_only_rows_with_penalties_change():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(),
        SamplingParams(frequency_penalty=1.0),
        SamplingParams(temperature=0.0)
    ]
    out = penalised(logits, params, [[1, 2]] * 3, [[3, 3]] * 3)
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    assert out[1, 3] == logits[1, 3] - 2.0


def test_metadata_skips_unused_penalties():
    md = make_metadata([SamplingParams()] * 2, 10)
    assert md.penalties is None
    # Presence alone never looks at the prompt.
    md = make_metadata([SamplingParams(presence_penalty=1.0)],
                       10,
                       output_token_ids=[[1, 2]],
                       prompt_token_ids=[[3, 4, 5]])
    assert md.penalties is not None
    assert md.penalties.output_keys.tolist() == [1, 2]
    assert md.penalties.prompt_keys.tolist() == []
    md = make_metadata([SamplingParams(),
                        SamplingParams(repetition_penalty=2)],
                       10,
                       output_token_ids=[[1], [2]],
                       prompt_token_ids=[[3], [4, 5]])
    assert md.penalties is not None
    assert md.penalties.output_keys.tolist() == [12]
    assert md.penalties.prompt_keys.tolist() == [14, 15]


def test_greedy_avoids_repeating_with_penalties():
    # Token 0 is best, token 1 close behind; output already has token 0.
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]]).expand(3, -1)
    params = [
        SamplingParams(temperature=0.0, presence_penalty=1.0),
        SamplingParams(temperature=0.0, frequency_penalty=0.3),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
    ]
    tokens = sample(logits,
                    params,
                    output_token_ids=[[0], [0, 0], [0]],
                    prompt_token_ids=[[2]] * 3)
    assert tokens.tolist() == [1, 1, 1]
    # Once enough: frequency 0.3 x 1 = 0.3 < 0.5 gap.
    tokens = sample(logits[:1], params[1:2], output_token_ids=[[0]])
    assert tokens.tolist() == [0]


def test_penalties_apply_before_temperature():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    params = SamplingParams(temperature=2.0,
                            repetition_penalty=2.0,
                            presence_penalty=0.5)
    counts = draw_many(logits,
                       params,
                       prompt_token_ids=[0],
                       output_token_ids=[3])
    expected = torch.tensor(reference(logits.tolist(), [0], [3], 0.5, 0.0,
                                      2.0)) / 2.0
    assert_matches(counts, expected.softmax(dim=-1))
    assert counts.sum() == NUM_DRAWS


def test_logit_bias_applies_before_penalties():
    """vLLM's order (V0 and V1): logit_bias, then the penalties."""
    logits = torch.tensor([[2.0, 2.5, 0.0]])
    params = SamplingParams(temperature=0.0,
                            logit_bias={0: 2.0},
                            repetition_penalty=2.0)
    # Token 0 (in the prompt): (2 + 2) / 2 = 2.0 < 2.5, so token 1 wins;
    # penalty first would give 2 / 2 + 2 = 3.0 and pick token 0.
    assert sample(logits, [params], prompt_token_ids=[[0]]).tolist() == [1]


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.01),
    ("presence_penalty", math.inf),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", -0.5),
])
def test_out_of_range_penalty_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**{field: value})


def test_history_cache_gives_the_same_keys_as_converting_every_step():
    cache = TokenHistoryCache()
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(),
        SamplingParams(presence_penalty=0.5),
    ]
    prompt = [4, 5, 6]
    prompts = [prompt, [1], prompt]  # n > 1 sequences share their prompt
    outputs: list[list[int]] = [[], [2], [7]]

    def keys(cache: TokenHistoryCache | None) -> tuple[list, list]:
        md = SamplingMetadata.prepare(params, [None] * 3,
                                      outputs,
                                      prompts,
                                      vocab_size=10,
                                      device=torch.device("cpu"),
                                      history_cache=cache)
        assert md.penalties is not None
        return (md.penalties.output_keys.tolist(),
                md.penalties.prompt_keys.tolist())

    for step in range(5):
        assert keys(cache) == keys(None)
        for i, output in enumerate(outputs):
            output.append((step + i) % 10)
    # Not an append: the last cached token changed, or the list shrank.
    outputs[0][-1] = 9
    assert keys(cache) == keys(None)
    del outputs[2][1:]
    assert keys(cache) == keys(None)
    # A new list object for a row is converted afresh.
    outputs[0] = [3, 3]
    assert keys(cache) == keys(None)
    assert keys(cache)[0] == [3, 3, 27]


def test_history_cache_forgets_lists_of_earlier_steps():
    cache = TokenHistoryCache()
    old, new = [1, 2], [3]
    cache.start_step()
    cache.get(old)
    cache.start_step()
    cache.get(new)
    cache.start_step()
    # Only the last step's lists are kept.
    assert [entry[0] for entry in cache._previous.values()] == [new]
