"""Turns scheduled sequences into one flattened batch, runs the model and samples.

Per step: the host builds small per-sequence arrays (one copy each to the device);
positions and cache slots are derived on the device; the only device-to-host copy is
the sampled token ids (and their logprobs when asked for).
"""
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.attention import Attention, AttentionMetadata
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.sampler import (LogprobsTensors, Sampler,
                                                compute_topk_logprobs)
from vllm.model_executor.model_loader import get_model
from vllm.model_executor.sampling_metadata import (SamplingMetadata,
                                                   TokenHistoryCache)
from vllm.sampling_params import SamplingParams
from vllm.sequence import ScheduledSequence

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


class ModelRunner:

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.block_size = vllm_config.cache_config.block_size
        self.device = vllm_config.device_config.device
        self.pin_memory = self.device.type == "cuda"
        self.sampler = Sampler()
        # Penalised rows' token histories, kept on the device between steps.
        self.history_cache = TokenHistoryCache()
        # forward(input_ids, positions) and compute_logits(hidden_states)
        self.model: Any

    def load_model(self) -> None:
        self.model = get_model(self.model_config,
                               self.vllm_config.device_config)

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        for layer, cache in zip(self.attention_layers(), kv_caches,
                                strict=True):
            layer.kv_cache = cache

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self.pin_memory)
        return t.to(self.device, non_blocking=True)

    def _build_metadata(
        self, query_lens: list[int], num_computed: list[int],
        block_tables: list[list[int]]
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """The batch's attention metadata and the tokens' positions [T]."""
        num_seqs = len(query_lens)
        num_tokens = sum(query_lens)
        seq_lens = [c + q for c, q in zip(num_computed, query_lens)]
        max_blocks = max(1, max(len(bt) for bt in block_tables))
        padded = [bt + [0] * (max_blocks - len(bt)) for bt in block_tables]
        query_start_loc = [0] * (num_seqs + 1)
        for i, q in enumerate(query_lens):
            query_start_loc[i + 1] = query_start_loc[i] + q

        qsl = self._to_device(query_start_loc, torch.int32)
        computed = self._to_device(num_computed, torch.int64)
        tables = self._to_device(padded, torch.int32)
        q_lens = self._to_device(query_lens, torch.int64)
        # token -> its sequence, and its absolute position in that sequence
        seq_idx = torch.repeat_interleave(torch.arange(num_seqs,
                                                       device=self.device),
                                          q_lens,
                                          output_size=num_tokens)
        offsets = torch.arange(num_tokens, device=self.device) - qsl[seq_idx]
        positions = computed[seq_idx] + offsets
        slots = (tables[seq_idx, positions // self.block_size].long() *
                 self.block_size + positions % self.block_size)
        return AttentionMetadata(
            num_actual_tokens=num_tokens,
            num_decodes=sum(1 for q in query_lens if q == 1),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_start_loc=qsl,
            seq_lens=self._to_device(seq_lens, torch.int32),
            block_tables=tables,
            slot_mapping=slots), positions

    @torch.inference_mode()
    def execute_model(self,
                      scheduled: list[ScheduledSequence]) -> ModelRunnerOutput:
        if not scheduled:  # a step that only swapped blocks
            return ModelRunnerOutput([], [], None)
        # NOTE: the attention backend needs decodes (one query token) first.
        seqs = sorted(scheduled, key=lambda s: len(s.token_ids) > 1)
        input_ids = list(
            itertools.chain.from_iterable(s.token_ids for s in seqs))
        query_lens = [len(s.token_ids) for s in seqs]
        attn_metadata, positions = self._build_metadata(
            query_lens, [s.num_computed_tokens for s in seqs],
            [s.block_table for s in seqs])

        # The last token of each sequence that samples gives the logits.
        sample_rows = [i for i, s in enumerate(seqs) if s.do_sample]
        ends = attn_metadata.query_start_loc[1:]
        logits_indices = ends[self._to_device(sample_rows, torch.int64)] - 1

        with set_forward_context(attn_metadata):
            hidden_states = self.model(self._to_device(input_ids, torch.int64),
                                       positions)
        prompt_logprobs = self._compute_prompt_logprobs(seqs, hidden_states)
        if not sample_rows:
            return ModelRunnerOutput([], [], None, prompt_logprobs)
        logits = self.model.compute_logits(hidden_states[logits_indices])
        sampling_seqs = [seqs[i] for i in sample_rows]
        metadata = SamplingMetadata.prepare(
            [s.sampling_params
             for s in sampling_seqs], [s.generator for s in sampling_seqs],
            [s.output_token_ids for s in sampling_seqs],
            [s.prompt_token_ids for s in sampling_seqs],
            vocab_size=logits.shape[-1],
            device=self.device,
            history_cache=self.history_cache)
        out = self.sampler(logits, metadata)
        # The one device -> host copy of the step.
        sampled = out.sampled_token_ids.tolist()
        logprobs = None
        if out.logprobs_tensors is not None:
            lp = out.logprobs_tensors
            logprobs = LogprobsTensors(lp.logprob_token_ids.cpu(),
                                       lp.logprobs.cpu(),
                                       lp.selected_token_ranks.cpu())
        return ModelRunnerOutput([s.seq_id for s in sampling_seqs], sampled,
                                 logprobs, prompt_logprobs)

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
                    targets = self._to_device(s.prompt_token_ids[lo + 1:hi + 1],
                                              torch.int64)
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
        without a KV cache, so that peak activation memory can be measured.

        The tokens form the fewest, longest sequences (max_model_len each):
        the attention's padded score tensors are largest then.
        """
        max_len = self.model_config.max_model_len
        lens = [max_len] * (num_tokens // max_len)
        if num_tokens % max_len:
            lens.append(num_tokens % max_len)
        # Block tables of the right length keep the slot arithmetic in range;
        # nothing is written since there is no cache yet.
        tables = [[0] * -(-n // self.block_size) for n in lens]
        attn_metadata, positions = self._build_metadata(lens, [0] * len(lens),
                                                        tables)
        input_ids = torch.zeros(num_tokens,
                                dtype=torch.int64,
                                device=self.device)
        with set_forward_context(attn_metadata):
            hidden_states = self.model(input_ids, positions)
        rows = torch.arange(num_seqs, device=self.device) % num_tokens
        logits = self.model.compute_logits(hidden_states[rows])
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
                  ] * num_seqs
        metadata = SamplingMetadata.prepare(params, [None] * num_seqs,
                                            [[] for _ in range(num_seqs)],
                                            [[] for _ in range(num_seqs)],
                                            vocab_size=logits.shape[-1],
                                            device=self.device)
        self.sampler(logits, metadata)
