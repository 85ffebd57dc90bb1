"""logit_bias, allowed_token_ids and bad_words, on logits the test controls."""
import math
from pathlib import Path

import pytest
import torch

from tests.samplers.utils import (assert_matches, draw_many, make_metadata,
                                  run_sampler, sample)
from vllm.model_executor.layers.sampler import (apply_allowed_token_ids,
                                                apply_bad_words,
                                                apply_logit_bias)
from vllm.sampling_params import SamplingParams, tokenize_bad_words

INF = float("inf")


# ---------------------------------------------------------------- logit_bias
def test_logit_bias_is_added():
    logits = torch.zeros(2, 5)
    params = [SamplingParams(logit_bias={1: 2.5, 4: -1.0}), SamplingParams()]
    out = apply_logit_bias(logits.clone(), make_metadata(params, 5))
    assert out.tolist() == [[0.0, 2.5, 0.0, 0.0, -1.0], [0.0] * 5]


def test_logit_bias_changes_greedy_choice_and_distribution():
    logits = torch.tensor([[1.0, 0.0, 0.5]])
    params = SamplingParams(temperature=0.0, logit_bias={"1": 2.0})
    assert sample(logits, [params]).tolist() == [1]
    bias = {0: -1.0, 2: 0.5}
    counts = draw_many(logits[0], SamplingParams(logit_bias=bias))
    assert_matches(counts, torch.tensor([0.0, 0.0, 1.0]).softmax(dim=-1))


def test_logit_bias_beyond_the_logits_is_ignored():
    out = apply_logit_bias(
        torch.zeros(1, 3),
        make_metadata([SamplingParams(logit_bias={
            1: 1.0,
            7: 5.0
        })], 3))
    assert out.tolist() == [[0.0, 1.0, 0.0]]


def test_logprobs_ignore_logit_bias():
    # vLLM V1: logprobs of the raw model output.
    logits = torch.tensor([[1.0, 0.0, 0.5]])
    params = SamplingParams(temperature=0.0, logit_bias={1: 5.0}, logprobs=1)
    out = run_sampler(logits, [params])
    assert out.sampled_token_ids.tolist() == [1]
    lp = out.logprobs_tensors
    assert lp is not None
    assert lp.logprob_token_ids.tolist() == [[1, 0]]
    torch.testing.assert_close(lp.logprobs[0], logits[0].log_softmax(-1)[[1,
                                                                          0]])
    assert lp.selected_token_ranks.tolist() == [3]


# --------------------------------------------------------- allowed_token_ids
def test_allowed_token_ids_mask_everything_else():
    logits = torch.arange(12.0).view(2, 6)
    params = [SamplingParams(allowed_token_ids=[4, 1, 9]), SamplingParams()]
    out = apply_allowed_token_ids(logits.clone(), make_metadata(params, 6))
    assert out[0].tolist() == [-INF, 1.0, -INF, -INF, 4.0, -INF]
    assert torch.equal(out[1], logits[1])


def test_allowed_token_ids_sampling():
    logits = torch.tensor([2.0, -1.0, 0.0, 1.0, 0.5])
    # Greedy takes the best allowed token, not the best token.
    assert sample(logits[None],
                  [SamplingParams(temperature=0.0, allowed_token_ids=[1, 4])
                   ]).tolist() == [4]
    counts = draw_many(logits, SamplingParams(allowed_token_ids=[1, 2, 4]))
    kept = torch.tensor([-INF, -1.0, 0.0, -INF, 0.5])
    assert_matches(counts, kept.softmax(dim=-1))


# ----------------------------------------------------------------- bad_words
def test_single_token_bad_word_is_always_masked():
    logits = torch.zeros(1, 6)
    md = make_metadata([SamplingParams(bad_words=["x"])],
                       6,
                       bad_words_token_ids=[[[3], [5], []]])
    assert apply_bad_words(logits.clone(),
                           md)[0].tolist() == [0.0, 0.0, 0.0, -INF, 0.0, -INF]


@pytest.mark.parametrize("output, masked", [
    ([], []),
    ([1], [2]),
    ([7, 1], [2]),
    ([1, 2], []),
    ([1, 2, 3], [4]),
    ([2, 3], [4]),
    ([0, 3], []),
    ([3], []),
])
def test_multi_token_bad_word_masks_its_last_token_after_its_prefix(
        output, masked):
    # Bad words [1, 2] and [2, 3, 4].
    md = make_metadata([SamplingParams(bad_words=["ab", "cde"])],
                       8,
                       output_token_ids=[output],
                       bad_words_token_ids=[[[1, 2], [2, 3, 4]]])
    out = apply_bad_words(torch.zeros(1, 8), md)[0]
    assert (out == -INF).nonzero().flatten().tolist() == masked


def test_bad_words_only_look_at_the_output():
    md = make_metadata([SamplingParams(bad_words=["ab"])],
                       8,
                       prompt_token_ids=[[5, 1]],
                       bad_words_token_ids=[[[1, 2]]])
    assert md.bad_words_mask is None


def test_bad_words_from_params_tokenized_by_update_from_tokenizer():
    params = SamplingParams(bad_words=["ab"], temperature=0.0)

    class Tokenizer:

        def encode(self, text: str, add_special_tokens: bool = True):
            assert not add_special_tokens
            return {"ab": [1, 2], " ab": [3, 2]}[text]

    with pytest.raises(ValueError, match="bad_words .* no token ids"):
        make_metadata([params], 6, output_token_ids=[[1]])
    params.update_from_tokenizer(Tokenizer())
    assert params.bad_words_token_ids == [[1, 2], [3, 2]]
    logits = torch.tensor([[0.0, 0.0, 5.0, 1.0, 0.0, 0.0]])
    assert sample(logits, [params], output_token_ids=[[1]]).tolist() == [3]
    assert sample(logits, [params], output_token_ids=[[4]]).tolist() == [2]
    # The engine's clone keeps them.
    assert params.clone().bad_words_token_ids == [[1, 2], [3, 2]]


def test_bad_words_never_sampled():
    logits = torch.tensor([0.0, 1.0, 0.5, 0.2])
    counts = draw_many(logits,
                       SamplingParams(bad_words=["w"]),
                       output_token_ids=[0, 2],
                       bad_words_token_ids=[[1], [2, 3], [0, 2, 0]])
    # 1 always; 3 after 2; 0 after 0, 2.
    assert_matches(counts, torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_tokenize_bad_words_gpt2(gpt2_tokenizer_path: Path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_path))
    hello = tokenizer.encode("hello")
    space_hello = tokenizer.encode(" hello")
    assert hello != space_hello and len(hello) == len(space_hello) == 1
    # Both spellings; leading spaces of the word do not matter; no repeats.
    assert tokenize_bad_words(["hello", "  hello"],
                              tokenizer) == [hello, space_hello]
    two = tokenize_bad_words(["Once upon"], tokenizer)
    assert two == [
        tokenizer.encode("Once upon"),
        tokenizer.encode(" Once upon")
    ]


def test_tokenize_bad_words_sentencepiece(stories260k_path: Path):
    # SentencePiece marks the word start itself; " hello" would only add a
    # lone "▁" token in front, so only the bare spelling is kept.
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(stories260k_path))
    bare = tokenizer.encode("hello", add_special_tokens=False)
    spaced = tokenizer.encode(" hello", add_special_tokens=False)
    assert len(spaced) == len(bare) + 1
    assert tokenize_bad_words(["hello"], tokenizer) == [bare]


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize("field, value", [
    ("logit_bias", {
        1: math.inf
    }),
    ("logit_bias", {
        1: math.nan
    }),
    ("logit_bias", {
        -1: 1.0
    }),
    ("logit_bias", {
        "x": 1.0
    }),
    ("logit_bias", {
        1.5: 1.0
    }),
    ("logit_bias", {
        1: "big"
    }),
    ("logit_bias", [1, 2]),
    ("allowed_token_ids", []),
    ("allowed_token_ids", [-3]),
    ("allowed_token_ids", ["1"]),
    ("bad_words", ["ok", ""]),
    ("bad_words", ["ok", 3]),
    ("bad_words", "word"),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} ") as excinfo:
        SamplingParams(**{field: value})
    assert repr(value) in str(excinfo.value)
