"""The sampler's per-step inputs, as tensors on the logits' device.

``SamplingMetadata.prepare`` turns per-request Python values into tensors
from scratch: every list is gathered on the host, packed into one int64 and
one float32 buffer, and copied to the device in two asynchronous transfers.
The engine uses ``SamplingState`` (sampling_state.py) instead, which builds
the same metadata from state kept between steps. The sampler then never
loops over requests (except for seeded generators and per-request logits
processors).
"""
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm.sampling_params import (LogitsProcessor, SamplingParams, SamplingType,
                                  logits_processor_takes_prompt)


@dataclass
class PenaltyTensors:
    """What presence, frequency and repetition penalties need; built only
    when some row uses one. A "key" is ``row * vocab_size + token_id``, the
    position of (row, token) in the flattened logits."""
    presence: torch.Tensor  # [N] float32; 0.0 is off
    frequency: torch.Tensor  # [N] float32; 0.0 is off
    repetition: torch.Tensor  # [N] float32; 1.0 is off
    # Every output token of every penalised row (repeats kept: they count).
    output_keys: torch.Tensor  # [T_out] int64
    # Every prompt token of the rows with a repetition penalty.
    prompt_keys: torch.Tensor  # [T_prompt] int64


@dataclass
class PenaltyCounts:
    """The same penalties from ``SamplingState``, whose per-sequence token
    counts stay on the device between steps, one row per slot."""
    presence: torch.Tensor  # [N] float32; 0.0 is off
    frequency: torch.Tensor  # [N] float32; 0.0 is off
    repetition: torch.Tensor  # [N] float32; 1.0 is off
    rows: torch.Tensor  # [P] int64: the penalised rows of the logits
    slots: torch.Tensor  # [P] int64: the slot of each, in ``counts``
    row_slots: torch.Tensor  # [N] int64: each row's slot, -1 if unpenalised
    counts: torch.Tensor  # [slots, V] int32: each token's count in the output
    # [slots, ceil(V / 32)] int32: bit t % 32 of word t // 32 is set when
    # token t is in the output, or in the prompt of a row with a repetition
    # penalty (``seen_mask`` unpacks it). A kernel reads these few bytes
    # and the counts only where a bit is set.
    seen: torch.Tensor


def seen_mask(seen: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``PenaltyCounts.seen`` rows [P, W] unpacked to [P, vocab_size] bool."""
    bits = torch.arange(32, dtype=torch.int32, device=seen.device)
    mask = ((seen.unsqueeze(-1) >> bits) & 1).bool()  # [P, W, 32]
    return mask.view(seen.shape[0], -1)[:, :vocab_size]


def seen_words(vocab_size: int) -> int:
    """Words of ``PenaltyCounts.seen`` per slot."""
    return -(-vocab_size // 32)


@dataclass
class StepRecord:
    """``SamplingState``'s request that the sampler bring its device state
    up to date for the next step, where it picks each row's token: add the
    token of each penalised row to ``PenaltyCounts`` (count and seen bit),
    and write each seeded row's key for its next step into ``next_keys``
    ([S] int64, ``step_keys`` of one step more; the step's own keys are
    left as they are). The fused kernels do both and set ``done``; on
    other paths (a recheck may still change a token) ``done`` stays False
    and ``SamplingState`` does it at the next ``prepare``."""
    next_keys: torch.Tensor | None  # None: no seeded row
    done: bool = False


@dataclass
class LogitBias:
    """Each request's logit_bias, in order of row, then of token id."""
    keys: torch.Tensor  # [B] int64: row * vocab_size + token id, each once
    values: torch.Tensor  # [B] float32: the bias added there
    # [N + 1] int64: row i's entries are keys[row_starts[i]:row_starts[i+1]]
    row_starts: torch.Tensor


def add_logit_bias(host: "HostBuffers", rows: np.ndarray, cols: np.ndarray,
                   values: np.ndarray, num_rows: int, vocab_size: int) -> None:
    """``LogitBias``'s arrays (``logit_bias_of`` reads them back) from
    (row, col, value) triples sorted by row, then col."""
    host.add("bias_keys", rows * vocab_size + cols, np.int64)
    host.add("bias_values", values, np.float32)
    host.add("bias_starts", np.searchsorted(rows, np.arange(num_rows + 1)),
             np.int64)


def logit_bias_of(get: Callable[[str], torch.Tensor]) -> LogitBias:
    return LogitBias(get("bias_keys"), get("bias_values"), get("bias_starts"))


@dataclass
class SamplingMetadata:
    """Sampling inputs of one step: row i describes the i-th sequence that
    samples a token this step (row i of the logits).

    Built once per step by ``prepare``: a parameter's tensor is None when no
    row uses it, so the sampler skips that step entirely. Index pairs
    ``(rows [M], cols [M])`` address single logits.
    """
    temperature: torch.Tensor  # [N] float32; 1.0 on greedy rows
    is_greedy: torch.Tensor  # [N] bool
    all_greedy: bool
    all_random: bool  # no greedy row
    top_p: torch.Tensor | None  # [N] float32
    top_k: torch.Tensor | None  # [N] int64; "off" is vocab_size
    # How many of each row's largest logits top_k and top_p look at: the
    # largest top_k, or vocab_size when some row uses top_p without top_k
    # (normalised over its whole row; the sampler still sorts only some).
    # 0 when neither is used.
    top_k_top_p_width: int
    max_top_k: int  # the largest top_k in use; 0 when no row uses one
    # The batch has a random row, and each has a top_k, a top_p, a min_p or
    # a top_n_sigma: the draw may use only the sorted largest logits.
    truncated_everywhere: bool
    # ... and each has a top_k or a top_p (the logits are sorted anyway).
    top_k_top_p_everywhere: bool
    # ... and each has a top_k: a bound on how many logits it keeps.
    top_k_everywhere: bool
    min_p: torch.Tensor | None  # [N] float32
    top_n_sigma: torch.Tensor | None  # [N] float32; 0.0 is off
    # Row -> its request's own generator, for seeded rows only.
    generators: dict[int, torch.Generator]
    # The rows of ``generators``, in its order [S] int64; None when empty.
    seeded_rows: torch.Tensor | None
    # Each row's index in ``generators`` [N] int64, -1 when unseeded; None
    # when no row is seeded.
    seeded_index: torch.Tensor | None
    # The step's Philox key of each seeded row [S] int64, in ``generators``'
    # order: the kernels make a seeded row's noise from it alone. Drawn from
    # the row's generator by ``prepare``; ``SamplingState`` draws one per
    # sequence once and derives each step's from it (``step_keys``).
    seeded_keys: torch.Tensor | None
    # Top logprobs to return (the batch's largest request); None: no row asked.
    max_num_logprobs: int | None
    # Positions that min_tokens forbids (row, token id): (rows [M], cols [M]).
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None
    penalties: PenaltyTensors | PenaltyCounts | None
    logit_bias: LogitBias | None
    # The rows that have allowed_token_ids [R], and (rows [A], cols [A]): the
    # tokens they allow. Every other logit of those rows becomes -inf.
    allowed_token_ids: tuple[torch.Tensor, tuple[torch.Tensor,
                                                 torch.Tensor]] | None
    # The last token of every bad word whose prefix ends the output:
    # (rows [M], cols [M]).
    bad_words_mask: tuple[torch.Tensor, torch.Tensor] | None
    # Some logits may be -inf before truncation (a mask above, or a logits
    # processor): top-nσ then takes σ over the finite logits only.
    has_masked_tokens: bool
    # Rows with per-request logits processors, each with whether it takes
    # the prompt (the three-argument form).
    logits_processors: list[tuple[int, list[tuple[LogitsProcessor, bool]]]]
    # Kept as lists for the logits processors.
    output_token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    # What the sampler may record for the next step (``SamplingState``).
    record: StepRecord | None = None

    @property
    def edits_logits(self) -> bool:
        """Whether some step before sampling changes the logits."""
        return bool(self.logits_processors or self.min_tokens_mask is not None
                    or self.penalties is not None or self.logit_bias is not None
                    or self.allowed_token_ids is not None
                    or self.bad_words_mask is not None)

    @classmethod
    def prepare(
            cls,
            params: list[SamplingParams],
            generators: list[torch.Generator | None],
            output_token_ids: list[list[int]],
            prompt_token_ids: list[list[int]],
            vocab_size: int,
            device: torch.device,
            bad_words_token_ids: list[list[list[int]]] | None = None,
            history_cache: "TokenHistoryCache | None" = None
    ) -> "SamplingMetadata":
        """Build the metadata of one step; every list has one entry per row.

        ``generators[i]`` is the seeded generator of row i's request (on
        ``device``), None for unseeded rows. ``vocab_size`` is the width of
        the logits; token ids in the prompts and outputs must be below it.
        ``bad_words_token_ids[i]`` is row i's bad words as token id
        sequences (see ``tokenize_bad_words``); when it is None, each row's
        ``params.bad_words_token_ids`` is used (``update_from_tokenizer``).
        Ids of logit_bias, allowed_token_ids, bad words and stop tokens
        outside [0, vocab_size) are ignored: the engine rejects them first.
        ``history_cache`` (one per engine, passed at every step) keeps the
        penalised rows' token histories converted between steps; without
        it, every step converts them all.
        """
        host = HostBuffers(device)
        is_greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        all_greedy = all(is_greedy)
        # Greedy rows divide by 1.0: they are sampled and then discarded.
        temperature = [
            1.0 if greedy else p.temperature
            for p, greedy in zip(params, is_greedy)
        ]
        top_k = [
            vocab_size if p.top_k == 0 else min(p.top_k, vocab_size)
            for p in params
        ]
        use_top_k = any(k < vocab_size for k in top_k)
        use_top_p = any(p.top_p < 1.0 for p in params)
        use_min_p = any(p.min_p > 0.0 for p in params)
        top_n_sigma = [p.top_n_sigma or 0.0 for p in params]
        use_top_n_sigma = any(top_n_sigma)
        max_top_k = max((k for k in top_k if k < vocab_size), default=0)
        width = vocab_size if any(p.top_p < 1.0 and k == vocab_size
                                  for p, k in zip(params, top_k)) else max_top_k

        # -1 asks for the whole vocabulary.
        num_logprobs = [
            vocab_size if p.logprobs == -1 else min(p.logprobs, vocab_size)
            for p in params if p.logprobs is not None
        ]

        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for row, (p, output) in enumerate(zip(params, output_token_ids)):
            if len(output) < p.min_tokens:
                # Ids outside the logits can never be sampled anyway.
                cols = [t for t in p.all_stop_token_ids if t < vocab_size]
                mask_rows += [row] * len(cols)
                mask_cols += cols

        bad_rows, bad_cols = _bad_words_to_mask(params, output_token_ids,
                                                bad_words_token_ids, vocab_size)
        processors = [(row, [(fn, bool(logits_processor_takes_prompt(fn)))
                             for fn in p.logits_processors])
                      for row, p in enumerate(params) if p.logits_processors]

        # Everything goes through `host`; `get` hands out device tensors
        # once both buffers have been copied.
        seeded = {
            row: gen
            for row, gen in enumerate(generators) if gen is not None
        }
        host.add("temperature", temperature, np.float32)
        host.add("is_greedy", is_greedy, np.int64)
        if seeded:
            host.add("seeded_rows", list(seeded), np.int64)
            host.add("seeded_index", seeded_index(seeded, len(params)),
                     np.int64)
        seeded_keys = None
        if any(g.device.type != "cpu" for g in seeded.values()):
            # Drawn where the generators are: no wait for the device.
            seeded_keys = torch.cat([
                torch.randint(1 << 62, (1, ), generator=g,
                              device=g.device).to(device)
                for g in seeded.values()
            ])
        elif seeded:
            host.add("seeded_keys", [draw_key(g) for g in seeded.values()],
                     np.int64)
        if use_top_p:
            host.add("top_p", [p.top_p for p in params], np.float32)
        if use_top_k:
            host.add("top_k", top_k, np.int64)
        if use_min_p:
            host.add("min_p", [p.min_p for p in params], np.float32)
        if use_top_n_sigma:
            host.add("top_n_sigma", top_n_sigma, np.float32)
        if mask_rows:
            host.add("min_tokens_rows", mask_rows, np.int64)
            host.add("min_tokens_cols", mask_cols, np.int64)
        if bad_rows:
            host.add("bad_rows", bad_rows, np.int64)
            host.add("bad_cols", bad_cols, np.int64)
        use_penalties = _add_penalties(host, params, output_token_ids,
                                       prompt_token_ids, vocab_size,
                                       history_cache)
        use_logit_bias = _add_logit_bias(host, params, vocab_size)
        use_allowed = _add_allowed_token_ids(host, params, vocab_size)
        get = host.to_device()
        if seeded and seeded_keys is None:
            seeded_keys = get("seeded_keys")

        def pair(rows: str, cols: str) -> tuple[torch.Tensor, torch.Tensor]:
            return get(rows), get(cols)

        return cls(
            temperature=get("temperature"),
            is_greedy=get("is_greedy") != 0,
            all_greedy=all_greedy,
            all_random=not any(is_greedy),
            top_p=get("top_p") if use_top_p else None,
            top_k=get("top_k") if use_top_k else None,
            top_k_top_p_width=width,
            max_top_k=max_top_k,
            truncated_everywhere=not all_greedy
            and all(greedy or k < vocab_size or p.top_p < 1.0 or p.min_p > 0.0
                    or bool(p.top_n_sigma)
                    for p, k, greedy in zip(params, top_k, is_greedy)),
            top_k_top_p_everywhere=not all_greedy
            and all(greedy or k < vocab_size or p.top_p < 1.0
                    for p, k, greedy in zip(params, top_k, is_greedy)),
            top_k_everywhere=not all_greedy
            and all(greedy or k < vocab_size
                    for k, greedy in zip(top_k, is_greedy)),
            min_p=get("min_p") if use_min_p else None,
            top_n_sigma=get("top_n_sigma") if use_top_n_sigma else None,
            generators=seeded,
            seeded_rows=get("seeded_rows") if seeded else None,
            seeded_index=get("seeded_index") if seeded else None,
            seeded_keys=seeded_keys,
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            min_tokens_mask=(pair("min_tokens_rows", "min_tokens_cols")
                             if mask_rows else None),
            penalties=PenaltyTensors(
                presence=get("presence"),
                frequency=get("frequency"),
                repetition=get("repetition"),
                output_keys=get("output_keys"),
                prompt_keys=get("prompt_keys"),
            ) if use_penalties else None,
            logit_bias=logit_bias_of(get) if use_logit_bias else None,
            allowed_token_ids=((get("allowed_row_ids"),
                                pair("allowed_rows", "allowed_cols"))
                               if use_allowed else None),
            bad_words_mask=pair("bad_rows", "bad_cols") if bad_rows else None,
            has_masked_tokens=bool(mask_rows or bad_rows or use_allowed
                                   or processors),
            logits_processors=processors,
            output_token_ids=output_token_ids,
            prompt_token_ids=prompt_token_ids,
        )


def _bad_words_to_mask(params: list[SamplingParams],
                       output_token_ids: list[list[int]],
                       bad_words_token_ids: list[list[list[int]]] | None,
                       vocab_size: int) -> tuple[list[int], list[int]]:
    """The (row, token) pairs that bad words forbid this step."""
    words: Sequence[list[list[int]] | None]
    if bad_words_token_ids is not None:
        words = bad_words_token_ids
    else:
        words = [checked_bad_words(p) for p in params]
    return bad_words_pairs(range(len(params)), words, output_token_ids,
                           vocab_size)


def checked_bad_words(params: SamplingParams) -> list[list[int]] | None:
    """``params.bad_words_token_ids``; an error if the words were never
    tokenized."""
    if params.bad_words_token_ids is None and params.bad_words:
        raise ValueError(
            f"bad_words {params.bad_words!r} have no token ids: call "
            "SamplingParams.update_from_tokenizer or pass "
            "bad_words_token_ids to SamplingMetadata.prepare.")
    return params.bad_words_token_ids


def bad_words_pairs(rows: Iterable[int],
                    words: Sequence[list[list[int]] | None],
                    output_token_ids: Sequence[list[int]],
                    vocab_size: int) -> tuple[list[int], list[int]]:
    """(row, token) pairs for ``rows``, with ``words[i]`` and
    ``output_token_ids[i]`` those of ``rows[i]``: the last token of each bad
    word whose other tokens end the output (a one-token bad word is always
    forbidden)."""
    pairs_rows: list[int] = []
    cols: list[int] = []
    for row, row_words, output in zip(rows, words, output_token_ids):
        for word in row_words or ():
            prefix_len = len(word) - 1
            if prefix_len < 0 or prefix_len > len(output):
                continue  # empty, or its prefix is longer than the output
            if not 0 <= word[-1] < vocab_size:
                continue
            if prefix_len == 0 or output[-prefix_len:] == word[:-1]:
                pairs_rows.append(row)
                cols.append(word[-1])
    return pairs_rows, cols


def _add_penalties(host: "HostBuffers", params: list[SamplingParams],
                   output_token_ids: list[list[int]],
                   prompt_token_ids: list[list[int]], vocab_size: int,
                   history_cache: "TokenHistoryCache | None") -> bool:
    """Per-row penalties and the keys of the tokens they touch."""
    penalised = [row for row, p in enumerate(params) if p.has_penalties]
    if history_cache is not None:
        history_cache.start_step()
    if not penalised:
        return False
    # Only the repetition penalty looks at the prompt.
    repeated = [
        row for row in penalised if params[row].repetition_penalty != 1.0
    ]
    host.add("presence", [p.presence_penalty for p in params], np.float32)
    host.add("frequency", [p.frequency_penalty for p in params], np.float32)
    host.add("repetition", [p.repetition_penalty for p in params], np.float32)
    host.add(
        "output_keys",
        _token_keys(penalised, output_token_ids, vocab_size, history_cache),
        np.int64)
    host.add("prompt_keys",
             _token_keys(repeated, prompt_token_ids, vocab_size, history_cache),
             np.int64)
    return True


def _token_keys(rows: list[int], token_ids: list[list[int]], vocab_size: int,
                history_cache: "TokenHistoryCache | None") -> np.ndarray:
    """``row * vocab_size + token`` for every token of the given rows."""
    lists = [token_ids[row] for row in rows]
    lengths = [len(ids) for ids in lists]
    if history_cache is None:
        flat = np.fromiter(itertools.chain.from_iterable(lists),
                           dtype=np.int64,
                           count=sum(lengths))
    else:
        flat = np.concatenate([history_cache.get(ids) for ids in lists] +
                              [np.empty(0, dtype=np.int64)])
    return flat + np.repeat(
        np.asarray(rows, dtype=np.int64) * vocab_size, lengths)


class TokenHistoryCache:
    """Token histories as int64 arrays, kept from one step to the next so
    that a step converts only the tokens that are new.

    NOTE: it relies on the engine passing the same list objects at every
    step, which only grow by appending (``Sequence``'s prompt and output
    lists do). An entry is keyed by its list and holds it, so the key
    stays unique; a list that shrank or whose last cached token changed is
    converted again. Lists not used in a step are dropped at the next.
    """

    def __init__(self) -> None:
        # id(list) -> [the list, buffer, tokens in the buffer, last token]
        self._previous: dict[int, list] = {}
        self._current: dict[int, list] = {}

    def start_step(self) -> None:
        """Forget the lists that the last step did not use."""
        self._previous, self._current = self._current, {}

    def get(self, tokens: list[int]) -> np.ndarray:
        """``tokens`` as an int64 array (a view: do not modify it)."""
        key = id(tokens)
        entry = self._current.get(key) or self._previous.get(key)
        num_tokens = len(tokens)
        if entry is None or entry[0] is not tokens or not (
                entry[2] <= num_tokens and
            (entry[2] == 0 or tokens[entry[2] - 1] == entry[3])):
            # New, or not grown by appending: convert it all, with room to
            # grow.
            buffer = np.empty(max(16, 2 * num_tokens), dtype=np.int64)
            buffer[:num_tokens] = tokens
            entry = [tokens, buffer, 0, None]
        else:
            done = entry[2]
            if num_tokens > done:
                buffer = entry[1]
                if num_tokens > len(buffer):
                    grown = np.empty(2 * num_tokens, dtype=np.int64)
                    grown[:done] = buffer[:done]
                    entry[1] = buffer = grown
                buffer[done:num_tokens] = tokens[done:]
        entry[2] = num_tokens
        entry[3] = tokens[-1] if tokens else None
        self._current[key] = entry
        return entry[1][:num_tokens]


def _add_logit_bias(host: "HostBuffers", params: list[SamplingParams],
                    vocab_size: int) -> bool:
    biased = [(row, p.logit_bias) for row, p in enumerate(params)
              if p.logit_bias]
    if not biased:
        return False
    rows, cols = pairs([row for row, _ in biased],
                       [list(bias) for _, bias in biased])
    values = np.fromiter(itertools.chain.from_iterable(bias.values()
                                                       for _, bias in biased),
                         dtype=np.float32,
                         count=len(cols))
    order = np.lexsort((cols, rows))
    keep = order[cols[order] < vocab_size]
    add_logit_bias(host, rows[keep], cols[keep], values[keep], len(params),
                   vocab_size)
    return True


def _add_allowed_token_ids(host: "HostBuffers", params: list[SamplingParams],
                           vocab_size: int) -> bool:
    allowed = [(row, p.allowed_token_ids) for row, p in enumerate(params)
               if p.allowed_token_ids is not None]
    if not allowed:
        return False
    rows, cols = pairs([row for row, _ in allowed], [ids for _, ids in allowed])
    keep = cols < vocab_size
    host.add("allowed_row_ids", [row for row, _ in allowed], np.int64)
    host.add("allowed_rows", rows[keep], np.int64)
    host.add("allowed_cols", cols[keep], np.int64)
    return True


def draw_key(generator: torch.Generator) -> int:
    """A Philox key from a seeded request's generator (a CUDA generator
    waits for the device; the engine's are on the CPU)."""
    return int(
        torch.randint(1 << 62, (1, ),
                      generator=generator,
                      device=generator.device).item())


def sequence_key(seed: int, index: int) -> int:
    """The Philox key of sample ``index`` (of ``n``) of a request seeded
    with ``seed``: what the engine gives ``SamplingState`` for its
    sequences, kept across preemptions, consuming no generator state."""
    mixed = (seed * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    return mixed & ((1 << 62) - 1)


# Odd, about 2^64 / golden ratio: step keys of one sequence spread apart.
_KEY_STEP = np.uint64(0x9E3779B97F4A7C15)
_KEY_MASK = np.uint64((1 << 62) - 1)
# What one more step adds to a key, modulo 2**62: a kernel advances a key
# with (key + KEY_STEP) & KEY_MASK in int64 without overflow.
KEY_STEP = int(_KEY_STEP & _KEY_MASK)
KEY_MASK = int(_KEY_MASK)


def step_keys(keys: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The Philox key of step ``steps`` [S] (tokens generated so far) of the
    sequences whose own keys are ``keys`` [S] int64: a function of the two
    alone, so a seeded sequence draws the same noise whatever the batch."""
    mixed = keys.astype(np.uint64) + steps.astype(np.uint64) * _KEY_STEP
    return (mixed & _KEY_MASK).astype(np.int64)


def seeded_index(seeded: dict[int, torch.Generator],
                 num_rows: int) -> np.ndarray:
    """``SamplingMetadata.seeded_index`` of the seeded rows ``seeded``."""
    index = np.full(num_rows, -1, dtype=np.int64)
    index[list(seeded)] = np.arange(len(seeded))
    return index


def pairs(
    rows: Sequence[int], cols: Sequence[Sequence[int] | np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) pairs: each row repeated once for each of its cols."""
    lengths = [len(c) for c in cols]
    flat = np.fromiter(itertools.chain.from_iterable(cols),
                       dtype=np.int64,
                       count=sum(lengths))
    return np.repeat(np.asarray(rows, dtype=np.int64), lengths), flat


class HostBuffers:
    """Named host arrays, copied to the device in two transfers (one int64,
    one float32) from pinned memory: asynchronous, no device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.arrays: dict[type, list[np.ndarray]] = {
            np.int64: [],
            np.float32: []
        }
        self.slices: dict[str, tuple[type, int, int]] = {}

    def add(self, name: str, values: Sequence | np.ndarray,
            dtype: type) -> None:
        array: np.ndarray = np.asarray(values, dtype=dtype).reshape(-1)
        arrays = self.arrays[dtype]
        start = sum(len(a) for a in arrays)
        arrays.append(array)
        self.slices[name] = (dtype, start, start + len(array))

    def to_device(self) -> Callable[[str], torch.Tensor]:
        on_device: dict[type, torch.Tensor] = {}
        pin_memory = self.device.type == "cuda"
        for dtype, arrays in self.arrays.items():
            if not arrays:
                continue
            size = sum(len(a) for a in arrays)
            torch_dtype = torch.int64 if dtype is np.int64 else torch.float32
            buffer = torch.empty(size, dtype=torch_dtype, pin_memory=pin_memory)
            if arrays:
                np.concatenate(arrays, out=buffer.numpy())
            on_device[dtype] = buffer.to(self.device, non_blocking=True)

        def get(name: str) -> torch.Tensor:
            dtype, start, end = self.slices[name]
            return on_device[dtype][start:end]

        return get
