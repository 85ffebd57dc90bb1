"""Tests for vllm.transformers_utils.detokenizer.

The invariant: the text appended incrementally equals
``decode(prompt + output)[len(decode(prompt)):]`` (same skip_special_tokens),
as soon as the output ends on a complete character.
"""
import random
from typing import Any

import pytest

from vllm.transformers_utils.detokenizer import IncrementalDetokenizer
from vllm.transformers_utils.tokenizer import (AnyTokenizer, encode_prompt,
                                               get_tokenizer)

from tests.utils import shared_model

TOKENIZER_NAMES = ["stories260K", "gpt2-tokenizer"]

# Characters of 2, 3 and 4 UTF-8 bytes: both tokenizers split them into
# several tokens (byte fallback, byte-level BPE).
MULTI_BYTE_TEXT = "naïve café, 你好，世界 ∑ 😀🎉 𝔘"


@pytest.fixture(scope="module", params=TOKENIZER_NAMES)
def tokenizer(request: pytest.FixtureRequest) -> AnyTokenizer:
    return get_tokenizer(str(shared_model(request.param)))


def _stories() -> AnyTokenizer:
    return get_tokenizer(str(shared_model("stories260K")))


def _decode(tokenizer: AnyTokenizer,
            token_ids: list[int],
            skip_special_tokens: bool = True) -> str:
    text = tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)
    return text


def _expected(tokenizer: AnyTokenizer, prompt: list[int], output: list[int],
              skip_special_tokens: bool) -> str:
    """What the appends must add up to: decode(all) minus decode(prompt)."""
    full = _decode(tokenizer, prompt + output, skip_special_tokens)
    prefix = _decode(tokenizer, prompt, skip_special_tokens)
    assert full.startswith(prefix)
    return full[len(prefix):]


def _detokenize(tokenizer: AnyTokenizer,
                prompt: list[int],
                output: list[int],
                chunk_sizes: list[int] | None = None,
                **kwargs: Any) -> list[str]:
    """The pieces append() returns, feeding output in the given chunks."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    pieces = []
    start = 0
    for size in chunk_sizes or [1] * len(output):
        pieces.append(detokenizer.append(output[start:start + size]))
        start += size
    assert start >= len(output)
    assert detokenizer.output_text == "".join(pieces)
    return pieces


def _char_units(tokenizer: AnyTokenizer, text: str) -> list[list[int]]:
    """Token ids of each character of text, encoded on its own."""
    units = []
    for char in text:
        ids = tokenizer.encode(char, add_special_tokens=False)
        # Sentencepiece prepends a lone "▁" token to a leading multi-byte
        # character: drop it so that the unit is only the character.
        if len(ids) > 1 and tokenizer.convert_ids_to_tokens(ids[0]) == "▁":
            ids = ids[1:]
        units.append(ids)
    return units


def _byte_fallback_ids(tokenizer: AnyTokenizer) -> set[int]:
    """Ids of sentencepiece byte tokens such as <0xE4>."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {i for i, token in enumerate(tokens) if token.startswith("<0x")}


def _random_ids(rng: random.Random, tokenizer: AnyTokenizer,
                units: list[list[int]], byte_tokens: set[int],
                length: int) -> list[int]:
    """Random ids: plain tokens, special tokens and whole characters."""
    # Lone byte-fallback tokens would make invalid UTF-8, which sentencepiece
    # renders differently depending on the neighbouring byte tokens.
    ids: list[int] = []
    while len(ids) < length:
        draw = rng.random()
        if draw < 0.15:
            ids.append(rng.choice(tokenizer.all_special_ids))
        elif draw < 0.45:
            ids.extend(rng.choice(units))
        else:
            token_id = rng.randrange(len(tokenizer))
            if token_id not in byte_tokens:
                ids.append(token_id)
    return ids


def test_stories_known_output() -> None:
    tokenizer = _stories()
    prompt = encode_prompt(tokenizer, "Once upon a time")
    assert prompt == [1, 403, 407, 261, 378]
    # The greedy continuation of stories260K.
    output = [403, 407, 261, 378, 432, 383, 286]
    pieces = _detokenize(tokenizer, prompt, output)
    assert pieces == [" Once", " upon", " a", " time", ",", " there", " was"]
    assert "".join(pieces) == " Once upon a time, there was"
    assert "".join(pieces) == _expected(tokenizer, prompt, output, True)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_eos(tokenizer: AnyTokenizer, skip_special_tokens: bool) -> None:
    prompt = encode_prompt(tokenizer, "Once upon a time")
    output = tokenizer.encode(" there was", add_special_tokens=False)
    output.append(tokenizer.eos_token_id)
    pieces = _detokenize(tokenizer,
                         prompt,
                         output,
                         skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == _expected(tokenizer, prompt, output,
                                        skip_special_tokens)
    eos_text = pieces[-1]
    assert eos_text == ("" if skip_special_tokens else tokenizer.eos_token)


@pytest.mark.parametrize("chunked", [False, True])
def test_multi_byte_characters(tokenizer: AnyTokenizer, chunked: bool) -> None:
    prompt = encode_prompt(tokenizer, "Hello")
    output = tokenizer.encode(" " + MULTI_BYTE_TEXT, add_special_tokens=False)
    sizes = [2, 3] * len(output) if chunked else None
    pieces = _detokenize(tokenizer, prompt, output, sizes)
    assert "".join(pieces) == _expected(tokenizer, prompt, output, True)
    assert "".join(pieces).strip() == MULTI_BYTE_TEXT
    # Held back while incomplete, never emitted as U+FFFD.
    assert not any("\ufffd" in piece for piece in pieces)
    if not chunked:
        assert "" in pieces


def test_prompt_ending_in_a_split_character(tokenizer: AnyTokenizer) -> None:
    # The first window must not start inside the prompt's last characters
    # (sentencepiece would turn the whole run of byte tokens into U+FFFD).
    ids = tokenizer.encode("😀😀你好 ok", add_special_tokens=False)
    split = next(k for k in range(len(ids))
                 if _decode(tokenizer, ids[:k]).strip() == "😀😀你")
    prompt, output = ids[:split], ids[split:]
    pieces = _detokenize(tokenizer, prompt, output)
    assert "".join(pieces) == _expected(tokenizer, prompt, output, True)
    assert not any("\ufffd" in piece for piece in pieces)


def test_prompt_ending_in_special_tokens() -> None:
    # Five skipped special tokens end the prompt: the first output token
    # must still keep its leading space.
    tokenizer = _stories()
    prompt = [490, 2, 0, 1, 1, 1]
    output = [1, 345, 426]
    pieces = _detokenize(tokenizer, prompt, output)
    assert "".join(pieces) == _expected(tokenizer, prompt, output, True)
    assert "".join(pieces).startswith(" ")


def test_empty_prompt(tokenizer: AnyTokenizer) -> None:
    output = tokenizer.encode("Once upon a time", add_special_tokens=False)
    pieces = _detokenize(tokenizer, [], output)
    assert "".join(pieces) == _decode(tokenizer, output)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("spaces_between_special_tokens", [True, False])
def test_random_sequences(tokenizer: AnyTokenizer, skip_special_tokens: bool,
                          spaces_between_special_tokens: bool) -> None:
    rng = random.Random(1234)
    units = _char_units(tokenizer, MULTI_BYTE_TEXT)
    byte_tokens = _byte_fallback_ids(tokenizer)
    # A final plain token completes any character still being held back.
    last = tokenizer.encode(".", add_special_tokens=False)[-1:]
    for _ in range(150):
        prompt = _random_ids(rng, tokenizer, units, byte_tokens,
                             rng.randrange(0, 12))
        output = _random_ids(rng, tokenizer, units, byte_tokens,
                             rng.randrange(1, 25))
        output += last
        expected = _expected(tokenizer, prompt, output, skip_special_tokens)
        for chunked in (False, True):
            sizes = ([rng.randrange(1, 5) for _ in output] if chunked else None)
            pieces = _detokenize(
                tokenizer,
                prompt,
                output,
                sizes,
                skip_special_tokens=skip_special_tokens,
                spaces_between_special_tokens=spaces_between_special_tokens)
            assert "".join(pieces) == expected, (prompt, output, sizes)
            # U+FFFD is emitted only where the final text has one too (gpt2
            # ids may hold invalid UTF-8), never for a partial character.
            if "\ufffd" not in expected:
                assert not any("\ufffd" in piece for piece in pieces)


def test_random_byte_level_garbage() -> None:
    # Byte-level BPE decodes invalid UTF-8 the same wherever the window
    # starts, so even arbitrary ids (lone continuation bytes included) must
    # keep the invariant; the U+FFFD emitted are in the full decode too.
    tokenizer = get_tokenizer(str(shared_model("gpt2-tokenizer")))
    rng = random.Random(99)
    last = tokenizer.encode(".", add_special_tokens=False)
    for _ in range(300):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(8)]
        output = [
            rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 20))
        ] + last
        pieces = _detokenize(tokenizer, prompt, output)
        assert "".join(pieces) == _expected(tokenizer, prompt, output, True)


def test_decoding_window_stays_short(tokenizer: AnyTokenizer,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Decoding must not grow with the sequence (which would be quadratic).
    lengths: list[int] = []
    decode = tokenizer.decode

    def spy(token_ids: list[int], **kwargs: Any) -> Any:
        lengths.append(len(token_ids))
        return decode(token_ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", spy)
    prompt = tokenizer.encode("Once upon a time " * 50)
    output = tokenizer.encode(" there was a little girl." * 40,
                              add_special_tokens=False)
    _detokenize(tokenizer, prompt, output)
    assert len(output) > 200
    assert max(lengths) <= 12
