"""Turns scheduled sequences into one flattened batch, runs the model and samples.

Per step: the host lays the batch out in persistent pinned buffers
(``InputBuffers``) and sends each field with one non-blocking copy; decode-only
batches on CUDA replay a captured CUDA graph (``CUDAGraphRunner``) instead of
launching the model's kernels one by one. The only device-to-host copy is the
sampled token ids (and their logprobs when asked for), started without waiting:
``execute_model`` returns a ``PendingOutput`` whose ``get()`` waits for it.
"""
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.attention import Attention
from vllm.config import VllmConfig
from vllm.core.block_manager import cdiv
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.sampler import (LogprobsTensors, Sampler,
                                                SamplerOutput,
                                                compute_topk_logprobs)
from vllm.model_executor.model_loader import get_model
from vllm.model_executor.sampling_metadata import SamplingMetadata
from vllm.model_executor.sampling_state import SamplingState
from vllm.sampling_params import SamplingParams
from vllm.sequence import PLACEHOLDER_TOKEN_ID, ScheduledSequence
from vllm.worker.cuda_graph import CUDAGraphRunner, capture_sizes
from vllm.worker.input_buffers import InputBuffers

logger = init_logger(__name__)

# Prompt logprobs: rows of logits made at once (x vocab_size floats).
_PROMPT_LOGITS_ELEMENTS = 1 << 26

# seq_id -> (index of the prompt token of row 0, prompt logprobs on the CPU)
PromptLogprobsBySeq = dict[int, tuple[int, LogprobsTensors]]


@dataclass
class ModelRunnerOutput:
    """Sampled tokens, one row per sequence that sampled, on the host."""
    seq_ids: list[int]
    sampled_token_ids: list[int]
    logprobs: LogprobsTensors | None  # CPU tensors, rows as seq_ids
    # Of the sequences that asked (ScheduledSequence.prompt_logprobs_from)
    # and computed such positions this step.
    prompt_logprobs: PromptLogprobsBySeq = field(default_factory=dict)


class PendingOutput:
    """A launched step: its kernels are queued on the device, and its sampled
    ids (with their logprobs) are on their way to pinned host memory."""

    def __init__(self, seq_ids: list[int], output: SamplerOutput | None,
                 prompt_logprobs: PromptLogprobsBySeq) -> None:
        self.seq_ids = seq_ids
        self.prompt_logprobs = prompt_logprobs
        self._output = output
        # A recheck may still change sampled ids on the host's request
        # (SamplerOutput.to_host): no later step may read them before that.
        self.final_on_device = output is None or output.recheck is None
        self._copy = None if output is None else output.start_copy()

    def get(self) -> ModelRunnerOutput:
        """Wait for the step's sampled tokens; -> them on the host."""
        if self._output is None or self._copy is None:
            return ModelRunnerOutput([], [], None, self.prompt_logprobs)
        sampled, logprobs = self._output.to_host(self._copy)
        return ModelRunnerOutput(self.seq_ids, sampled, logprobs,
                                 self.prompt_logprobs)


class ModelRunner:

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.block_size = vllm_config.cache_config.block_size
        self.device = vllm_config.device_config.device
        sched = vllm_config.scheduler_config
        self.use_cuda_graphs = (self.device.type == "cuda"
                                and not vllm_config.enforce_eager)
        self.sampler = Sampler(cuda_graphs=self.use_cuda_graphs)
        # Sampling parameters and penalty counts, kept between steps.
        self.sampling_state = SamplingState(self.device)
        # forward(input_ids, positions) and compute_logits(hidden_states)
        self.model: Any
        self.graph_sizes = (capture_sizes(sched.max_num_seqs)
                            if self.use_cuda_graphs else [])
        self.buffers = InputBuffers(
            max_tokens=max([sched.max_num_batched_tokens, *self.graph_sizes]),
            max_seqs=max([sched.max_num_seqs, *self.graph_sizes]),
            max_blocks=cdiv(self.model_config.max_model_len, self.block_size),
            block_size=self.block_size,
            device=self.device)
        self.graph_runner: CUDAGraphRunner | None = None
        # The last step's sampled ids on the device, by sequence id: the
        # inputs of a step scheduled before they reached the host.
        self._last_sampled: tuple[dict[int, int], torch.Tensor] | None = None

    def load_model(self) -> None:
        self.model = get_model(self.model_config,
                               self.vllm_config.device_config)
        logger.info("Attention backend: %s",
                    self.attention_layers()[0].backend.name)

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def bind_kv_caches(self, kv_caches: list[torch.Tensor],
                       pad_block: int) -> None:
        """Give each layer its cache; ``pad_block`` is a block no sequence
        owns, where padding rows of CUDA graphs write."""
        for layer, cache in zip(self.attention_layers(), kv_caches,
                                strict=True):
            layer.kv_cache = cache
        self.buffers.pad_block = pad_block

    def capture_cuda_graphs(self) -> None:
        """Record the decode graphs (after the KV cache is bound)."""
        if not self.use_cuda_graphs:
            return
        limit = min(self.vllm_config.max_seq_len_to_capture,
                    self.model_config.max_model_len)
        self.graph_runner = CUDAGraphRunner(self.model, self.buffers,
                                            self.graph_sizes, limit)
        with torch.inference_mode():
            self.graph_runner.capture()

    def _forward(self, seqs: list[ScheduledSequence],
                 sample_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the batch and the rows that give logits."""
        token_ids = [s.token_ids for s in seqs]
        num_computed = [s.num_computed_tokens for s in seqs]
        tables = [s.block_table for s in seqs]
        size = None
        if self.graph_runner is not None and all(
                len(t) == 1 for t in token_ids):
            size = self.graph_runner.padded_size(
                len(seqs), max(c + 1 for c in num_computed))
        if size is None:
            input_ids, positions, logits_indices, metadata = (
                self.buffers.prepare(token_ids, num_computed, tables,
                                     sample_rows))
            self._fill_placeholders(seqs)
            with set_forward_context(metadata):
                return self.model(input_ids, positions), logits_indices
        assert self.graph_runner is not None
        _, _, logits_indices, _ = self.buffers.prepare(
            token_ids,
            num_computed,
            tables,
            sample_rows,
            pad_to=size,
            max_seq_len=self.graph_runner.max_seq_len)
        self._fill_placeholders(seqs)
        return self.graph_runner.replay(size), logits_indices

    def _fill_placeholders(self, seqs: list[ScheduledSequence]) -> None:
        """Rows whose last token is still being sampled by the previous step
        (``PLACEHOLDER_TOKEN_ID``) take it from that step's sampled ids on
        the device."""
        rows = [
            i for i, s in enumerate(seqs)
            if s.token_ids and s.token_ids[-1] == PLACEHOLDER_TOKEN_ID
        ]
        if not rows:
            return
        assert self._last_sampled is not None, "no step sampled these tokens"
        row_of, sampled = self._last_sampled
        self.buffers.fill_placeholders(rows,
                                       [row_of[seqs[i].seq_id] for i in rows],
                                       sampled)

    @torch.inference_mode()
    def execute_model(self,
                      scheduled: list[ScheduledSequence]) -> PendingOutput:
        """Launch one step; ``get()`` on the result waits for its tokens.

        Nothing here waits for the device (prompt logprobs aside), so the
        caller can prepare the next step while this one runs.
        """
        if not scheduled:  # a step that only swapped blocks
            self._last_sampled = None
            return PendingOutput([], None, {})
        # NOTE: the attention backends need decodes (one query token) first.
        seqs = sorted(scheduled, key=lambda s: len(s.token_ids) > 1)
        # The last token of each sequence that samples gives the logits.
        sample_rows = [i for i, s in enumerate(seqs) if s.do_sample]
        hidden_states, logits_indices = self._forward(seqs, sample_rows)
        prompt_logprobs = self._compute_prompt_logprobs(seqs, hidden_states)
        if not sample_rows:
            self._last_sampled = None
            return PendingOutput([], None, prompt_logprobs)
        logits = self.model.compute_logits(hidden_states[logits_indices])
        sampling_seqs = [seqs[i] for i in sample_rows]
        metadata = self.sampling_state.prepare(
            [s.seq_id for s in sampling_seqs],
            [s.sampling_params
             for s in sampling_seqs], [s.generator for s in sampling_seqs],
            [s.output_token_ids for s in sampling_seqs],
            [s.prompt_token_ids for s in sampling_seqs],
            vocab_size=logits.shape[-1],
            seed_keys=[s.seed_key for s in sampling_seqs])
        output = self.sampler(logits, metadata)
        self.sampling_state.sampled(output.sampled_token_ids)
        seq_ids = [s.seq_id for s in sampling_seqs]
        self._last_sampled = ({
            seq_id: row
            for row, seq_id in enumerate(seq_ids)
        }, output.sampled_token_ids)
        return PendingOutput(seq_ids, output, prompt_logprobs)

    def _compute_prompt_logprobs(
            self, seqs: list[ScheduledSequence],
            hidden_states: torch.Tensor) -> PromptLogprobsBySeq:
        """Prompt logprobs of the sequences that ask for them: the hidden
        state at prompt position p gives the entry of prompt token p + 1.

        ``seqs`` are in batch order (``hidden_states`` [T, H] rows). Logits
        are made a slice of rows at a time, so a long prompt chunk never
        holds [T, V] logits at once.
        """
        result: PromptLogprobsBySeq = {}
        if all(s.prompt_logprobs_from is None for s in seqs):
            return result  # the common case, kept off the per-step path
        start = 0  # the sequence's first row in hidden_states
        for s in seqs:
            first_token = s.prompt_logprobs_from
            computed = s.num_computed_tokens
            if first_token is not None:
                lo = max(computed, first_token - 1)
                hi = min(computed + len(s.token_ids),
                         len(s.prompt_token_ids) - 1)
                if lo < hi:
                    rows = hidden_states[start + lo - computed:start + hi -
                                         computed]
                    targets = torch.tensor(s.prompt_token_ids[lo + 1:hi + 1],
                                           device=self.device)
                    result[s.seq_id] = (lo + 1,
                                        self._logprobs_in_slices(
                                            rows, targets,
                                            s.sampling_params.prompt_logprobs))
            start += len(s.token_ids)
        return result

    def _logprobs_in_slices(self, hidden: torch.Tensor, targets: torch.Tensor,
                            k: int | None) -> LogprobsTensors:
        assert k is not None
        vocab = self.model_config.vocab_size
        step = max(1, _PROMPT_LOGITS_ELEMENTS // vocab)
        parts = [
            compute_topk_logprobs(self.model.compute_logits(hidden[i:i + step]),
                                  targets[i:i + step], k)
            for i in range(0, len(targets), step)
        ]
        return LogprobsTensors(
            torch.cat([p.logprob_token_ids for p in parts]).cpu(),
            torch.cat([p.logprobs for p in parts]).cpu(),
            torch.cat([p.selected_token_ranks for p in parts]).cpu())

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """A forward of ``num_tokens`` tokens and sampling of ``num_seqs`` rows,
        so that peak activation memory can be measured before the KV cache
        exists.

        The tokens form the fewest, longest sequences (max_model_len each), and
        every layer writes into one shared scratch cache just large enough for
        them: the real kernels run (and compile) on a batch's worst case.
        """
        max_len = self.model_config.max_model_len
        lens = [max_len] * (num_tokens // max_len)
        if num_tokens % max_len:
            lens.append(num_tokens % max_len)
        tables, next_block = [], 0
        for n in lens:
            tables.append(
                list(range(next_block, next_block + cdiv(n, self.block_size))))
            next_block += cdiv(n, self.block_size)
        layers = self.attention_layers()
        backend = layers[0].backend
        scratch = torch.zeros(backend.get_kv_cache_shape(
            next_block + 1, self.block_size, self.model_config.num_kv_heads,
            self.model_config.head_size),
                              dtype=self.model_config.dtype,
                              device=self.device)
        self.bind_kv_caches([scratch] * len(layers), pad_block=next_block)
        input_ids, positions, _, attn_metadata = self.buffers.prepare(
            [[0] * n for n in lens], [0] * len(lens), tables, [])
        with set_forward_context(attn_metadata):
            hidden_states = self.model(input_ids, positions)
        for layer in layers:
            layer.kv_cache = None
        rows = torch.arange(num_seqs, device=self.device) % num_tokens
        logits = self.model.compute_logits(hidden_states[rows])
        # Rows with top_p but no top_k beside untruncated ones: the
        # sampler's largest temporaries (a draw over the whole vocabulary
        # that keeps its logits for a possible recheck).
        params = [
            SamplingParams(temperature=1.0, top_p=0.9 if i % 2 else 1.0)
            for i in range(num_seqs)
        ]
        metadata = SamplingMetadata.prepare(params, [None] * num_seqs,
                                            [[] for _ in range(num_seqs)],
                                            [[] for _ in range(num_seqs)],
                                            vocab_size=logits.shape[-1],
                                            device=self.device)
        self.sampler(logits, metadata)
