"""Persistent input buffers of the model runner: a pinned host array and a device
tensor for each per-step input.

Every step fills the host arrays with numpy (no per-step allocation, no pinned
allocation) and sends each field with one non-blocking copy. CUDA graphs read the
device tensors directly, so a graph replay needs no other copy.

A step may be prepared while the previous one still runs on the device
(``LLMEngine.step`` schedules ahead): its copies may not have read the host
arrays yet, so ``prepare`` first waits for them (an event recorded after the
last copy), and the input tokens that step samples are filled in on the
device (``fill_placeholders``).
"""
import itertools
from collections.abc import Sequence

import numpy as np
import torch

from vllm.attention.backends.abstract import AttentionMetadata


class _Field:
    """One input: ``host`` (pinned on CUDA) and ``device``, same shape."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        pin = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.np = self.host.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device)

    def send(self, rows: int) -> torch.Tensor:
        """Copy the first ``rows`` rows to the device; returns that view."""
        self.device[:rows].copy_(self.host[:rows], non_blocking=True)
        return self.device[:rows]


class InputBuffers:
    """Inputs for at most ``max_tokens`` tokens of ``max_seqs`` sequences.

    ``prepare`` lays a batch out (decodes first, as the attention backends
    need) and returns the device views plus the :class:`AttentionMetadata`.
    Rows past the real batch (CUDA-graph padding, ``pad_to``) point at
    ``pad_slot``, a cache slot no sequence owns, with a context of one token.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int,
                 block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.input_ids = _Field((max_tokens, ), torch.int64, device)
        self.positions = _Field((max_tokens, ), torch.int64, device)
        self.slot_mapping = _Field((max_tokens, ), torch.int64, device)
        self.query_start_loc = _Field((max_seqs + 1, ), torch.int32, device)
        self.seq_lens = _Field((max_seqs, ), torch.int32, device)
        self.block_tables = _Field((max_seqs, max_blocks), torch.int32, device)
        self.logits_indices = _Field((max_seqs, ), torch.int64, device)
        # fill_placeholders: positions in input_ids, rows of the sampled ids
        self.placeholder_positions = _Field((max_seqs, ), torch.int64, device)
        self.placeholder_sources = _Field((max_seqs, ), torch.int64, device)
        self._columns = np.arange(max_blocks)
        self.pad_block = 0  # set by the model runner once the cache exists
        # Recorded after the last copy from the host arrays (CUDA only).
        self._sent = torch.cuda.Event() if device.type == "cuda" else None
        self._pending_copies = False

    def _host_writable(self) -> None:
        """Wait until the copies of the last step have read the host arrays."""
        if self._pending_copies:
            assert self._sent is not None
            self._sent.synchronize()
            self._pending_copies = False

    def _copies_sent(self) -> None:
        if self._sent is not None:
            self._sent.record()
            self._pending_copies = True

    def prepare(
        self,
        token_ids: Sequence[Sequence[int]],
        num_computed: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        sample_rows: Sequence[int],
        pad_to: int | None = None,
        max_seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Fill and send one batch.

        Returns (input_ids [T], positions [T], logits_indices [S], metadata).
        ``pad_to`` pads a decode-only batch to that many sequences (CUDA
        graphs); ``max_seq_len`` overrides the metadata's bound (a graph is
        captured once for every context length up to it).
        """
        self._host_writable()
        n = len(token_ids)
        q_lens = np.fromiter(map(len, token_ids), np.int64, n)
        computed = np.asarray(num_computed, dtype=np.int64)
        num_tokens = int(q_lens.sum())
        rows = n if pad_to is None else pad_to
        tokens = num_tokens + rows - n  # padding rows are 1-token decodes

        qsl = self.query_start_loc.np
        qsl[0] = 0
        np.cumsum(q_lens, out=qsl[1:n + 1])
        seq_lens = computed + q_lens
        self.seq_lens.np[:n] = seq_lens
        self.input_ids.np[:num_tokens] = np.fromiter(
            itertools.chain.from_iterable(token_ids), np.int64, num_tokens)

        # Block tables: one flat pass over all of them, written through a
        # row-major mask (entry j of row i for j < len(table i): flat order).
        table_lens = np.fromiter(map(len, block_tables), np.int64, n)
        flat = np.fromiter(itertools.chain.from_iterable(block_tables),
                           np.int32, int(table_lens.sum()))
        tables = self.block_tables.np
        tables[:n][self._columns[None, :] < table_lens[:, None]] = flat

        # Token t of sequence i sits at position computed[i] + (t - start_i).
        seq_of_token = np.repeat(np.arange(n), q_lens)
        positions = (computed[seq_of_token] + np.arange(num_tokens) -
                     qsl[seq_of_token])
        self.positions.np[:num_tokens] = positions
        bs = self.block_size
        self.slot_mapping.np[:num_tokens] = (
            tables[seq_of_token, positions // bs].astype(np.int64) * bs +
            positions % bs)

        if rows > n:  # padding sequences: one token each, in the pad block
            pad = slice(num_tokens, tokens)
            self.input_ids.np[pad] = 0
            self.positions.np[pad] = 0
            self.slot_mapping.np[pad] = self.pad_block * bs
            self.seq_lens.np[n:rows] = 1
            tables[n:rows, 0] = self.pad_block
            qsl[n + 1:rows + 1] = num_tokens + np.arange(1, rows - n + 1)

        num_sample = len(sample_rows)
        self.logits_indices.np[:num_sample] = qsl[1:][np.asarray(
            sample_rows, dtype=np.int64)] - 1

        num_decodes = int(np.count_nonzero(q_lens == 1))
        metadata = AttentionMetadata(
            num_actual_tokens=tokens,
            num_decodes=num_decodes + rows - n,
            max_query_len=int(q_lens.max(initial=1)),
            max_seq_len=max_seq_len or int(seq_lens.max(initial=1)),
            query_start_loc=self.query_start_loc.send(rows + 1),
            seq_lens=self.seq_lens.send(rows),
            block_tables=self.block_tables.send(rows),
            slot_mapping=self.slot_mapping.send(tokens))
        sent = (self.input_ids.send(tokens), self.positions.send(tokens),
                self.logits_indices.send(num_sample), metadata)
        self._copies_sent()
        return sent

    def fill_placeholders(self, rows: Sequence[int], sources: Sequence[int],
                          sampled: torch.Tensor) -> None:
        """The last input token of each batch row in ``rows`` becomes
        ``sampled[source]`` (the token the previous step sampled for that
        sequence, still on the device). Call after ``prepare``, which waited
        for the last step's copies: these host arrays are free. (Waiting
        here would wait for the previous step to finish.)"""
        n = len(rows)
        positions = self.placeholder_positions.np
        positions[:n] = self.query_start_loc.np[np.asarray(rows) + 1] - 1
        self.placeholder_sources.np[:n] = sources
        index = self.placeholder_positions.send(n)
        tokens = sampled.index_select(0, self.placeholder_sources.send(n))
        self._copies_sent()
        self.input_ids.device.index_copy_(0, index, tokens)

    def graph_metadata(self, num_seqs: int,
                       max_seq_len: int) -> AttentionMetadata:
        """The metadata a CUDA graph of ``num_seqs`` decodes is captured with:
        views of the device buffers that every replay refills."""
        return AttentionMetadata(
            num_actual_tokens=num_seqs,
            num_decodes=num_seqs,
            max_query_len=1,
            max_seq_len=max_seq_len,
            query_start_loc=self.query_start_loc.device[:num_seqs + 1],
            seq_lens=self.seq_lens.device[:num_seqs],
            block_tables=self.block_tables.device[:num_seqs],
            slot_mapping=self.slot_mapping.device[:num_seqs])
