"""Per-request logits processors (vLLM V0's interface)."""
import functools

import pytest
import torch

from tests.samplers.utils import make_metadata, run_sampler, sample
from vllm.sampling_params import (SamplingParams, logits_processor_takes_prompt)


def force(token: int):
    """A processor that makes ``token`` the only possible one."""

    def processor(output_token_ids: list[int],
                  logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced

    return processor


def test_two_and_three_argument_forms_get_their_arguments():
    calls = []

    def two(output_token_ids, logits):
        calls.append(("two", list(output_token_ids), logits.clone()))
        return logits

    def three(prompt_token_ids, output_token_ids, logits):
        calls.append(("three", list(prompt_token_ids), list(output_token_ids),
                      logits.clone()))
        return logits

    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(),
        SamplingParams(logits_processors=[two, three]),
        SamplingParams()
    ]
    sample(logits,
           params,
           output_token_ids=[[9], [1, 2], [9]],
           prompt_token_ids=[[8], [5, 6], [8]])
    assert [c[0] for c in calls] == ["two", "three"]
    assert calls[0][1] == [1, 2]
    assert calls[1][1:3] == ([5, 6], [1, 2])
    for call in calls:
        assert call[-1].dtype == torch.float32
        assert torch.equal(call[-1], logits[1])


def test_processor_changes_only_its_row():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0)] * 4
    params[2] = SamplingParams(temperature=0.0, logits_processors=[force(13)])
    tokens = sample(logits, params)
    expected = logits.argmax(dim=-1)
    expected[2] = 13
    assert torch.equal(tokens, expected)
    # Random rows too, whatever the draw.
    params = [SamplingParams(logits_processors=[force(5)])] * 50
    assert (sample(logits[:1].expand(50, -1), params) == 5).all()


def test_processors_run_in_order_and_may_work_in_place():

    def add_one(output_token_ids, logits):
        logits += 1.0
        return logits

    def double(output_token_ids, logits):
        return logits * 2.0

    seen = []

    def record(output_token_ids, logits):
        seen.append(logits.clone())
        return logits

    logits = torch.tensor([[1.0, 3.0, 2.0]])
    params = SamplingParams(temperature=0.0,
                            logits_processors=[add_one, double, record])
    sample(logits, [params])
    assert seen[0].tolist() == [4.0, 8.0, 6.0]
    assert logits.tolist() == [[1.0, 3.0, 2.0]]  # the input is untouched


def test_processors_run_before_penalties():
    # The processor sets token 0 to 4.0; repetition 2 then halves it to 2.0,
    # below token 1's 3.0. Run after the penalty, token 0 would keep 4.0.
    def set_token_0(output_token_ids, logits):
        logits[0] = 4.0
        return logits

    logits = torch.tensor([[-5.0, 3.0, 0.0]])
    params = SamplingParams(temperature=0.0,
                            repetition_penalty=2.0,
                            logits_processors=[set_token_0])
    assert sample(logits, [params], prompt_token_ids=[[0]]).tolist() == [1]


def test_processors_see_the_output_so_far():

    def no_repeat(output_token_ids, logits):
        logits[output_token_ids] = float("-inf")
        return logits

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, logits_processors=[no_repeat])
    assert sample(logits, [params], output_token_ids=[[0, 1]]).tolist() == [2]


def test_logprobs_are_of_the_raw_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    params = SamplingParams(logits_processors=[force(0)], logprobs=0)
    out = run_sampler(logits, [params])
    assert out.sampled_token_ids.tolist() == [0]
    lp = out.logprobs_tensors
    assert lp is not None
    torch.testing.assert_close(lp.logprobs[0, 0], logits[0].log_softmax(-1)[0])
    assert lp.selected_token_ranks.tolist() == [3]


def test_metadata_lists_rows_with_processors():
    fn = force(1)

    def three(prompt_token_ids, output_token_ids, logits):
        return logits

    md = make_metadata([
        SamplingParams(),
        SamplingParams(logits_processors=[fn, three]),
    ], 4)
    assert md.logits_processors == [(1, [(fn, False), (three, True)])]
    assert md.has_masked_tokens
    assert make_metadata([SamplingParams()], 4).logits_processors == []


def test_clone_shares_the_processors():

    class Stateful:

        def __init__(self):
            self.calls = 0

        def __call__(self, output_token_ids, logits):
            self.calls += 1
            return logits

    processor = Stateful()
    params = SamplingParams(logits_processors=[processor], stop=["x"])
    clone = params.clone()
    assert clone.logits_processors is not params.logits_processors
    assert clone.logits_processors is not None
    assert clone.logits_processors[0] is processor
    clone.logits_processors.append(force(0))
    assert params.logits_processors == [processor]
    sample(torch.zeros(1, 3), [clone])
    assert processor.calls == 1


@pytest.mark.parametrize("fn, takes_prompt", [
    (lambda out, logits: logits, False),
    (lambda prompt, out, logits: logits, True),
    (lambda out, logits, scale=1.0: logits, False),
    (lambda *args: args[-1], False),
    (functools.partial(lambda k, out, logits: logits, 3), False),
    (lambda logits: logits, None),
    (lambda a, b, c, d: d, None),
    ("not callable", None),
])
def test_arity(fn, takes_prompt):
    assert logits_processor_takes_prompt(fn) is takes_prompt


@pytest.mark.parametrize("value", [
    lambda out, logits: logits,
    [lambda logits: logits],
    [lambda a, b, c, d: d],
    ["fn"],
    [None],
    3,
])
def test_invalid_logits_processors_name_the_field(value):
    with pytest.raises(ValueError, match=r"^logits_processors "):
        SamplingParams(logits_processors=value)


def test_valid_logits_processors():
    fn = force(0)
    assert SamplingParams().logits_processors is None
    assert SamplingParams(logits_processors=(fn, )).logits_processors == [fn]
    assert SamplingParams(logits_processors=[]).logits_processors == []
