"""``SamplingState``: the engine's sampling inputs, kept from step to step.

``SamplingMetadata.prepare`` converts every request's parameters and token
histories at every step. ``SamplingState.prepare`` returns the same metadata
but keeps what does not change between steps:

- every sequence that samples owns a slot; its parameters are converted
  once, when it joins. The per-row tensors are rebuilt only when the batch's
  sequences change: an unchanged all-greedy batch costs one list comparison.
- for the penalties, each slot's output token counts ([slots, vocab] int32)
  and a bit per token seen in its output or prompt (``PenaltyCounts.seen``)
  stay on the device; a step adds only the tokens sampled since the last
  one, in place. The metadata's ``StepRecord`` asks the sampler to add
  them where it picks them (the fused kernels do): then the next step,
  when every output grew by one, has nothing to add. Otherwise, when the
  caller passed the last step's sampled ids to ``sampled`` and every
  output grew by one, those ids (already on the device) are the new
  tokens: the host reads no token at all. Else it uploads each output's
  last token (one int per row); a last token still
  ``PLACEHOLDER_TOKEN_ID`` (async scheduling: the step that samples it has
  not reached the host) is taken from those ids on the device.
- a seeded sequence's Philox key for each step (``step_keys``) is uploaded
  when the batch changes; the sampler then writes the next step's keys
  (``StepRecord.next_keys``).

Only rows with min_tokens or bad words look at their outputs on the host at
every step. A sequence absent from a step loses its slot (it finished, or
was preempted: it is rebuilt from its lists when it comes back), so the
caller never has to say which sequences finished.
"""
import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vllm.model_executor.layers.ops import get_sampling_kernels
from vllm.model_executor.sampling_metadata import (
    HostBuffers, PenaltyCounts, SamplingMetadata, StepRecord, add_logit_bias,
    bad_words_pairs, checked_bad_words, draw_key, logit_bias_of, pairs,
    seeded_index, seen_words, step_keys)
from vllm.sampling_params import (LogitsProcessor, SamplingParams, SamplingType,
                                  logits_processor_takes_prompt)
from vllm.sequence import PLACEHOLDER_TOKEN_ID

# Columns of SamplingState._floats, one row per slot.
_TEMPERATURE, _TOP_P, _MIN_P, _TOP_N_SIGMA = 0, 1, 2, 3
_PRESENCE, _FREQUENCY, _REPETITION = 4, 5, 6
# Columns of SamplingState._ints.
_GREEDY, _TOP_K, _NUM_LOGPROBS, _MIN_TOKENS, _FLAGS = 0, 1, 2, 3, 4
# SamplingState._last_token of an output whose last token only the device
# knows (it came from ``SamplingState.sampled``).
_UNKNOWN = -2
# Bits of the _FLAGS column: which sparse features a slot uses.
_PENALISED, _BIAS, _ALLOWED, _BAD_WORDS, _PROCESSORS, _SEEDED = (
    1 << i for i in range(6))


@dataclass
class _Request:
    """What a slot keeps of its sequence besides its numeric parameters."""
    generator: torch.Generator | None
    key: int  # a seeded sequence's own Philox key (``step_keys``)
    stop_ids: np.ndarray  # [S] int64: forbidden while below min_tokens
    bias: tuple[np.ndarray, np.ndarray] | None  # token ids, values
    allowed: np.ndarray | None  # token ids
    bad_words: list[list[int]] | None
    processors: list[tuple[LogitsProcessor, bool]]
    uses_prompt: bool  # a repetition penalty: it reads the prompt too


@dataclass
class _CountsUpdate:
    """What ``_update_counts`` uploaded for the device side."""
    rebuilt: bool = False  # rebuild_slots, rebuild_keys, prompt_keys
    appended: bool = False  # append_keys
    # The ids ``SamplingState.sampled`` got: each penalised row's new token.
    sampled: torch.Tensor | None = None
    # Those ids again, when only some rows' new tokens are placeholders
    # (pending_slot_keys, pending_rows: their slots and rows there).
    pending: torch.Tensor | None = None


@dataclass
class _Batch:
    """One composition of the batch: its slots and the metadata that does
    not change while the same sequences sample."""
    seq_ids: list[int]
    metadata: SamplingMetadata  # min_tokens, bad words, penalties: None
    min_tokens_rows: list[int]
    bad_words_rows: list[int]
    penalised_rows: list[int]
    penalised_slots: np.ndarray  # [P] int64
    penalised_rows_dev: torch.Tensor | None  # [P] int64
    penalised_slots_dev: torch.Tensor | None  # [P] int64
    slot_keys_dev: torch.Tensor | None  # [P] int64: slot * vocab_size
    row_slots_dev: torch.Tensor | None  # [N] int64, -1 where unpenalised
    # presence, frequency, repetition [N] float32, when some row is penalised
    penalty_params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    # Seeded rows, and their sequences' keys [S] int64.
    seeded_rows: list[int]
    seeded_keys: np.ndarray
    # Only the metadata's output and prompt lists change at each step.
    static: bool
    # The step keys on the device [S] int64, and the steps (output lengths)
    # they are for; None until uploaded.
    step_keys_dev: torch.Tensor | None = None
    key_steps: list[int] | None = None
    # The keys of a step before, free once the sampler recorded the next
    # ones: where it writes those of the step after (no allocation).
    spare_keys: torch.Tensor | None = None
    # The penalised rows' output lists whose tokens the device counts hold
    # (``SamplingState._outputs`` of their slots, in row order; None until
    # counted), and whether the last token of each is known only to the
    # device (``_UNKNOWN``). They spare a steady step the slot lookups.
    counted: list[list[int]] | None = None
    last_unknown: bool = False
    # The penalties of the last step, while their tensors stay the same.
    penalties: PenaltyCounts | None = None


def _pick(items: list, index: np.ndarray) -> list:
    """``items`` at ``index`` (sorted, unique); no copy when it is all."""
    if len(index) == len(items):
        return items
    return [items[i] for i in index.tolist()]


class SamplingState:
    """Builds each step's ``SamplingMetadata`` from state kept since the
    last step (one per model runner).

    NOTE: a sequence keeps the parameters, generator and token lists it had
    when it joined; its output list may only grow by appending (as
    ``Sequence.output_token_ids`` does). A list that changed otherwise is
    converted again. Sample with the metadata of the last ``prepare``: its
    ``StepRecord`` is the one the next ``prepare`` reads.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset(0)

    def _reset(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._slot_of: dict[int, int] = {}
        self._free: list[int] = []
        self._floats = np.zeros((0, 7), dtype=np.float32)
        self._ints = np.zeros((0, 5), dtype=np.int64)
        self._requests: list[_Request | None] = []
        # Penalties: per slot, the output list whose tokens the device
        # counts hold, and how many of them they hold.
        self._outputs = np.empty(0, dtype=object)
        self._output_len = np.zeros(0, dtype=np.int64)
        # Its last token; _UNKNOWN when the device added it (``sampled``).
        self._last_token = np.zeros(0, dtype=np.int64)
        # Allocated with the first penalised sequence, grown with the slots.
        self._counts: torch.Tensor | None = None  # [slots, V] int32
        self._seen: torch.Tensor | None = None  # [slots, V / 32] int32
        self._batch: _Batch | None = None
        # The ids sampled with the last metadata, and the sequence of each
        # row (``sampled``).
        self._sampled: tuple[list[int], torch.Tensor] | None = None
        # What the last metadata asked the sampler to record.
        self._record: StepRecord | None = None

    @property
    def num_slots(self) -> int:
        """Slots in use: the sequences of the last step."""
        return len(self._slot_of)

    def prepare(self,
                seq_ids: list[int],
                params: list[SamplingParams],
                generators: list[torch.Generator | None],
                output_token_ids: list[list[int]],
                prompt_token_ids: list[list[int]],
                vocab_size: int,
                seed_keys: list[int | None] | None = None) -> SamplingMetadata:
        """The metadata of one step; ``seq_ids[i]`` identifies row i's
        sequence, the other lists are as for ``SamplingMetadata.prepare``
        (bad words come from ``params.bad_words_token_ids``).

        ``seed_keys[i]``: the Philox key of row i's sequence when seeded
        (``sequence_key``; the kernels' noise is a function of it and the
        output length). Without it, a seeded sequence draws one from its
        generator when it takes a slot, so one that leaves a step and comes
        back draws another.
        """
        if vocab_size != self.vocab_size:
            self._reset(vocab_size)
        self._take_record()
        batch = self._batch
        sampled, self._sampled = self._sampled, None
        if batch is None or batch.seq_ids != seq_ids:
            batch = self._batch = self._new_batch(list(seq_ids), params,
                                                  generators, seed_keys,
                                                  output_token_ids,
                                                  prompt_token_ids)
        if batch.static:
            # Its token lists are those of the same sequences.
            return batch.metadata

        host = HostBuffers(self.device)
        mask_rows, mask_cols = self._min_tokens_pairs(batch, output_token_ids)
        bad_rows, bad_cols = bad_words_pairs(batch.bad_words_rows, [
            self._request_of(batch, row).bad_words
            for row in batch.bad_words_rows
        ], [output_token_ids[row] for row in batch.bad_words_rows], vocab_size)
        if mask_rows:
            host.add("min_tokens_rows", mask_rows, np.int64)
            host.add("min_tokens_cols", mask_cols, np.int64)
        if bad_rows:
            host.add("bad_rows", bad_rows, np.int64)
            host.add("bad_cols", bad_cols, np.int64)
        update = self._update_counts(batch, output_token_ids, prompt_token_ids,
                                     host, sampled)
        upload_keys = False
        if batch.seeded_rows:
            steps = list(
                map(len, map(output_token_ids.__getitem__, batch.seeded_rows)))
            upload_keys = steps != batch.key_steps
            if upload_keys:
                host.add("seeded_keys",
                         step_keys(batch.seeded_keys, np.array(steps)),
                         np.int64)
                batch.key_steps = steps
        get = host.to_device()
        if upload_keys:
            batch.step_keys_dev = get("seeded_keys")
        penalties = None
        if batch.penalised_rows:
            penalties = self._penalty_counts(batch, update, get)
        if batch.penalised_rows or batch.seeded_rows:
            next_keys = batch.spare_keys
            if next_keys is None and batch.step_keys_dev is not None:
                next_keys = torch.empty_like(batch.step_keys_dev)
            self._record = StepRecord(next_keys)
        # A shallow copy with this step's fields (dataclasses.replace would
        # run __init__ over every field: slower, at every step).
        metadata = copy.copy(batch.metadata)
        if mask_rows:
            metadata.min_tokens_mask = (get("min_tokens_rows"),
                                        get("min_tokens_cols"))
        if bad_rows:
            metadata.bad_words_mask = (get("bad_rows"), get("bad_cols"))
        metadata.has_masked_tokens = bool(metadata.has_masked_tokens
                                          or mask_rows or bad_rows)
        metadata.penalties = penalties
        metadata.seeded_keys = batch.step_keys_dev
        metadata.output_token_ids = output_token_ids
        metadata.prompt_token_ids = prompt_token_ids
        metadata.record = self._record
        return metadata

    def sampled(self, token_ids: torch.Tensor) -> None:
        """The ids [N] sampled with the metadata ``prepare`` returned last
        (on its device, final: without a recheck pending). The next
        ``prepare`` of the same sequences takes them as the token each
        output gained, when each grew by exactly one (as decoding appends
        the sampled token), without reading the outputs' tokens; and any
        ``prepare`` takes them for an output whose last token is still a
        placeholder."""
        assert self._batch is not None, "sampled before prepare"
        self._sampled = (self._batch.seq_ids, token_ids)

    def _take_record(self) -> None:
        """What the sampler recorded with the last metadata: the token of
        each penalised row is in its counts, and each seeded row's key for
        one step more is on the device."""
        record, self._record = self._record, None
        batch = self._batch
        if record is None or not record.done or batch is None:
            return
        slots = batch.penalised_slots
        self._output_len[slots] += 1
        self._last_token[slots] = _UNKNOWN
        batch.last_unknown = True
        if batch.key_steps is not None:
            batch.spare_keys = batch.step_keys_dev
            batch.step_keys_dev = record.next_keys
            batch.key_steps = [step + 1 for step in batch.key_steps]

    # ------------------------------------------------------------ slots
    def _admit(self, seq_id: int, params: SamplingParams,
               generator: torch.Generator | None, key: int | None) -> int:
        """A slot for a sequence that joins, with its parameters."""
        if not self._free:
            self._grow_slots(max(16, 2 * len(self._requests)))
        slot = self._free.pop()
        self._slot_of[seq_id] = slot
        vocab_size = self.vocab_size
        greedy = params.sampling_type == SamplingType.GREEDY
        penalised = params.has_penalties
        bad_words = checked_bad_words(params)
        processors = [(fn, bool(logits_processor_takes_prompt(fn)))
                      for fn in params.logits_processors or ()]
        # Ids outside the logits are ignored, as in SamplingMetadata.
        stop_ids = np.fromiter(
            (t for t in params.all_stop_token_ids if t < vocab_size),
            dtype=np.int64)
        bias = None
        if params.logit_bias:
            cols = np.fromiter(params.logit_bias, dtype=np.int64)
            values = np.fromiter(params.logit_bias.values(), dtype=np.float32)
            order = np.argsort(cols)  # LogitBias sorts each row's columns
            keep = order[cols[order] < vocab_size]
            bias = cols[keep], values[keep]
        allowed = None
        if params.allowed_token_ids is not None:
            allowed = np.asarray(params.allowed_token_ids, dtype=np.int64)
            allowed = allowed[allowed < vocab_size]
        self._floats[slot] = (
            1.0 if greedy else params.temperature,  # greedy rows divide by 1
            params.top_p,
            params.min_p,
            params.top_n_sigma or 0.0,
            params.presence_penalty,
            params.frequency_penalty,
            params.repetition_penalty)
        flags = ((_PENALISED if penalised else 0) |
                 (_BIAS if bias is not None else 0) |
                 (_ALLOWED if allowed is not None else 0) |
                 (_BAD_WORDS if bad_words else 0) |
                 (_PROCESSORS if processors else 0) |
                 (_SEEDED if generator is not None else 0))
        num_logprobs = -1
        if params.logprobs is not None:
            num_logprobs = (vocab_size if params.logprobs == -1 else min(
                params.logprobs, vocab_size))
        self._ints[slot] = (greedy, vocab_size if params.top_k == 0 else min(
            params.top_k, vocab_size), num_logprobs, params.min_tokens, flags)
        self._requests[slot] = _Request(
            generator=generator,
            key=(0 if generator is None else
                 draw_key(generator) if key is None else key),
            stop_ids=stop_ids,
            bias=bias,
            allowed=allowed,
            bad_words=bad_words,
            processors=processors,
            uses_prompt=params.repetition_penalty != 1.0)
        # No counts yet: the first step converts the output.
        self._outputs[slot] = None
        self._output_len[slot] = 0
        return slot

    def _release(self, seq_id: int) -> None:
        slot = self._slot_of.pop(seq_id)
        self._requests[slot] = None
        self._outputs[slot] = None
        self._free.append(slot)

    def _grow_slots(self, num_slots: int) -> None:
        old = len(self._requests)
        self._floats = np.resize(self._floats, (num_slots, 7))
        self._ints = np.resize(self._ints, (num_slots, 5))
        self._outputs = np.resize(self._outputs, num_slots)
        self._output_len = np.resize(self._output_len, num_slots)
        self._last_token = np.resize(self._last_token, num_slots)
        self._requests += [None] * (num_slots - old)
        # Lowest slots first.
        self._free += reversed(range(old, num_slots))

    def _request_of(self, batch: _Batch, row: int) -> _Request:
        request = self._requests[self._slot_of[batch.seq_ids[row]]]
        assert request is not None
        return request

    # ------------------------------------------------------------ batches
    def _new_batch(self, seq_ids: list[int], params: list[SamplingParams],
                   generators: list[torch.Generator | None],
                   seed_keys: list[int | None] | None,
                   output_token_ids: list[list[int]],
                   prompt_token_ids: list[list[int]]) -> _Batch:
        """Slots for a new composition, and the metadata that stays."""
        vocab_size = self.vocab_size
        row_of = dict(zip(seq_ids, range(len(seq_ids))))
        for seq_id in self._slot_of.keys() - row_of.keys():
            self._release(seq_id)
        for seq_id in row_of.keys() - self._slot_of.keys():
            row = row_of[seq_id]
            self._admit(seq_id, params[row], generators[row],
                        None if seed_keys is None else seed_keys[row])
        slots = np.fromiter(map(self._slot_of.__getitem__, seq_ids),
                            dtype=np.int64,
                            count=len(seq_ids))
        floats, ints = self._floats[slots], self._ints[slots]
        flags = ints[:, _FLAGS]
        used = int(np.bitwise_or.reduce(flags)) if len(flags) else 0

        def rows_with(flag: int) -> list[int]:
            if not used & flag:
                return []
            return np.flatnonzero(flags & flag).tolist()

        def request(row: int) -> _Request:
            found = self._requests[slots[row]]
            assert found is not None
            return found

        is_greedy = ints[:, _GREEDY] != 0
        top_k, top_p = ints[:, _TOP_K], floats[:, _TOP_P]
        use_top_k = bool((top_k < vocab_size).any())
        use_top_p = bool((top_p < 1.0).any())
        use_min_p = bool((floats[:, _MIN_P] > 0.0).any())
        use_top_n_sigma = bool((floats[:, _TOP_N_SIGMA] != 0.0).any())
        max_top_k = int(top_k[top_k < vocab_size].max()) if use_top_k else 0
        num_logprobs = ints[:, _NUM_LOGPROBS]
        penalised_rows = rows_with(_PENALISED)
        penalised_slots = slots[penalised_rows]

        seeded = {
            row: generator
            for row in rows_with(_SEEDED)
            if (generator := request(row).generator) is not None
        }
        host = HostBuffers(self.device)
        host.add("temperature", floats[:, _TEMPERATURE], np.float32)
        if seeded:
            host.add("seeded_rows", list(seeded), np.int64)
            host.add("seeded_index", seeded_index(seeded, len(seq_ids)),
                     np.int64)
        seeded_keys = np.fromiter((request(row).key for row in seeded),
                                  dtype=np.int64,
                                  count=len(seeded))
        host.add("is_greedy", is_greedy, np.int64)
        if use_top_p:
            host.add("top_p", top_p, np.float32)
        if use_top_k:
            host.add("top_k", top_k, np.int64)
        if use_min_p:
            host.add("min_p", floats[:, _MIN_P], np.float32)
        if use_top_n_sigma:
            host.add("top_n_sigma", floats[:, _TOP_N_SIGMA], np.float32)
        if penalised_rows:
            host.add("presence", floats[:, _PRESENCE], np.float32)
            host.add("frequency", floats[:, _FREQUENCY], np.float32)
            host.add("repetition", floats[:, _REPETITION], np.float32)
            host.add("penalised_rows", penalised_rows, np.int64)
            host.add("penalised_slots", penalised_slots, np.int64)
            host.add("slot_keys", penalised_slots * vocab_size, np.int64)
            row_slots = np.full(len(seq_ids), -1, dtype=np.int64)
            row_slots[penalised_rows] = penalised_slots
            host.add("row_slots", row_slots, np.int64)
        bias_rows = rows_with(_BIAS)
        if bias_rows:
            biases = [request(row).bias for row in bias_rows]
            rows, cols = pairs(bias_rows, [b[0] for b in biases if b])
            add_logit_bias(host, rows, cols,
                           np.concatenate([b[1] for b in biases if b]),
                           len(seq_ids), vocab_size)
        allowed_rows = rows_with(_ALLOWED)
        if allowed_rows:
            allowed = [request(row).allowed for row in allowed_rows]
            rows, cols = pairs(allowed_rows,
                               [a for a in allowed if a is not None])
            host.add("allowed_row_ids", allowed_rows, np.int64)
            host.add("allowed_rows", rows, np.int64)
            host.add("allowed_cols", cols, np.int64)
        get = host.to_device()

        processors = [(row, request(row).processors)
                      for row in rows_with(_PROCESSORS)]
        min_tokens_rows = [
            row for row in np.flatnonzero(ints[:, _MIN_TOKENS]).tolist()
            if len(request(row).stop_ids)
        ]
        bad_words_rows = rows_with(_BAD_WORDS)
        metadata = SamplingMetadata(
            temperature=get("temperature"),
            is_greedy=get("is_greedy") != 0,
            all_greedy=bool(is_greedy.all()),
            all_random=not is_greedy.any(),
            top_p=get("top_p") if use_top_p else None,
            top_k=get("top_k") if use_top_k else None,
            top_k_top_p_width=(vocab_size if
                               ((top_p < 1.0) &
                                (top_k == vocab_size)).any() else max_top_k),
            max_top_k=max_top_k,
            truncated_everywhere=bool(
                not is_greedy.all()
                and (is_greedy | (top_k < vocab_size) | (top_p < 1.0) |
                     (floats[:, _MIN_P] > 0.0) |
                     (floats[:, _TOP_N_SIGMA] != 0.0)).all()),
            top_k_top_p_everywhere=bool(not is_greedy.all()
                                        and (is_greedy | (top_k < vocab_size) |
                                             (top_p < 1.0)).all()),
            top_k_everywhere=bool(not is_greedy.all()
                                  and (is_greedy | (top_k < vocab_size)).all()),
            min_p=get("min_p") if use_min_p else None,
            top_n_sigma=get("top_n_sigma") if use_top_n_sigma else None,
            generators=seeded,
            seeded_rows=get("seeded_rows") if seeded else None,
            seeded_index=get("seeded_index") if seeded else None,
            seeded_keys=None,  # each step's, from prepare
            max_num_logprobs=(int(num_logprobs.max()) if
                              (num_logprobs >= 0).any() else None),
            min_tokens_mask=None,
            penalties=None,
            logit_bias=logit_bias_of(get) if bias_rows else None,
            allowed_token_ids=((get("allowed_row_ids"), (get("allowed_rows"),
                                                         get("allowed_cols")))
                               if allowed_rows else None),
            bad_words_mask=None,
            has_masked_tokens=bool(allowed_rows or processors),
            logits_processors=processors,
            output_token_ids=output_token_ids,
            prompt_token_ids=prompt_token_ids,
        )
        return _Batch(
            seq_ids=seq_ids,
            metadata=metadata,
            min_tokens_rows=min_tokens_rows,
            bad_words_rows=bad_words_rows,
            penalised_rows=penalised_rows,
            penalised_slots=penalised_slots,
            penalised_rows_dev=(get("penalised_rows")
                                if penalised_rows else None),
            penalised_slots_dev=(get("penalised_slots")
                                 if penalised_rows else None),
            slot_keys_dev=get("slot_keys") if penalised_rows else None,
            row_slots_dev=get("row_slots") if penalised_rows else None,
            penalty_params=((get("presence"), get("frequency"),
                             get("repetition")) if penalised_rows else None),
            seeded_rows=list(seeded),
            seeded_keys=seeded_keys,
            static=not (min_tokens_rows or bad_words_rows or penalised_rows
                        or seeded))

    def _min_tokens_pairs(
            self, batch: _Batch,
            output_token_ids: list[list[int]]) -> tuple[list[int], list[int]]:
        """The stop ids of the rows still below their min_tokens."""
        rows = [
            row for row in batch.min_tokens_rows if len(output_token_ids[row]) <
            self._ints[self._slot_of[batch.seq_ids[row]], _MIN_TOKENS]
        ]
        if not rows:
            return [], []
        mask_rows, mask_cols = pairs(
            rows, [self._request_of(batch, row).stop_ids for row in rows])
        return mask_rows.tolist(), mask_cols.tolist()

    # ------------------------------------------------------------ penalties
    def _update_counts(
            self, batch: _Batch, output_token_ids: list[list[int]],
            prompt_token_ids: list[list[int]], host: HostBuffers,
            sampled: tuple[list[int], torch.Tensor] | None) -> _CountsUpdate:
        """Host side of bringing the penalised rows' device counts up to
        date: add the one token each output gained since the last step
        (``sampled``'s ids when the batch is the same), rebuild the rows
        that changed otherwise (and new ones)."""
        rows = batch.penalised_rows
        if not rows:
            return _CountsUpdate()
        slots = batch.penalised_slots
        outputs = (output_token_ids if len(rows) == len(output_token_ids) else
                   list(map(output_token_ids.__getitem__, rows)))
        # Plain lists first: each pass over the rows costs on every step.
        lengths_list = list(map(len, outputs))
        known = self._output_len[slots]
        if (batch.counted is not None
                and all(map(operator.is_, outputs, batch.counted))):
            if batch.last_unknown and lengths_list == known.tolist():
                # The sampler counted each new token (``StepRecord``).
                return _CountsUpdate()
            if (sampled is not None and sampled[0] is batch.seq_ids
                    and lengths_list == (known + 1).tolist()):
                self._output_len[slots] += 1
                self._last_token[slots] = _UNKNOWN
                batch.last_unknown = True
                return _CountsUpdate(sampled=sampled[1])
        update = self._recount(batch, outputs, lengths_list, known,
                               prompt_token_ids, host, sampled)
        # Each row's list is now its slot's (the same, or rebuilt).
        batch.counted = list(outputs)
        batch.last_unknown = bool((self._last_token[slots] == _UNKNOWN).all())
        return update

    def _recount(
            self, batch: _Batch, outputs: list[list[int]],
            lengths_list: list[int], known: np.ndarray,
            prompt_token_ids: list[list[int]], host: HostBuffers,
            sampled: tuple[list[int], torch.Tensor] | None) -> _CountsUpdate:
        """``_update_counts`` row by row: append the one new token of the
        outputs that grew by one (``known``: the lengths counted so far),
        rebuild those that changed otherwise."""
        rows, slots = batch.penalised_rows, batch.penalised_slots
        lengths = np.array(lengths_list, dtype=np.int64)
        grown = lengths - known
        same = np.fromiter(map(operator.is_, outputs, self._outputs[slots]),
                           dtype=bool,
                           count=len(rows))
        # Was the last token converted changed in place?
        check = np.flatnonzero(same & (known > 0) & (grown >= 0)
                               & (self._last_token[slots] != _UNKNOWN))
        if len(check):
            last_known = np.fromiter(map(operator.getitem,
                                         _pick(outputs, check),
                                         (known[check] - 1).tolist()),
                                     dtype=np.int64,
                                     count=len(check))
            same[check] &= last_known == self._last_token[slots[check]]
        append = same & (grown == 1)
        rebuild = ~append & ~(same & (grown == 0))
        update = _CountsUpdate(bool(rebuild.any()), bool(append.any()))
        vocab_size = self.vocab_size
        # Rows whose new last token is a placeholder: from ``sampled``.
        pending: list[int] = []
        if update.rebuilt:
            self._ensure_counts()
            rebuilt = np.flatnonzero(rebuild).tolist()
            rebuilt_slots = slots[rebuilt]
            tokens = []
            for i in rebuilt:
                output = outputs[i]
                if output and output[-1] == PLACEHOLDER_TOKEN_ID:
                    pending.append(i)
                    output = output[:-1]
                tokens.append(output)
            count_slots, count_tokens = pairs(rebuilt_slots.tolist(), tokens)
            prompts = [
                prompt_token_ids[rows[i]]
                if self._request_of(batch, rows[i]).uses_prompt else []
                for i in rebuilt
            ]
            prompt_slots, prompt_tokens = pairs(rebuilt_slots.tolist(), prompts)
            host.add("rebuild_slots", rebuilt_slots, np.int64)
            host.add("rebuild_keys", count_slots * vocab_size + count_tokens,
                     np.int64)
            host.add("prompt_keys", prompt_slots * vocab_size + prompt_tokens,
                     np.int64)
            for i in rebuilt:
                self._outputs[slots[i]] = outputs[i]
                self._output_len[slots[i]] = len(outputs[i])
                self._last_token[
                    slots[i]] = outputs[i][-1] if outputs[i] else -1
        if update.appended:
            appended = np.flatnonzero(append)
            self._output_len[slots[appended]] += 1
            last = np.fromiter(map(operator.itemgetter(-1),
                                   _pick(outputs, appended)),
                               dtype=np.int64,
                               count=len(appended))
            placeholder = last == PLACEHOLDER_TOKEN_ID
            pending += appended[placeholder].tolist()
            # The other new tokens are known here: uploaded.
            appended, last = appended[~placeholder], last[~placeholder]
            update.appended = bool(len(appended))
            if update.appended:
                host.add("append_keys", slots[appended] * vocab_size + last,
                         np.int64)
                self._last_token[slots[appended]] = last
        if pending:
            update.pending = self._add_pending(batch, slots, pending, sampled,
                                               host)
        return update

    def _add_pending(self, batch: _Batch, slots: np.ndarray, pending: list[int],
                     sampled: tuple[list[int], torch.Tensor] | None,
                     host: HostBuffers) -> torch.Tensor:
        """Upload where the placeholders' tokens are in ``sampled``: the
        slot keys of the penalised rows ``pending`` (indices into ``slots``)
        and their rows in the last step. -> its ids."""
        if sampled is None:
            raise RuntimeError("an output ends with a placeholder, but no "
                               "step's sampled ids were given (sampled())")
        row_of = {seq_id: row for row, seq_id in enumerate(sampled[0])}
        rows = batch.penalised_rows
        host.add("pending_slot_keys", slots[pending] * self.vocab_size,
                 np.int64)
        host.add("pending_rows",
                 [row_of[batch.seq_ids[rows[i]]] for i in pending], np.int64)
        self._last_token[slots[pending]] = _UNKNOWN
        return sampled[1]

    def _ensure_counts(self) -> None:
        """Device rows for every slot (the slots only grow)."""
        num_slots = len(self._requests)
        if self._counts is not None and self._counts.shape[0] == num_slots:
            return
        counts = torch.zeros((num_slots, self.vocab_size),
                             dtype=torch.int32,
                             device=self.device)
        seen = torch.zeros((num_slots, seen_words(self.vocab_size)),
                           dtype=torch.int32,
                           device=self.device)
        if self._counts is not None and self._seen is not None:
            counts[:self._counts.shape[0]] = self._counts
            seen[:self._seen.shape[0]] = self._seen
        self._counts, self._seen = counts, seen

    def _penalty_counts(self, batch: _Batch, update: _CountsUpdate,
                        get: Callable[[str], torch.Tensor]) -> PenaltyCounts:
        """Device side: apply the uploaded updates to the counts."""
        counts, seen = self._counts, self._seen
        assert counts is not None and seen is not None
        if batch.penalties is not None and batch.penalties.counts is counts:
            penalties = batch.penalties
        else:
            penalties = batch.penalties = self._new_penalty_counts(batch)
        if update.rebuilt:
            rebuilt = get("rebuild_slots")
            counts.index_fill_(0, rebuilt, 0)
            seen.index_fill_(0, rebuilt, 0)
            mark_tokens(counts, seen, get("rebuild_keys"), count=True)
            mark_tokens(counts, seen, get("prompt_keys"), count=False)
        if update.appended:
            mark_tokens(counts, seen, get("append_keys"), count=True)
        if update.pending is not None:
            mark_tokens(counts,
                        seen,
                        get("pending_slot_keys"),
                        count=True,
                        add=(update.pending, get("pending_rows")))
        if update.sampled is not None:
            assert batch.slot_keys_dev is not None
            assert batch.penalised_rows_dev is not None
            mark_tokens(counts,
                        seen,
                        batch.slot_keys_dev,
                        count=True,
                        add=(update.sampled, batch.penalised_rows_dev))
        return penalties

    def _new_penalty_counts(self, batch: _Batch) -> PenaltyCounts:
        assert self._counts is not None and self._seen is not None
        assert batch.penalised_rows_dev is not None
        assert batch.penalised_slots_dev is not None
        assert batch.row_slots_dev is not None
        assert batch.penalty_params is not None
        presence, frequency, repetition = batch.penalty_params
        return PenaltyCounts(presence=presence,
                             frequency=frequency,
                             repetition=repetition,
                             rows=batch.penalised_rows_dev,
                             slots=batch.penalised_slots_dev,
                             row_slots=batch.row_slots_dev,
                             counts=self._counts,
                             seen=self._seen)


def mark_tokens(counts: torch.Tensor,
                seen: torch.Tensor,
                keys: torch.Tensor,
                count: bool,
                add: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Set the seen bit of each key (slot * V + token id [K] int64) in
    ``seen`` and, with ``count``, add one to ``counts`` there (keys may
    repeat). With ``add`` = (tokens [N], rows [K]), key i is keys[i] +
    tokens[rows[i]]. One Triton launch on CUDA; torch elsewhere."""
    kernels = get_sampling_kernels() if counts.is_cuda else None
    if kernels is not None:
        kernels.mark_tokens(counts, seen, keys, count, add)
        return
    if add is not None:
        tokens, rows = add
        keys = keys + tokens.index_select(0, rows)
    if count:
        counts.view(-1).index_add_(0, keys,
                                   torch.ones_like(keys, dtype=torch.int32))
    keys = keys.unique()
    vocab_size = counts.shape[1]
    slots = keys // vocab_size
    tokens = keys - slots * vocab_size
    words = slots * seen.shape[1] + tokens // 32
    bits = torch.ones_like(tokens) << (tokens % 32)  # int64
    flat = seen.view(-1)
    new = (flat[words].long() & bits) == 0
    # Distinct bits, none set yet: adding them is or-ing them. Bit 31 is
    # int32's sign bit.
    bits = bits[new]
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    flat.index_add_(0, words[new], bits.to(torch.int32))
