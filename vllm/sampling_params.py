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
import math
from dataclasses import dataclass, field, fields
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

# Temperatures below this are greedy decoding.
_SAMPLING_EPS = 1e-5
# Smaller positive temperatures make logits / T overflow to inf in fp32.
_MIN_TEMPERATURE = 1e-2


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
        bad_words: Words whose tokens must never be generated.
        truncate_prompt_tokens: Keep only the last k prompt tokens; -1 keeps
            as many as the model allows.
        output_kind: What each streamed output carries (RequestOutputKind).
        extra_args: Free-form arguments for custom samplers.

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
    # The token ids that end the request; see all_stop_token_ids.
    _all_stop_token_ids: set[int] = field(default_factory=set,
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
            # JSON object keys arrive as strings.
            self.logit_bias = {
                int(token_id): bias
                for token_id, bias in self.logit_bias.items()
            }
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

    def clone(self) -> "SamplingParams":
        """A deep copy: the engine's changes never reach the user's object."""
        return copy.deepcopy(self)

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
