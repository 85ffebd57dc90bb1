"""The scheduler: which requests run in the next step, and how many tokens each.

It counts tokens, not phases. Each step has a budget of ``max_num_batched_tokens``
tokens and ``max_num_seqs`` sequences. Running requests are served first (decodes,
then unfinished prefill chunks); waiting requests fill what is left, in arrival
order (FCFS). A prompt longer than the remaining budget is split into chunks when
chunked prefill is on. When the KV cache runs out, the most recently admitted
request is preempted: its blocks are freed and it is recomputed later.
"""
from collections import deque
from dataclasses import dataclass, field

from vllm.config import SchedulerConfig
from vllm.core.block_manager import AllocStatus, BlockManager
from vllm.logger import init_logger
from vllm.sequence import SequenceGroup, SequenceStatus

logger = init_logger(__name__)

# Preemption warnings are repeated once every this many preemptions.
_PREEMPTION_WARNING_INTERVAL = 50


@dataclass
class SchedulingBudget:
    """Tokens and sequences still available in this step."""
    token_budget: int
    max_num_seqs: int
    num_batched_tokens: int = 0
    num_curr_seqs: int = 0

    def can_schedule(self, *, num_new_tokens: int, num_new_seqs: int) -> bool:
        return (num_new_tokens > 0 and self.num_batched_tokens + num_new_tokens
                <= self.token_budget
                and self.num_curr_seqs + num_new_seqs <= self.max_num_seqs)

    def remaining_token_budget(self) -> int:
        return self.token_budget - self.num_batched_tokens

    def add_num_batched_tokens(self, num_tokens: int) -> None:
        self.num_batched_tokens += num_tokens

    def add_num_seqs(self, num_seqs: int) -> None:
        self.num_curr_seqs += num_seqs


@dataclass
class ScheduledSequenceGroup:
    seq_group: SequenceGroup
    # Tokens computed for each running sequence of the group this step.
    token_chunk_size: int


@dataclass
class SchedulerPrefillOutputs:
    seq_groups: list[ScheduledSequenceGroup] = field(default_factory=list)
    # Requests that can never fit in the KV cache; they finish unserved.
    ignored_seq_groups: list[SequenceGroup] = field(default_factory=list)


@dataclass
class SchedulerOutputs:
    scheduled_seq_groups: list[ScheduledSequenceGroup]
    num_batched_tokens: int
    ignored_seq_groups: list[SequenceGroup]
    num_preempted: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_seq_groups


class Scheduler:
    """FCFS continuous batching on a token budget, preempting by recompute."""

    def __init__(self, scheduler_config: SchedulerConfig,
                 block_manager: BlockManager) -> None:
        self.config = scheduler_config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # in order of admission
        self.num_cumulative_preemption = 0

    def add_seq_group(self, seq_group: SequenceGroup) -> None:
        self.waiting.append(seq_group)

    def has_unfinished_seqs(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_seq_groups(self) -> int:
        return len(self.waiting) + len(self.running)

    def abort_seq_group(self, request_ids: set[str]) -> list[SequenceGroup]:
        """Finish the given requests as aborted and free their blocks."""
        aborted = []
        for queue in (self.waiting, self.running):
            for seq_group in list(queue):
                if seq_group.request_id not in request_ids:
                    continue
                queue.remove(seq_group)
                for seq in seq_group.get_unfinished_seqs():
                    seq.status = SequenceStatus.FINISHED_ABORTED
                    self.block_manager.free(seq)
                aborted.append(seq_group)
        return aborted

    def free_finished_seq_groups(self) -> None:
        """Release the blocks of finished sequences; drop finished requests."""
        for seq_group in self.running:
            for seq in seq_group.seqs:
                if seq.is_finished and seq.block_table:
                    self.block_manager.free(seq)
        self.running = [g for g in self.running if not g.is_finished()]

    def schedule(self) -> SchedulerOutputs:
        budget = SchedulingBudget(self.config.max_num_batched_tokens,
                                  self.config.max_num_seqs)
        scheduled, num_preempted = self._schedule_running(budget)
        ignored: list[SequenceGroup] = []
        # Admit new work only when nothing had to be evicted for running work.
        if num_preempted == 0:
            prefills = self._schedule_prefills(budget)
            scheduled += prefills.seq_groups
            ignored = prefills.ignored_seq_groups
        return SchedulerOutputs(scheduled_seq_groups=scheduled,
                                num_batched_tokens=budget.num_batched_tokens,
                                ignored_seq_groups=ignored,
                                num_preempted=num_preempted)

    @staticmethod
    def _num_uncomputed_tokens(seq_group: SequenceGroup) -> int:
        # All unfinished sequences of a group advance together.
        return seq_group.get_unfinished_seqs()[0].num_uncomputed_tokens

    def _schedule_running(
            self, budget: SchedulingBudget
    ) -> tuple[list[ScheduledSequenceGroup], int]:
        # decodes first, then the next chunks of partly computed prompts
        order = sorted(self.running,
                       key=lambda g: self._num_uncomputed_tokens(g) > 1)
        scheduled: list[ScheduledSequenceGroup] = []
        scheduled_ids: set[int] = set()
        preempted_ids: set[int] = set()
        for seq_group in order:
            if id(seq_group) in preempted_ids:
                continue
            num_seqs = len(seq_group.get_unfinished_seqs())
            num_new_tokens = min(self._num_uncomputed_tokens(seq_group),
                                 budget.remaining_token_budget())
            if not budget.can_schedule(num_new_tokens=num_new_tokens,
                                       num_new_seqs=num_seqs):
                continue
            while not self.block_manager.can_append_slots(
                    seq_group, num_new_tokens):
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim)
                preempted_ids.add(id(victim))
                if victim is seq_group:
                    break
            else:
                for seq in seq_group.get_unfinished_seqs():
                    self.block_manager.append_slots(seq, num_new_tokens)
                budget.add_num_batched_tokens(num_new_tokens)
                budget.add_num_seqs(num_seqs)
                scheduled.append(
                    ScheduledSequenceGroup(seq_group, num_new_tokens))
                scheduled_ids.add(id(seq_group))
        return scheduled, len(preempted_ids)

    def _pick_victim(self, scheduled_ids: set[int]) -> SequenceGroup:
        """The most recently admitted request not yet scheduled in this step."""
        for seq_group in reversed(self.running):
            if id(seq_group) not in scheduled_ids:
                return seq_group
        raise AssertionError("the group being scheduled is always a candidate")

    def _preempt(self, seq_group: SequenceGroup) -> None:
        """Free the request's blocks and put it first in line to be recomputed."""
        for seq in seq_group.get_unfinished_seqs():
            self.block_manager.free(seq)
            seq.reset_for_recompute()
        self.running.remove(seq_group)
        self.waiting.appendleft(seq_group)
        self.num_cumulative_preemption += 1
        if self.num_cumulative_preemption % _PREEMPTION_WARNING_INTERVAL == 1:
            logger.warning(
                "Request %s was preempted (recompute) because the KV cache is "
                "full; this slows generation down. Increase "
                "gpu_memory_utilization (or VLLM_CPU_KVCACHE_SPACE on CPU) or "
                "lower max_num_seqs. total preemptions=%d",
                seq_group.request_id, self.num_cumulative_preemption)

    def _schedule_prefills(self,
                           budget: SchedulingBudget) -> SchedulerPrefillOutputs:
        """Admit waiting requests in order while the budget and the cache allow."""
        out = SchedulerPrefillOutputs()
        while self.waiting:
            seq_group = self.waiting[0]
            num_seqs = len(seq_group.get_unfinished_seqs())
            num_new_tokens = self._num_uncomputed_tokens(seq_group)
            if (not self.config.enable_chunked_prefill
                    and num_new_tokens > budget.remaining_token_budget()):
                break
            num_new_tokens = min(num_new_tokens,
                                 budget.remaining_token_budget())
            if not budget.can_schedule(num_new_tokens=num_new_tokens,
                                       num_new_seqs=num_seqs):
                break
            status = self.block_manager.can_allocate(seq_group, num_new_tokens)
            if status == AllocStatus.LATER:
                break
            self.waiting.popleft()
            if status == AllocStatus.NEVER:
                logger.warning(
                    "Request %s needs more KV-cache blocks than the whole "
                    "cache has; it is finished unserved.", seq_group.request_id)
                for seq in seq_group.get_unfinished_seqs():
                    seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
                out.ignored_seq_groups.append(seq_group)
                continue
            self.block_manager.allocate(seq_group, num_new_tokens)
            for seq in seq_group.get_unfinished_seqs():
                seq.status = SequenceStatus.RUNNING
            self.running.append(seq_group)
            budget.add_num_batched_tokens(num_new_tokens)
            budget.add_num_seqs(num_seqs)
            out.seq_groups.append(
                ScheduledSequenceGroup(seq_group, num_new_tokens))
        return out
