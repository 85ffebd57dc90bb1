"""Incremental detokenization: turning generated ids into text as they come.

Decoding each new token on its own is wrong for most tokenizers (sentencepiece
drops or keeps leading spaces depending on context; byte-level tokens may hold
only part of a UTF-8 character), and decoding the whole sequence at every step
is quadratic. Instead we decode a short window of recent tokens twice, with and
without the new tokens, and emit the difference once it is complete text.
"""
import inspect
from typing import Any, cast

from vllm.transformers_utils.tokenizer import AnyTokenizer

# How many prompt tokens the first window looks back, so that the first
# output token is decoded in context (keeping e.g. its leading space).
_INITIAL_LOOKBACK = 5

_REPLACEMENT_CHAR = "\ufffd"
# UTF-8 characters are at most 4 bytes, so at most 4 byte tokens.
_MAX_CHAR_TOKENS = 4


class IncrementalDetokenizer:
    """Detokenizes the output of one sequence, a few tokens at a time.

    ``append`` returns the text the new tokens finalised; the concatenation
    of its results equals ``decode(prompt + output)`` minus
    ``decode(prompt)`` (both with the same ``skip_special_tokens``), except
    that text ending in an incomplete UTF-8 character is held back until the
    character completes.
    """

    def __init__(self,
                 tokenizer: AnyTokenizer,
                 prompt_token_ids: list[int],
                 skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._token_ids = list(prompt_token_ids)
        self._decode_kwargs: dict[str, Any] = {
            "skip_special_tokens": skip_special_tokens,
        }
        # Fast tokenizers have no such option (transformers 5 swallows unknown
        # decode keywords), so pass it only where _decode declares it.
        decode_params = inspect.signature(tokenizer._decode).parameters
        if "spaces_between_special_tokens" in decode_params:
            self._decode_kwargs["spaces_between_special_tokens"] = (
                spaces_between_special_tokens)

        # The window starts before the last visible prompt tokens: a window
        # made only of skipped special tokens would decode to "" and lose the
        # leading space of the first output token.
        visible_end = len(self._token_ids)
        if skip_special_tokens:
            special_ids = set(tokenizer.all_special_ids)
            while (visible_end > 0
                   and self._token_ids[visible_end - 1] in special_ids):
                visible_end -= 1
        # Text of ids[prefix_offset:read_offset] has already been emitted
        # (or belongs to the prompt); ids from read_offset on are pending.
        self._prefix_offset = max(visible_end - _INITIAL_LOOKBACK, 0)
        self._read_offset = len(self._token_ids)
        # Nor may the window start inside a multi-byte character:
        # sentencepiece's byte fallback turns a whole run of byte tokens into
        # U+FFFD when the run is not valid UTF-8.
        for _ in range(_MAX_CHAR_TOKENS - 1):
            if self._prefix_offset == 0 or not self._decode(
                    self._token_ids[self._prefix_offset:self._read_offset]
            ).startswith(_REPLACEMENT_CHAR):
                break
            self._prefix_offset -= 1
        self._output_text = ""

    @property
    def output_text(self) -> str:
        """All the text emitted so far."""
        return self._output_text

    def _decode(self, token_ids: list[int]) -> str:
        # A list comes back only for a batch of sequences.
        return cast(str, self._tokenizer.decode(token_ids,
                                                **self._decode_kwargs))

    def append(self, token_ids: list[int]) -> str:
        """Add generated ids; return the text they complete (maybe "")."""
        self._token_ids.extend(token_ids)
        prefix_text = self._decode(
            self._token_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset:])
        # Hold back while the window adds nothing (e.g. a skipped special
        # token) or ends inside a multi-byte character.
        if (len(full_text) <= len(prefix_text)
                or full_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        new_text = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self._output_text += new_text
        return new_text
