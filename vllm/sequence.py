"""Request state: a ``SequenceGroup`` (one request) holds ``n`` ``Sequence``s.

The engine advances this state in one place (``LLMEngine._process_outputs``); the
scheduler and block manager only read it and move sequences between queues.
"""
import enum
import time
from dataclasses import dataclass

import torch

from vllm.beam_search import BeamSearch
from vllm.outputs import (Logprob, PromptLogprobs, RequestMetrics,
                          SampleLogprobs)
from vllm.sampling_params import SamplingParams
from vllm.transformers_utils.detokenizer import IncrementalDetokenizer

# The last output token of a sequence while the step that samples it is still
# on the device (LLMEngine.step schedules the next step before it arrives); the
# model runner reads that token from the device.
PLACEHOLDER_TOKEN_ID = -1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()  # preempted, its KV cache moved to CPU memory
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One generated sequence: its tokens, its KV blocks and how far it is computed."""

    def __init__(self,
                 seq_id: int,
                 prompt_token_ids: list[int],
                 detokenizer: IncrementalDetokenizer | None = None) -> None:
        self.seq_id = seq_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        # Physical KV-cache blocks, owned by the block manager.
        self.block_table: list[int] = []
        # Tokens whose K/V are in the cache; the rest are computed next.
        self.num_computed_tokens = 0
        self.detokenizer = detokenizer
        self.output_text = ""
        self.output_logprobs: SampleLogprobs = []
        self.cumulative_logprob = 0.0
        self.stop_reason: int | str | None = None
        # A seeded request's key for this sample (``sequence_key``): its
        # noise on the GPU depends on it and the output length alone.
        self.seed_key: int | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def status(self) -> SequenceStatus:
        return self._status

    @status.setter
    def status(self, status: SequenceStatus) -> None:
        self._status = status
        # A plain attribute: the scheduler asks this of every sequence several
        # times per step, and enum hashing is slow in Python.
        self.is_finished = status.is_finished

    def uncomputed_token_ids(self, num_tokens: int) -> list[int]:
        """The next ``num_tokens`` tokens whose K/V are not yet cached."""
        start, end = self.num_computed_tokens, self.num_computed_tokens + num_tokens
        num_prompt = self.num_prompt_tokens
        if start >= num_prompt:  # decode: avoid copying the whole sequence
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.token_ids[start:end]

    def append_token(self, token_id: int,
                     logprobs: dict[int, Logprob] | None) -> None:
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id].logprob

    def fork(self, seq_id: int) -> "Sequence":
        """A beam's copy with its own id, no blocks (the block manager's fork
        gives it this one's) and no detokenizer (beams are decoded when
        returned)."""
        child = Sequence(seq_id, self.prompt_token_ids)
        child.output_token_ids = list(self.output_token_ids)
        child.output_logprobs = list(self.output_logprobs)
        child.cumulative_logprob = self.cumulative_logprob
        return child

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, everything is computed again."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")


class SequenceGroup:
    """One request: its prompt, sampling parameters and ``n`` sequences."""

    def __init__(self,
                 request_id: str,
                 seqs: list[Sequence],
                 sampling_params: SamplingParams,
                 prompt: str | None = None,
                 arrival_time: float | None = None,
                 priority: int = 0,
                 generator: torch.Generator | None = None) -> None:
        self.request_id = request_id
        self.seqs = seqs
        self.sampling_params = sampling_params
        self.prompt = prompt
        self.priority = priority
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        # Set when the request has a seed: its samples depend on it alone.
        self.generator = generator
        # Prompt tokens found in the prefix cache at first admission.
        self.num_cached_tokens: int | None = None
        # Scheduler step at which the request arrived (priority aging).
        self.arrival_step = 0
        # Sequences share what they have in common by forking: the first
        # unfinished one (the leader) alone computes the first ``fork_at``
        # tokens, then the others fork its blocks (Scheduler._fork) and each
        # computes the rest of its own tokens. Parallel samples fork one token
        # short of the prompt's end (each samples from its own last prompt
        # token); a group recomputed after preemption at the end of what its
        # sequences share (share_prefix_on_recompute). None: no fork ahead.
        self.fork_at: int | None = None
        if len(seqs) > 1 and seqs[0].num_prompt_tokens > 1:
            self.fork_at = seqs[0].num_prompt_tokens - 1
        # One entry per prompt token once computed (the first is None), when
        # the request asks for prompt logprobs.
        self.prompt_logprobs: PromptLogprobs | None = (
            [None] if sampling_params.prompt_logprobs is not None else None)
        # A beam-search request: its sequences are the live beams.
        self.beam_search: BeamSearch | None = None

    @property
    def arrival_time(self) -> float:
        return self.metrics.arrival_time

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seqs[0].prompt_token_ids

    @property
    def prompt_logprobs_complete(self) -> bool:
        return self.prompt_logprobs is None or len(self.prompt_logprobs) == len(
            self.prompt_token_ids)

    @property
    def fork_pending(self) -> bool:
        return self.fork_at is not None

    def max_cached_prefix(self) -> int:
        """How many leading tokens a waiting request may take from the prefix
        cache: all but the last, whose logits give the next token; before a
        fork, fewer than ``fork_at`` (the leader computes at least one token
        first); and none whose prompt logprob is still to be computed (a
        cached token skips its logits)."""
        seq = self.get_unfinished_seqs()[0]
        limit = seq.num_tokens - 1
        if self.fork_at is not None:
            limit = min(limit, self.fork_at - 1)
        if not self.prompt_logprobs_complete:
            assert self.prompt_logprobs is not None
            limit = min(limit, len(self.prompt_logprobs) - 1)
        return limit

    def get_seqs(self, status: SequenceStatus | None = None) -> list[Sequence]:
        if status is None:
            return self.seqs
        return [seq for seq in self.seqs if seq.status == status]

    def get_unfinished_seqs(self) -> list[Sequence]:
        """The sequences still generating, which are scheduled together.

        Before a fork, that is the leader only: the others hold no blocks
        and are not scheduled yet.
        """
        if len(self.seqs) == 1:  # the common case, kept cheap
            return [] if self.seqs[0].is_finished else self.seqs
        unfinished = [seq for seq in self.seqs if not seq.is_finished]
        return unfinished[:1] if self.fork_pending else unfinished

    def get_followers(self) -> list[Sequence]:
        """Before a fork: the sequences that will take the leader's blocks."""
        assert self.fork_pending
        return [seq for seq in self.seqs if not seq.is_finished][1:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the group's sequences compute before they next sample (or,
        before a fork, that the leader computes before it)."""
        seq = self.get_unfinished_seqs()[0]
        if self.fork_at is not None:
            return self.fork_at - seq.num_computed_tokens
        return seq.num_uncomputed_tokens

    def share_prefix_on_recompute(self) -> None:
        """After a preemption that dropped the cache: compute the tokens
        that all unfinished sequences share once, then fork (the tokens of
        equal-length sequences differ somewhere, so each keeps at least its
        last one)."""
        unfinished = [seq for seq in self.seqs if not seq.is_finished]
        if len(unfinished) < 2:
            return
        first = unfinished[0]
        num_prompt = first.num_prompt_tokens
        shared = first.num_tokens - 1
        for other in unfinished[1:]:
            same = num_prompt  # forked sequences share the prompt
            while (same < shared and first.output_token_ids[same - num_prompt]
                   == other.output_token_ids[same - num_prompt]):
                same += 1
            shared = min(shared, same)
        if shared >= 1:
            self.fork_at = shared

    def finish_all(self, status: SequenceStatus) -> list[Sequence]:
        """Finish every unfinished sequence (forked or not); returns them."""
        unfinished = [seq for seq in self.seqs if not seq.is_finished]
        for seq in unfinished:
            seq.status = status
        return unfinished

    def is_finished(self) -> bool:
        if len(self.seqs) == 1:
            return self.seqs[0].is_finished
        return all(seq.is_finished for seq in self.seqs)

    def __repr__(self) -> str:
        return (f"SequenceGroup(request_id={self.request_id}, "
                f"seqs={len(self.seqs)}, priority={self.priority})")


@dataclass
class ScheduledSequence:
    """What the model runner needs to run one sequence for one step."""
    seq_id: int
    token_ids: list[int]  # the tokens computed this step (a prefill chunk or 1)
    num_computed_tokens: int  # tokens already in the cache before this step
    block_table: list[int]
    # Sample a token after this step: the chunk reaches the sequence's end.
    do_sample: bool
    sampling_params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Compute prompt logprobs for prompt tokens from this index on (those
    # whose preceding position is in this step's chunk); None: none.
    prompt_logprobs_from: int | None = None
    seed_key: int | None = None  # Sequence.seed_key
