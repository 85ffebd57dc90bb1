"""The scheduler: which requests run in the next step, and how many tokens each.

It counts tokens, not phases. Each step has a budget of ``max_num_batched_tokens``
tokens and ``max_num_seqs`` sequences. Running requests are served first (decodes,
then unfinished prefill chunks); then swapped-out requests come back; waiting
requests fill what is left. A prompt longer than the remaining budget is split into
chunks when chunked prefill is on. When the KV cache runs out, a running request is
preempted: its blocks are freed and it is recomputed later, or (``preemption_mode=
"swap"``) its blocks are copied to CPU memory and copied back later. The ``n``
samples of a request share its prompt: the first sequence computes all of it but
the last token, then the others fork its blocks (copy-on-write).

``Scheduler`` serves requests first come, first served; ``PriorityScheduler``
serves lower ``priority`` values first and lets urgent requests preempt others.
"""
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from vllm.config import SchedulerConfig
from vllm.core.block_manager import AllocStatus, BlockManager
from vllm.logger import init_logger
from vllm.sequence import Sequence, SequenceGroup, SequenceStatus

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

    def chunk_size(self, num_uncomputed: int, num_seqs: int) -> int:
        """Tokens each of a group's ``num_seqs`` sequences may compute: they
        all compute the same chunk, so it must fit ``num_seqs`` times."""
        return min(num_uncomputed, self.remaining_token_budget() // num_seqs)

    def can_schedule(self, *, chunk_size: int, num_new_seqs: int) -> bool:
        return (chunk_size > 0
                and self.num_batched_tokens + chunk_size * num_new_seqs
                <= self.token_budget
                and self.num_curr_seqs + num_new_seqs <= self.max_num_seqs)

    def remaining_token_budget(self) -> int:
        return self.token_budget - self.num_batched_tokens

    def add(self, chunk_size: int, num_seqs: int) -> None:
        """Charge ``num_seqs`` sequences computing ``chunk_size`` tokens each."""
        self.num_batched_tokens += chunk_size * num_seqs
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
    # KV-cache copies the worker makes before the forward pass, in order
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    # copy-on-write (source, destination) device blocks
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled_seq_groups or self.blocks_to_swap_out
                    or self.blocks_to_swap_in or self.blocks_to_copy)


class Scheduler:
    """FCFS continuous batching on a token budget.

    Subclasses change the policy through three hooks: ``_order_waiting``
    (who is admitted first), ``_pick_victim`` (who is preempted when blocks run
    out) and ``_preempt_for_waiting`` (whether waiting work may evict running
    work before the step is built).
    """

    def __init__(self, scheduler_config: SchedulerConfig,
                 block_manager: BlockManager) -> None:
        self.config = scheduler_config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # in order of admission
        self.swapped: deque[SequenceGroup] = deque()
        self.num_cumulative_preemption = 0
        self.num_steps = 0
        self._pending_swap_out: list[tuple[int, int]] = []
        # A preemption since the last free_finished_seq_groups.
        self._preempted = False

    def add_seq_group(self, seq_group: SequenceGroup) -> None:
        seq_group.arrival_step = self.num_steps
        self.waiting.append(seq_group)

    def has_unfinished_seqs(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def get_num_unfinished_seq_groups(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def abort_seq_group(self, request_ids: set[str]) -> list[SequenceGroup]:
        """Finish the given requests as aborted and free all they hold."""
        aborted = []
        for queue in (self.waiting, self.running, self.swapped):
            for seq_group in [g for g in queue if g.request_id in request_ids]:
                queue.remove(seq_group)
                for seq in seq_group.finish_all(
                        SequenceStatus.FINISHED_ABORTED):
                    self.block_manager.free(seq)
                aborted.append(seq_group)
        return aborted

    def free_finished_seq_groups(self) -> None:
        """Release the blocks of finished sequences; drop finished requests.

        After a preemption the waiting and swapped queues are searched too:
        with async scheduling, a request preempted while its last step still
        ran finishes there when that step's tokens arrive.
        """
        self._free_finished(self.running, only_gpu_blocks=True)
        self.running = [g for g in self.running if not g.is_finished()]
        if self._preempted:
            self._preempted = False
            for queue in (self.waiting, self.swapped):
                for seq_group in self._free_finished(queue,
                                                     only_gpu_blocks=False):
                    queue.remove(seq_group)

    def _free_finished(self, queue: Iterable[SequenceGroup],
                       only_gpu_blocks: bool) -> list[SequenceGroup]:
        """Free the finished sequences of ``queue`` (``only_gpu_blocks``: the
        queue holds no swapped sequence, whose CPU blocks are not in
        block_table); -> its finished groups."""
        finished = []
        for seq_group in queue:
            for seq in seq_group.seqs:
                if seq.is_finished and (seq.block_table or not only_gpu_blocks):
                    self.block_manager.free(seq)
            if seq_group.is_finished():
                self.block_manager.observe_finished(seq_group)
                finished.append(seq_group)
        return finished

    def schedule(self) -> SchedulerOutputs:
        self.num_steps += 1
        caching = self.block_manager.enable_caching
        for seq_group in self.running:
            if caching:
                for seq in seq_group.get_unfinished_seqs():
                    self.block_manager.register_computed_blocks(seq)
            # NOTE: running groups only: a group reaches the fork point in a
            # step, and is forked here before it can be preempted or swapped.
            if seq_group.fork_pending and seq_group.num_uncomputed_tokens == 0:
                self._fork(seq_group)
        self._order_waiting()
        self._preempt_for_waiting()
        budget = SchedulingBudget(self.config.max_num_batched_tokens,
                                  self.config.max_num_seqs)
        scheduled, num_preempted, ignored = self._schedule_running(budget)
        swap_in: list[tuple[int, int]] = []
        # Admit work only when nothing had to be evicted for running work,
        # and swapped-out requests before new ones.
        if num_preempted == 0:
            swap_in = self._schedule_swapped(budget, scheduled)
            if not self.swapped:
                prefills = self._schedule_prefills(budget)
                scheduled += prefills.seq_groups
                ignored += prefills.ignored_seq_groups
        swap_out, self._pending_swap_out = self._pending_swap_out, []
        return SchedulerOutputs(
            scheduled_seq_groups=scheduled,
            num_batched_tokens=budget.num_batched_tokens,
            ignored_seq_groups=ignored,
            num_preempted=num_preempted,
            blocks_to_swap_out=swap_out,
            blocks_to_swap_in=swap_in,
            blocks_to_copy=self.block_manager.take_blocks_to_copy())

    def _fork(self, seq_group: SequenceGroup) -> None:
        """The group's other sequences take the blocks of its leader, which
        has computed the ``fork_at`` tokens they all share."""
        leader = seq_group.get_unfinished_seqs()[0]
        for follower in seq_group.get_followers():
            self.block_manager.fork(leader, follower)
            follower.status = leader.status
        seq_group.fork_at = None

    def fork_seq(self, parent: Sequence, child: Sequence) -> None:
        """Beam search: ``child`` continues from ``parent``'s blocks."""
        self.block_manager.fork(parent, child)
        child.status = parent.status

    def free_seq(self, seq: Sequence) -> None:
        """Beam search: a dropped beam lets its blocks go."""
        self.block_manager.free(seq)

    # ------------------------------------------------------ policy hooks
    def _order_waiting(self) -> None:
        """FCFS: the waiting queue is already in arrival order."""

    def _preempt_for_waiting(self) -> None:
        """FCFS never evicts running work for waiting work."""

    def _pick_victim(self, scheduled_ids: set[int]) -> SequenceGroup:
        """The most recently admitted request not yet scheduled in this step."""
        for seq_group in reversed(self.running):
            if id(seq_group) not in scheduled_ids:
                return seq_group
        raise AssertionError("the group being scheduled is always a candidate")

    # --------------------------------------------------------- running
    def _schedule_running(
        self, budget: SchedulingBudget
    ) -> tuple[list[ScheduledSequenceGroup], int, list[SequenceGroup]]:
        """-> (scheduled, number of groups preempted, groups finished because
        they outgrew the whole cache)."""
        # decodes first, then the next chunks of partly computed prompts
        order = sorted(self.running, key=lambda g: g.num_uncomputed_tokens > 1)
        oversized: list[SequenceGroup] = []
        scheduled: list[ScheduledSequenceGroup] = []
        scheduled_ids: set[int] = set()
        preempted_ids: set[int] = set()
        for seq_group in order:
            if id(seq_group) in preempted_ids:
                continue
            seqs = seq_group.get_unfinished_seqs()
            num_seqs = len(seqs)
            num_new_tokens = budget.chunk_size(seq_group.num_uncomputed_tokens,
                                               num_seqs)
            if not budget.can_schedule(chunk_size=num_new_tokens,
                                       num_new_seqs=num_seqs):
                continue
            while not self.block_manager.can_append_slots(
                    seq_group, num_new_tokens):
                if self.running == [seq_group]:
                    # Alone and still out of blocks: several sequences that
                    # together outgrow the cache. Retrying would loop.
                    self._finish_oversized(seq_group)
                    oversized.append(seq_group)
                    break
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim)
                preempted_ids.add(id(victim))
                if victim is seq_group:
                    break
            else:
                for seq in seqs:
                    self.block_manager.append_slots(seq, num_new_tokens)
                budget.add(num_new_tokens, num_seqs)
                scheduled.append(
                    ScheduledSequenceGroup(seq_group, num_new_tokens))
                scheduled_ids.add(id(seq_group))
        return scheduled, len(preempted_ids), oversized

    def _finish_oversized(self, seq_group: SequenceGroup) -> None:
        logger.warning(
            "Request %s (%d sequences) needs more KV-cache blocks than the "
            "whole cache has; it is finished early.", seq_group.request_id,
            len(seq_group.get_unfinished_seqs()))
        self.running.remove(seq_group)
        for seq in seq_group.finish_all(SequenceStatus.FINISHED_LENGTH_CAPPED):
            self.block_manager.free(seq)

    def _preempt(self,
                 seq_group: SequenceGroup,
                 allow_swap: bool = True) -> None:
        """Evict a running request: swap its blocks to CPU when configured and
        possible, otherwise free them and recompute it later."""
        self.running.remove(seq_group)
        self._preempted = True
        swap = (allow_swap and self.config.preemption_mode == "swap"
                and self.block_manager.can_swap_out(seq_group))
        if swap:
            self._pending_swap_out += self.block_manager.swap_out(seq_group)
            for seq in seq_group.get_unfinished_seqs():
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq_group)
        else:
            for seq in seq_group.get_unfinished_seqs():
                self.block_manager.free(seq)
                seq.reset_for_recompute()
            seq_group.share_prefix_on_recompute()
            self.waiting.appendleft(seq_group)
        self.num_cumulative_preemption += 1
        if self.num_cumulative_preemption % _PREEMPTION_WARNING_INTERVAL == 1:
            logger.warning(
                "Request %s was preempted (%s) because the KV cache is full; "
                "this slows generation down. Increase gpu_memory_utilization "
                "(or VLLM_CPU_KVCACHE_SPACE on CPU) or lower max_num_seqs. "
                "total preemptions=%d", seq_group.request_id,
                "swap" if swap else "recompute", self.num_cumulative_preemption)

    # --------------------------------------------------------- swapped
    def _schedule_swapped(
            self, budget: SchedulingBudget,
            scheduled: list[ScheduledSequenceGroup]) -> list[tuple[int, int]]:
        """Bring swapped-out requests back, oldest first, while they fit."""
        copies: list[tuple[int, int]] = []
        while self.swapped:
            seq_group = self.swapped[0]
            num_seqs = len(seq_group.get_unfinished_seqs())
            num_new_tokens = budget.chunk_size(seq_group.num_uncomputed_tokens,
                                               num_seqs)
            if not (budget.can_schedule(chunk_size=num_new_tokens,
                                        num_new_seqs=num_seqs)
                    and self.block_manager.can_swap_in(seq_group)):
                break
            self.swapped.popleft()
            copies += self.block_manager.swap_in(seq_group)
            if not self.block_manager.can_append_slots(seq_group,
                                                       num_new_tokens):
                # Its blocks are back but it cannot grow this step: it stays
                # running and is served next step.
                self.running.append(seq_group)
                for seq in seq_group.get_unfinished_seqs():
                    seq.status = SequenceStatus.RUNNING
                continue
            for seq in seq_group.get_unfinished_seqs():
                seq.status = SequenceStatus.RUNNING
                self.block_manager.append_slots(seq, num_new_tokens)
            self.running.append(seq_group)
            budget.add(num_new_tokens, num_seqs)
            scheduled.append(ScheduledSequenceGroup(seq_group, num_new_tokens))
        return copies

    # --------------------------------------------------------- prefills
    def _schedule_prefills(self,
                           budget: SchedulingBudget) -> SchedulerPrefillOutputs:
        """Admit waiting requests in order while the budget and the cache allow."""
        out = SchedulerPrefillOutputs()
        while self.waiting:
            seq_group = self.waiting[0]
            num_seqs = len(seq_group.get_unfinished_seqs())
            num_cached = self.block_manager.get_num_cached_tokens(seq_group)
            num_new_tokens = seq_group.num_uncomputed_tokens - num_cached
            chunk = budget.chunk_size(num_new_tokens, num_seqs)
            if not self.config.enable_chunked_prefill and chunk < num_new_tokens:
                break
            num_new_tokens = chunk
            if not budget.can_schedule(chunk_size=num_new_tokens,
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
                seq_group.finish_all(SequenceStatus.FINISHED_LENGTH_CAPPED)
                out.ignored_seq_groups.append(seq_group)
                continue
            cached = self.block_manager.allocate(seq_group, num_new_tokens)
            if seq_group.num_cached_tokens is None:
                seq_group.num_cached_tokens = cached
            for seq in seq_group.get_unfinished_seqs():
                seq.status = SequenceStatus.RUNNING
            self.running.append(seq_group)
            budget.add(num_new_tokens, num_seqs)
            out.seq_groups.append(
                ScheduledSequenceGroup(seq_group, num_new_tokens))
        return out


class PriorityScheduler(Scheduler):
    """Serves lower ``priority`` values first; arrival time breaks ties.

    - The waiting queue is ordered by (effective priority, arrival time).
    - When the request at the head of the queue cannot be admitted for lack
      of KV-cache blocks, running requests of a worse effective priority are
      preempted for it (worst first), instead of waiting for memory to run out.
    - When blocks run out mid-step, the running request with the worst
      (effective priority, arrival time) is the victim.
    - Aging: every ``priority_aging_steps`` scheduler steps since its arrival,
      a request's effective priority improves by one. A request of priority
      ``p`` therefore outranks every newcomer of priority ``q`` after at most
      ``(p - q + 1) * priority_aging_steps`` steps: no request waits forever.
      ``priority_aging_steps=None`` turns aging off.
    """

    def _effective_priority(self, seq_group: SequenceGroup) -> int:
        aging = self.config.priority_aging_steps
        if not aging:
            return seq_group.priority
        waited = self.num_steps - seq_group.arrival_step
        return seq_group.priority - waited // aging

    def _rank(self, seq_group: SequenceGroup) -> tuple[int, float]:
        return self._effective_priority(seq_group), seq_group.arrival_time

    def _order_waiting(self) -> None:
        self.waiting = deque(sorted(self.waiting, key=self._rank))

    def _pick_victim(self, scheduled_ids: set[int]) -> SequenceGroup:
        candidates = [g for g in self.running if id(g) not in scheduled_ids]
        return max(candidates, key=self._rank)

    def _preempt_for_waiting(self) -> None:
        if not self.waiting:
            return
        head = self.waiting[0]
        num_cached = self.block_manager.get_num_cached_tokens(head)
        num_new = min(head.num_uncomputed_tokens - num_cached,
                      self.config.max_num_batched_tokens)
        while self.running:
            full = len(self.running) >= self.config.max_num_seqs
            status = self.block_manager.can_allocate(head, num_new)
            if status != AllocStatus.LATER and not full:
                return
            victim = max(self.running, key=self._rank)
            if self._rank(victim) <= self._rank(head):
                return
            # Recompute, never swap: swapped requests come back before waiting
            # ones, which would hand the memory straight back to the victim.
            self._preempt(victim, allow_swap=False)
            self._order_waiting()  # the victim went to the front
