"""Sampling parameters of one generation request, as in vLLM.

``SamplingParams`` validates and normalises what the user asked for in
``__post_init__``. The engine works on its own ``clone()``, on which it calls
``update_from_generation_config`` to learn the model's end-of-sequence ids.

Adding a sampling parameter: a field (with its default and a docstring line)
and its validation here, a tensor in ``SamplingMetadata``, one function in the
sampler.
"""
import copy
import enum
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from vllm.logger import init_logger

logger = init_logger(__name__)

# Temperatures below this are greedy decoding.
_SAMPLING_EPS = 1e-5
# Smaller positive temperatures make logits / T overflow to inf in fp32.
_MIN_TEMPERATURE = 1e-2

# A per-request logits processor: (output_token_ids, logits [V]) -> logits
# [V], or (prompt_token_ids, output_token_ids, logits [V]) -> logits [V].
LogitsProcessor = Callable[..., Any]


class Tokenizer(Protocol):
    """What ``tokenize_bad_words`` needs of a tokenizer (Hugging Face's)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
        ...


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a streamed request carries."""
    CUMULATIVE = 0  # everything generated so far
    DELTA = 1  # only what is new since the last output
    FINAL_ONLY = 2  # nothing until the request finishes


class SamplingType(enum.IntEnum):
    """How the sampler picks a request's tokens."""
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2  # random, from the request's own seeded generator


@dataclass(repr=False)
class SamplingParams:
    """Sampling parameters for text generation (vLLM-compatible).

    Attributes:
        n: Number of output sequences for the prompt.
        presence_penalty: Penalises tokens that already appear in the output,
            in [-2, 2]; > 0 favours new tokens.
        frequency_penalty: Penalises tokens by how often they appear in the
            output, in [-2, 2].
        repetition_penalty: > 1 discourages tokens seen in the prompt or the
            output, < 1 encourages them; 1 is off.
        temperature: Randomness of sampling; 0 is greedy.
        top_p: Sample from the smallest set of most likely tokens whose
            probability mass reaches top_p; 1 is off.
        top_k: Sample from the k most likely tokens; 0 (or -1) is off.
        min_p: Drop tokens less likely than min_p times the most likely one.
        seed: Seed of this request's own random generator; None uses the
            engine's.
        stop: Strings that end generation; not included in the output.
        stop_token_ids: Token ids that end generation.
        ignore_eos: Keep generating after the end-of-sequence token.
        max_tokens: Maximum number of tokens to generate per sequence; None is
            as many as the context allows.
        min_tokens: Minimum number of tokens to generate before EOS or a stop
            token id may be produced.
        logprobs: Number of most likely tokens whose log probabilities are
            returned per generated token (plus the sampled one); -1 is the
            whole vocabulary.
        prompt_logprobs: Like logprobs, for each prompt token.
        detokenize: Turn the generated tokens into text.
        skip_special_tokens: Leave special tokens out of the text.
        spaces_between_special_tokens: Put spaces between special tokens in
            the text.
        include_stop_str_in_output: Keep the matched stop string in the text.
        logit_bias: Token id -> value added to that token's logit.
        allowed_token_ids: Only these token ids may be generated.
        bad_words: Words that must never be generated: the last token of a
            bad word is forbidden whenever the output ends with its other
            tokens (update_from_tokenizer turns the words into tokens).
        truncate_prompt_tokens: Keep only the last k prompt tokens; -1 keeps
            as many as the model allows.
        output_kind: What each streamed output carries (RequestOutputKind).
        extra_args: Free-form arguments for custom samplers.
        top_n_sigma: Top-nσ sampling (Tang et al., 2024, "Top-nσ: Not All
            Logits Are You Need"): keep only the tokens whose logit is at
            least max_logit - top_n_sigma * σ, where σ is the standard
            deviation (population, divided by the count) of the row's
            logits. Applied to the temperature-scaled logits, after the
            penalties and masks and before min_p, top_k and top_p. σ is taken
            over the finite logits only: tokens already masked to -inf
            (allowed_token_ids, bad_words, min_tokens, a logits processor)
            are not candidates and do not count. None is off; otherwise a finite number > 0
            (1.0 is the paper's usual choice; a tiny value keeps only the
            most likely token, i.e. greedy). Greedy requests ignore it.
        logits_processors: Functions that rewrite this request's logits
            before anything else (penalties included), each called as
            ``fn(output_token_ids, logits)`` or
            ``fn(prompt_token_ids, output_token_ids, logits)`` (the form is
            chosen by the number of positional parameters) with the row's
            float32 logits [V] on the model's device; each returns the new
            logits [V] (it may modify its argument in place and return it).
            They run in Python once per step for each request that has
            them, so they are slow; ``clone()`` shares them, never copies.

    ``stop`` and ``stop_token_ids`` are lists after construction (None
    becomes []).
    """
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    top_n_sigma: float | None = None
    logits_processors: list[LogitsProcessor] | None = None
    # The token ids that end the request; see all_stop_token_ids.
    _all_stop_token_ids: set[int] = field(default_factory=set,
                                          init=False,
                                          repr=False,
                                          compare=False)
    # bad_words as token id sequences; see update_from_tokenizer.
    _bad_words_token_ids: list[list[int]] | None = field(default=None,
                                                         init=False,
                                                         repr=False,
                                                         compare=False)

    def __post_init__(self) -> None:
        if self.seed == -1:
            self.seed = None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0  # -1 is the older spelling of "off"
        if self.logit_bias is not None:
            self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if self.logits_processors is not None:
            if not isinstance(self.logits_processors, (list, tuple)):
                raise ValueError(_LOGITS_PROCESSORS_ERROR +
                                 f"{self.logits_processors!r}.")
            self.logits_processors = list(self.logits_processors)
        self._verify_args()

        if 0 < self.temperature < _MIN_TEMPERATURE:
            logger.warning(
                "temperature %s is less than %s, which may cause numerical "
                "errors (nan or inf); it is set to %s.", self.temperature,
                _MIN_TEMPERATURE, _MIN_TEMPERATURE)
            self.temperature = _MIN_TEMPERATURE
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the filters cannot change the argmax; reset them so
            # the sampler sees neutral values.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            self.top_n_sigma = None
            if self.n != 1:
                raise ValueError(
                    f"n must be 1 when using greedy sampling, got {self.n}.")

        # De-duplicate, keeping the user's order.
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        self._all_stop_token_ids = set(self.stop_token_ids)

    def __repr__(self) -> str:
        # Only the fields that differ from the defaults, to keep logs short.
        changed = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
            if f.repr and getattr(self, f.name) != getattr(_DEFAULTS, f.name))
        return f"SamplingParams({changed})"

    def _verify_args(self) -> None:
        # Written as `not (ok)` so that NaN fails every range check.
        if not isinstance(self.n, int):
            raise ValueError(
                f"n must be an int, got {type(self.n).__name__} ({self.n!r}).")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError("presence_penalty must be in [-2, 2], got "
                             f"{self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("frequency_penalty must be in [-2, 2], got "
                             f"{self.frequency_penalty}.")
        if not (math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0.0):
            raise ValueError("repetition_penalty must be finite and > 0, got "
                             f"{self.repetition_penalty}.")
        # No upper bound: newer vLLM caps temperature at 2, but users rely on
        # higher values.
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError("temperature must be finite and non-negative, "
                             f"got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int, got "
                             f"{type(self.top_k).__name__} ({self.top_k!r}).")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 or -1 (disabled) or at least 1, "
                             f"got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_n_sigma is not None and not _is_positive_finite(
                self.top_n_sigma):
            raise ValueError("top_n_sigma must be None (off) or a finite "
                             f"number > 0, got {self.top_n_sigma!r}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got "
                             f"{type(self.seed).__name__} ({self.seed!r}).")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(
                f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(
                f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens="
                f"{self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < -1:
                raise ValueError(f"{name} must be non-negative or -1 (whole "
                                 f"vocabulary), got {value}.")
        self._verify_stop()
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or any(
                    not isinstance(word, str) or not word
                    for word in self.bad_words):
                raise ValueError("bad_words must be a list of non-empty "
                                 f"strings, got {self.bad_words!r}.")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty, got "
                                 f"{self.allowed_token_ids!r}.")
            _verify_token_ids("allowed_token_ids", self.allowed_token_ids)
            if min(self.allowed_token_ids) < 0:
                raise ValueError("allowed_token_ids must be non-negative, "
                                 f"got {self.allowed_token_ids!r}.")
        if self.logits_processors is not None:
            for fn in self.logits_processors:
                if logits_processor_takes_prompt(fn) is None:
                    raise ValueError(_LOGITS_PROCESSORS_ERROR +
                                     f"{self.logits_processors!r}.")
        if self.truncate_prompt_tokens is not None and not (
                self.truncate_prompt_tokens == -1
                or self.truncate_prompt_tokens >= 1):
            raise ValueError("truncate_prompt_tokens must be -1 or at least "
                             f"1, got {self.truncate_prompt_tokens}.")

    def _verify_stop(self) -> None:
        assert isinstance(self.stop, list)
        assert self.stop_token_ids is not None
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError(
                f"stop must be a string or a list of strings, got {self.stop!r}."
            )
        if "" in self.stop:
            raise ValueError(
                f"stop cannot contain an empty string, got {self.stop!r}.")
        if self.stop and not self.detokenize:
            raise ValueError(
                "stop strings are only supported when detokenize is True; "
                f"got stop={self.stop!r} with detokenize=False.")
        _verify_token_ids("stop_token_ids", self.stop_token_ids)

    @property
    def has_penalties(self) -> bool:
        """Whether a presence, frequency or repetition penalty is on."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Token ids that end the request: stop_token_ids, plus the model's
        EOS ids (unless ignore_eos) once update_from_generation_config ran.
        min_tokens masks exactly these."""
        return self._all_stop_token_ids

    @property
    def output_text_buffer_length(self) -> int:
        """Characters of text to hold back while a stop string may still be
        forming at the end of the output."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """bad_words as token id sequences, once update_from_tokenizer ran
        (None before, or without bad_words)."""
        return self._bad_words_token_ids

    def clone(self) -> "SamplingParams":
        """A deep copy: the engine's changes never reach the user's object.

        NOTE: logits processors are shared, not copied: they may hold state
        (a tokenizer, a grammar, a model) that is costly or impossible to
        copy. The list holding them is a new one.
        """
        memo: dict[int, Any] = {
            id(fn): fn
            for fn in self.logits_processors or ()
        }
        return copy.deepcopy(self, memo)

    def update_from_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Tokenize bad_words (the engine calls this once, on its own clone);
        see tokenize_bad_words. The sampler reads bad_words_token_ids."""
        if self.bad_words:
            self._bad_words_token_ids = tokenize_bad_words(
                self.bad_words, tokenizer)

    def update_from_generation_config(
            self,
            generation_config: dict[str, Any],
            model_eos_token_id: int | list[int] | None = None) -> None:
        """Learn the model's end-of-sequence ids (the engine calls this once,
        on its own clone).

        ``model_eos_token_id`` is the tokenizer's EOS. Extra EOS ids of the
        model's generation config (``eos_token_id``: an int or a list) are
        added to ``stop_token_ids``, as vLLM does, so that they report
        themselves as ``stop_reason``. With ignore_eos neither kind is added.
        """
        assert self.stop_token_ids is not None
        if self.ignore_eos:
            return
        eos_ids = _as_id_list(model_eos_token_id)
        extra_eos_ids = [
            token_id
            for token_id in _as_id_list(generation_config.get("eos_token_id"))
            if token_id not in eos_ids
        ]
        self.stop_token_ids = list(
            dict.fromkeys(self.stop_token_ids + extra_eos_ids))
        self._all_stop_token_ids.update(eos_ids)
        self._all_stop_token_ids.update(self.stop_token_ids)


def tokenize_bad_words(bad_words: list[str],
                       tokenizer: Tokenizer) -> list[list[int]]:
    """The token id sequences that ``bad_words`` forbid, as vLLM makes them.

    A word can appear at the start of the text or after a space, and most
    tokenizers spell the two differently, so each word (leading spaces
    stripped) is tokenized both bare and with one leading space. The spaced
    form is kept only when it differs from the bare one and has as many
    tokens: tokenizers that add a word-start marker themselves
    (SentencePiece) turn the extra space into a token of its own, and
    forbidding that longer sequence would add nothing. Duplicates and empty
    tokenizations are dropped; the order is that of ``bad_words``.
    """
    sequences: list[list[int]] = []
    for word in bad_words:
        bare = word.lstrip() or word  # a word of spaces stays as it is
        ids = list(tokenizer.encode(bare, add_special_tokens=False))
        spaced = list(tokenizer.encode(" " + bare, add_special_tokens=False))
        candidates = [ids]
        if spaced != ids and len(spaced) == len(ids):
            candidates.append(spaced)
        for candidate in candidates:
            if candidate and candidate not in sequences:
                sequences.append(candidate)
    return sequences


def logits_processor_takes_prompt(fn: LogitsProcessor) -> bool | None:
    """Whether ``fn`` is called ``fn(prompt_token_ids, output_token_ids,
    logits)`` (True) or ``fn(output_token_ids, logits)`` (False), by its
    number of required positional parameters; None when it is neither (or
    not callable). A callable whose signature cannot be read (some builtins)
    gets the two-argument form."""
    if not callable(fn):
        return None
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    positional = [
        p for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    required = sum(p.default is p.empty for p in positional)
    has_var_args = any(p.kind == p.VAR_POSITIONAL
                       for p in signature.parameters.values())
    if required == 3:
        return True
    if required == 2 or (required < 2 and
                         (len(positional) >= 2 or has_var_args)):
        return False
    return None


_LOGITS_PROCESSORS_ERROR = (
    "logits_processors must be a list of callables, each taking "
    "(output_token_ids, logits) or (prompt_token_ids, output_token_ids, "
    "logits), got ")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_positive_finite(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value) and value > 0


def _normalise_logit_bias(logit_bias: Any) -> dict[int, float]:
    """Keys to ints (JSON object keys arrive as strings), values to floats;
    ValueError naming logit_bias for anything else."""
    error = ValueError("logit_bias must map non-negative token ids to finite "
                       f"numbers, got {logit_bias!r}.")
    if not isinstance(logit_bias, dict):
        raise error
    result: dict[int, float] = {}
    for token_id, bias in logit_bias.items():
        if isinstance(token_id, bool) or not isinstance(token_id, (int, str)):
            raise error
        try:
            token = int(token_id)
        except ValueError:
            raise error from None
        if token < 0 or not (_is_real(bias) and math.isfinite(bias)):
            raise error
        result[token] = float(bias)
    return result


def _as_id_list(token_ids: int | list[int] | None) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, int):
        return [token_ids]
    return list(token_ids)


def _verify_token_ids(name: str, token_ids: list[int]) -> None:
    if any(not isinstance(t, int) for t in token_ids):
        raise ValueError(f"{name} must be a list of ints, got {token_ids!r}.")


# Compared against by SamplingParams.__repr__.
_DEFAULTS = SamplingParams()


@dataclass
class BeamSearchParams:
    """Parameters of ``LLM.beam_search`` (vLLM's fields and defaults).

    Args:
        beam_width: Number of beams kept at each step, and of sequences
            returned.
        max_tokens: Maximum number of tokens generated per sequence.
        ignore_eos: Treat the end-of-sequence token as an ordinary token.
        temperature: Accepted for compatibility; beams are ranked by the
            model's log-probabilities (raw logprobs, as in vLLM V1), so it
            does not change the result.
        length_penalty: A finished sequence scores cum_logprob / L **
            length_penalty, L its number of generated tokens (EOS included,
            prompt not): > 0 favours longer sequences, < 0 shorter ones.
    """
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or \
                    value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if not (_is_real(self.temperature) and math.isfinite(self.temperature)
                and self.temperature >= 0.0):
            raise ValueError("temperature must be finite and non-negative, "
                             f"got {self.temperature!r}.")
        if not (_is_real(self.length_penalty)
                and math.isfinite(self.length_penalty)):
            raise ValueError("length_penalty must be a finite number, got "
                             f"{self.length_penalty!r}.")
