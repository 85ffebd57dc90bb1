"""The scheduler and block manager driven by fake model outputs (no model)."""
from collections import Counter, defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.config import SchedulerConfig
from vllm.core.block_manager import BlockManager, SmartBlockAllocator, cdiv
from vllm.core.scheduler import PriorityScheduler, Scheduler, SchedulingBudget
from vllm.sampling_params import SamplingParams
from vllm.sequence import Sequence, SequenceGroup, SequenceStatus


class FakeEngine:
    """Advances request state the way LLMEngine does, with a fake sampler."""

    def __init__(self,
                 num_blocks: int,
                 block_size: int = 4,
                 max_tokens: int = 64,
                 max_seqs: int = 8,
                 chunked: bool = True,
                 max_model_len: int = 64,
                 caching: bool = False,
                 swap: bool = False,
                 priority: bool = False,
                 smart: bool = False) -> None:
        config = SchedulerConfig(
            max_num_batched_tokens=max_tokens,
            max_num_seqs=max_seqs,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
            policy="priority" if priority else "fcfs",
            preemption_mode="swap" if swap else "recompute",
            priority_aging_steps=4)
        manager_cls = SmartBlockAllocator if smart else BlockManager
        self.bm = manager_cls(block_size,
                              num_blocks,
                              enable_caching=caching,
                              num_cpu_blocks=num_blocks // 2 if swap else 0)
        scheduler_cls = PriorityScheduler if priority else Scheduler
        self.scheduler = scheduler_cls(config, self.bm)
        self.seq_ids = 0
        self.groups: dict[str, SequenceGroup] = {}
        # A fake KV cache: the token id each slot holds, moved by the
        # scheduler's copies exactly as the worker moves K/V.
        self.kv: defaultdict[int, list[int | None]] = defaultdict(
            lambda: [None] * block_size)
        self.cpu_kv: defaultdict[int, list[int | None]] = defaultdict(
            lambda: [None] * block_size)
        self.num_prompt_tokens_computed = 0
        self.num_swapped_out = self.num_swapped_in = 0

    def add(self,
            request_id: str,
            prompt_len: int,
            max_out: int,
            priority: int = 0,
            n: int = 1) -> None:
        # Identical leading tokens exercise prefix caching.
        seqs = [Sequence(self.seq_ids + i, [7] * prompt_len) for i in range(n)]
        self.seq_ids += n
        group = SequenceGroup(request_id,
                              seqs,
                              SamplingParams(n=n, max_tokens=max_out),
                              priority=priority)
        self.groups[request_id] = group
        self.scheduler.add_seq_group(group)

    def step(self) -> int:
        out = self.scheduler.schedule()
        config = self.scheduler.config
        assert out.num_batched_tokens <= config.max_num_batched_tokens
        # Every running sequence of a group computes the group's chunk.
        assert sum(sg.token_chunk_size * len(sg.seq_group.get_unfinished_seqs())
                   for sg in out.scheduled_seq_groups) == out.num_batched_tokens
        assert len(out.scheduled_seq_groups) <= config.max_num_seqs
        self.num_swapped_out += len(out.blocks_to_swap_out)
        self.num_swapped_in += len(out.blocks_to_swap_in)
        self.copy(out.blocks_to_swap_out, self.kv, self.cpu_kv)
        self.copy(out.blocks_to_swap_in, self.cpu_kv, self.kv)
        self.copy(out.blocks_to_copy, self.kv, self.kv)
        bs = self.bm.block_size
        for sg in out.scheduled_seq_groups:
            for seq in sg.seq_group.get_unfinished_seqs():
                # blocks must cover what is about to be computed
                assert len(seq.block_table) * bs >= (seq.num_computed_tokens +
                                                     sg.token_chunk_size)
                start = seq.num_computed_tokens
                for pos in range(start, start + sg.token_chunk_size):
                    self.kv[seq.block_table[pos // bs]][pos % bs] = \
                        seq.token_ids[pos]
                self.num_prompt_tokens_computed += max(
                    0,
                    min(seq.num_prompt_tokens, start + sg.token_chunk_size) -
                    start)
                seq.num_computed_tokens += sg.token_chunk_size
                if seq.num_computed_tokens == seq.num_tokens:
                    # siblings diverge: a shared block written without a
                    # copy would show in check_invariants
                    seq.output_token_ids.append(1 + seq.seq_id % 5)
                    params = sg.seq_group.sampling_params
                    if len(seq.output_token_ids) >= params.max_tokens:
                        seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
        self.scheduler.free_finished_seq_groups()
        self.check_invariants()
        return out.num_preempted

    @staticmethod
    def copy(mapping: list[tuple[int, int]], src: defaultdict,
             dst: defaultdict) -> None:
        blocks = [list(src[s]) for s, _ in mapping]  # all reads first
        for (_, d), contents in zip(mapping, blocks):
            dst[d] = contents

    def check_invariants(self) -> None:
        holders: Counter[int] = Counter()
        cpu_holders: Counter[int] = Counter()
        bs = self.bm.block_size
        for group in self.groups.values():
            for seq in group.seqs:
                holders.update(seq.block_table)
                cpu_holders.update(self.bm._cpu_tables.get(seq.seq_id, []))
                if seq.is_finished:
                    continue
                # the cache (or the swap space) holds the computed tokens
                kv, table = self.kv, seq.block_table
                if seq.status == SequenceStatus.SWAPPED:
                    kv, table = self.cpu_kv, self.bm._cpu_tables[seq.seq_id]
                assert len(table) * bs >= seq.num_computed_tokens
                for pos in range(seq.num_computed_tokens):
                    slot = kv[table[pos // bs]][pos % bs]
                    assert slot == seq.token_ids[pos], (seq, pos)
        for alloc, held in ((self.bm.allocator, holders),
                            (self.bm.cpu_allocator, cpu_holders)):
            for block in range(alloc.num_blocks):
                assert alloc.ref_count(block) == held[block], block
            assert alloc.num_free_blocks == alloc.num_blocks - len(held)


def test_budget() -> None:
    budget = SchedulingBudget(token_budget=10, max_num_seqs=3)
    assert budget.can_schedule(chunk_size=10, num_new_seqs=1)
    assert not budget.can_schedule(chunk_size=6, num_new_seqs=2)
    assert budget.chunk_size(100, num_seqs=3) == 3  # 3 sequences x 3 <= 10
    budget.add(4, num_seqs=2)  # two sequences of 4 tokens: 8
    assert not budget.can_schedule(chunk_size=3, num_new_seqs=1)
    assert budget.can_schedule(chunk_size=2, num_new_seqs=1)
    assert not budget.can_schedule(chunk_size=1, num_new_seqs=2)
    assert not budget.can_schedule(chunk_size=0, num_new_seqs=1)
    assert budget.remaining_token_budget() == 2


def test_fcfs_continuous_batching_and_chunking() -> None:
    eng = FakeEngine(num_blocks=64, max_tokens=16)
    eng.add("a", prompt_len=20, max_out=3)
    out = eng.scheduler.schedule()
    # the prompt does not fit in the budget: a first chunk of 16
    assert [sg.token_chunk_size for sg in out.scheduled_seq_groups] == [16]
    eng.groups["a"].seqs[0].num_computed_tokens += 16
    eng.add("b", prompt_len=5, max_out=2)
    out = eng.scheduler.schedule()
    # a's remaining 4 tokens first, then b joins the running batch
    assert [(sg.seq_group.request_id, sg.token_chunk_size)
            for sg in out.scheduled_seq_groups] == [("a", 4), ("b", 5)]


def test_no_chunking_waits_for_whole_prompt() -> None:
    eng = FakeEngine(num_blocks=64,
                     max_tokens=16,
                     chunked=False,
                     max_model_len=16)
    eng.add("a", prompt_len=10, max_out=2)
    eng.add("b", prompt_len=10, max_out=2)
    out = eng.scheduler.schedule()
    assert [sg.seq_group.request_id for sg in out.scheduled_seq_groups] == ["a"]


def test_preemption_recomputes_most_recent() -> None:
    # 6 blocks of 4 tokens: two requests of 8-token prompts growing to 16.
    eng = FakeEngine(num_blocks=6, max_tokens=64)
    eng.add("old", prompt_len=8, max_out=8)
    eng.add("new", prompt_len=8, max_out=8)
    preempted = 0
    for _ in range(100):
        preempted += eng.step()
        if not eng.scheduler.has_unfinished_seqs():
            break
    assert preempted > 0
    assert eng.scheduler.num_cumulative_preemption == preempted
    for group in eng.groups.values():
        assert group.is_finished()
        assert len(group.seqs[0].output_token_ids) == 8
    assert eng.bm.get_num_free_gpu_blocks() == 6


def test_abort_frees_blocks() -> None:
    eng = FakeEngine(num_blocks=16)
    eng.add("a", 10, 5)
    eng.add("b", 3, 5)
    eng.step()
    aborted = eng.scheduler.abort_seq_group({"a"})
    assert [g.request_id for g in aborted] == ["a"]
    assert eng.groups["a"].seqs[0].status == SequenceStatus.FINISHED_ABORTED
    eng.check_invariants()


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]),
                              st.integers(1, 30), st.integers(1, 12),
                              st.integers(1, 3)),
                    min_size=1,
                    max_size=40),
       num_blocks=st.integers(8, 40),
       max_tokens=st.integers(8, 48),
       chunked=st.booleans(),
       caching=st.booleans(),
       swap=st.booleans(),
       priority=st.booleans(),
       smart=st.booleans())
def test_random_workloads_keep_invariants(ops, num_blocks, max_tokens, chunked,
                                          caching, swap, priority,
                                          smart) -> None:
    """Under every policy, with parallel-sampling groups (n up to 3) that
    fork their prompt blocks: no block leaked or freed twice, ref counts
    equal holders (GPU and CPU), every sequence's cache holds its computed
    tokens, the budget is respected, and every request finishes."""
    max_model_len = 32
    eng = FakeEngine(num_blocks=num_blocks,
                     max_tokens=max(max_tokens, 32),
                     chunked=chunked,
                     max_model_len=max_model_len,
                     caching=caching,
                     swap=swap,
                     priority=priority,
                     smart=smart)
    aborted: set[str] = set()
    for i, (op, a, b, n) in enumerate(ops):
        if op == "add":
            prompt = min(a, max_model_len - b)
            # a group of n may outgrow the cache: it is finished early
            if cdiv(prompt + b, 4) <= num_blocks:
                eng.add(f"r{i}", max(prompt, 1), b, priority=a % 3, n=n)
        elif op == "step":
            eng.step()
        elif eng.groups:
            victim = sorted(eng.groups)[a % len(eng.groups)]
            eng.scheduler.abort_seq_group({victim})
            aborted.add(victim)
            eng.check_invariants()
    for _ in range(2000):
        if not eng.scheduler.has_unfinished_seqs():
            break
        eng.step()
    assert not eng.scheduler.has_unfinished_seqs()
    done = SequenceStatus.FINISHED_LENGTH_CAPPED
    for rid, group in eng.groups.items():
        allowed = {done, SequenceStatus.FINISHED_ABORTED} if rid in aborted \
            else {done}
        assert all(seq.status in allowed for seq in group.seqs), rid
    assert eng.bm.get_num_free_gpu_blocks() == num_blocks
    assert eng.bm.cpu_allocator.num_free_blocks == eng.bm.cpu_allocator.num_blocks


def test_prefix_caching_reuses_full_blocks() -> None:
    eng = FakeEngine(num_blocks=32, caching=True)
    eng.add("a", prompt_len=13, max_out=2)
    while eng.scheduler.has_unfinished_seqs():
        eng.step()
    # a's 3 full prompt blocks are free but cached; b shares them
    eng.add("b", prompt_len=14, max_out=2)
    out = eng.scheduler.schedule()
    assert eng.groups["b"].num_cached_tokens == 12
    assert out.scheduled_seq_groups[0].token_chunk_size == 2
    assert eng.bm.prefix_cache_hit_rate > 0
    # the last prompt token is always computed, even on a full hit
    eng.add("c", prompt_len=12, max_out=2)
    eng.scheduler.schedule()
    assert eng.groups["c"].num_cached_tokens == 8


def test_cached_block_contents_are_checked() -> None:
    bm = BlockManager(4, 8, enable_caching=True)
    first = Sequence(0, [1, 2, 3, 4, 5])
    bm.append_slots(first, 5)
    first.num_computed_tokens = 5
    bm.register_computed_blocks(first)
    other = Sequence(1, [9, 9, 9, 9, 5])
    # Force a hash collision: same hashes, other tokens.
    bm._block_hashes[1] = list(bm._block_hashes[0])
    group = SequenceGroup("x", [other], SamplingParams())
    assert bm.get_num_cached_tokens(group) == 0
    same = SequenceGroup("y", [Sequence(2, [1, 2, 3, 4, 6])], SamplingParams())
    assert bm.get_num_cached_tokens(same) == 4


def test_swap_preemption_keeps_computed_tokens() -> None:
    eng = FakeEngine(num_blocks=6, swap=True)
    eng.add("old", prompt_len=8, max_out=8)
    eng.add("new", prompt_len=8, max_out=8)
    for _ in range(200):
        eng.step()
        if not eng.scheduler.has_unfinished_seqs():
            break
    assert eng.num_swapped_out > 0
    assert eng.num_swapped_in == eng.num_swapped_out
    assert all(g.is_finished() for g in eng.groups.values())


def test_priority_preempts_running_lower_priority() -> None:
    eng = FakeEngine(num_blocks=7, priority=True)
    eng.add("low", prompt_len=12, max_out=16, priority=5)
    eng.step()
    eng.step()
    eng.add("urgent", prompt_len=16, max_out=4, priority=0)
    out = eng.scheduler.schedule()
    ids = [sg.seq_group.request_id for sg in out.scheduled_seq_groups]
    assert ids == ["urgent"]
    assert eng.groups["low"].seqs[0].status == SequenceStatus.WAITING
    assert eng.scheduler.num_cumulative_preemption == 1


def test_priority_aging_bounds_the_wait() -> None:
    """Aging every 4 steps: a priority-3 request outranks priority-0
    newcomers after (3 - 0 + 1) * 4 = 16 steps at most."""
    eng = FakeEngine(num_blocks=64, max_seqs=1, priority=True)
    eng.add("starved", prompt_len=4, max_out=1, priority=3)
    steps = 0
    while not eng.groups["starved"].is_finished():
        eng.add(f"vip{steps}", prompt_len=4, max_out=1, priority=0)
        eng.step()
        steps += 1
        assert steps <= 17
    assert steps >= 12  # it did wait behind the newcomers first


def test_fork_shares_the_prompt_and_copies_its_last_block() -> None:
    """n = 4, a 10-token prompt in blocks of 4: the first sequence computes
    9 tokens; then all four hold its blocks (ref count 4) and each computes
    the last prompt token; the three that write first into the shared,
    partly filled block get copies of it."""
    eng = FakeEngine(num_blocks=32)
    eng.add("a", prompt_len=10, max_out=3, n=4)
    group = eng.groups["a"]
    out = eng.scheduler.schedule()
    assert [(sg.token_chunk_size, len(sg.seq_group.get_unfinished_seqs()))
            for sg in out.scheduled_seq_groups] == [(9, 1)]
    first = group.seqs[0]
    first.num_computed_tokens += 9
    prompt_blocks = list(first.block_table)
    assert len(prompt_blocks) == 3

    out = eng.scheduler.schedule()
    assert [(sg.token_chunk_size, len(sg.seq_group.get_unfinished_seqs()))
            for sg in out.scheduled_seq_groups] == [(1, 4)]
    alloc = eng.bm.allocator
    full, partial = prompt_blocks[:2], prompt_blocks[2]
    assert [alloc.ref_count(b) for b in full] == [4, 4]
    assert all(seq.block_table[:2] == full for seq in group.seqs)
    assert len(out.blocks_to_copy) == 3
    assert {src for src, _ in out.blocks_to_copy} == {partial}
    assert alloc.ref_count(partial) == 1
    last_blocks = {seq.block_table[2] for seq in group.seqs}
    assert last_blocks == {partial} | {dst for _, dst in out.blocks_to_copy}
    assert alloc.num_free_blocks == 32 - 2 - 4


def test_fork_computes_the_prompt_once() -> None:
    for n in (1, 3):
        eng = FakeEngine(num_blocks=32)
        eng.add("a", prompt_len=10, max_out=4, n=n)
        while eng.scheduler.has_unfinished_seqs():
            eng.step()
        # 9 tokens by the first sequence, the last one by each
        assert eng.num_prompt_tokens_computed == 9 + n
        outputs = [seq.output_token_ids for seq in eng.groups["a"].seqs]
        assert all(len(o) == 4 for o in outputs)
        assert len({tuple(o) for o in outputs}) == n


def test_fork_at_a_block_boundary_copies_nothing() -> None:
    eng = FakeEngine(num_blocks=32)
    eng.add("a", prompt_len=9, max_out=2, n=3)
    eng.step()
    out = eng.scheduler.schedule()
    assert out.blocks_to_copy == []
    shared = eng.groups["a"].seqs[0].block_table[:2]
    assert [eng.bm.allocator.ref_count(b) for b in shared] == [3, 3]
    assert len({seq.block_table[2] for seq in eng.groups["a"].seqs}) == 3


def test_abort_before_the_fork_finishes_every_sequence() -> None:
    eng = FakeEngine(num_blocks=32, max_tokens=8)
    eng.add("a", prompt_len=20, max_out=2, n=3)
    eng.step()
    assert eng.groups["a"].fork_pending
    eng.scheduler.abort_seq_group({"a"})
    assert all(seq.status == SequenceStatus.FINISHED_ABORTED
               for seq in eng.groups["a"].seqs)
    eng.check_invariants()
    assert eng.bm.get_num_free_gpu_blocks() == 32


def test_swap_keeps_forked_blocks_shared() -> None:
    bm = BlockManager(4, 16, watermark=0.0, num_cpu_blocks=16)
    seqs = [Sequence(i, list(range(10))) for i in range(3)]
    group = SequenceGroup("a", seqs, SamplingParams(n=3))
    bm.allocate(group, 9)
    seqs[0].num_computed_tokens = 9
    group.fork_at = None
    for child in seqs[1:]:
        bm.fork(seqs[0], child)
    for seq in seqs:
        bm.append_slots(seq, 1)
    assert len(bm.take_blocks_to_copy()) == 2
    distinct = {b for seq in seqs for b in seq.block_table}
    assert len(distinct) == 2 + 3
    assert bm.can_swap_out(group)
    out = bm.swap_out(group)
    assert sorted(src for src, _ in out) == sorted(distinct)
    assert bm.cpu_allocator.num_free_blocks == 16 - 5
    assert bm.get_num_free_gpu_blocks() == 16
    back = bm.swap_in(group)
    assert len(back) == 5 and bm.get_num_free_gpu_blocks() == 16 - 5
    shared = seqs[0].block_table[:2]
    assert all(seq.block_table[:2] == shared for seq in seqs)
    assert [bm.allocator.ref_count(b) for b in shared] == [3, 3]


def test_recomputed_samples_share_their_common_prefix_again() -> None:
    """After a recompute, the leader computes what the samples share (the
    prompt here: their outputs differ), then they fork again; one prefix
    cache hit serves them all, so it must stop before that point."""
    eng = FakeEngine(num_blocks=32, caching=True)
    eng.add("a", prompt_len=5, max_out=12, n=2)
    group = eng.groups["a"]
    while len(group.seqs[0].output_token_ids) < 8:
        eng.step()
    eng.scheduler._preempt(group)
    assert group.seqs[0].status == SequenceStatus.WAITING
    assert group.fork_at == 5
    assert eng.bm.get_num_cached_tokens(group) == 4
    while eng.scheduler.has_unfinished_seqs():
        eng.step()  # check_invariants compares every cached token
    assert all(len(seq.output_token_ids) == 12 for seq in group.seqs)


def test_group_that_outgrows_the_cache_is_finished_early() -> None:
    """Three samples that together need 12 blocks of a cache of 8: once
    alone and still out of blocks, the group finishes instead of preempting
    itself forever."""
    eng = FakeEngine(num_blocks=8, max_tokens=16)
    eng.add("big", prompt_len=4, max_out=12, n=3)
    for _ in range(100):
        if not eng.scheduler.has_unfinished_seqs():
            break
        eng.step()
    group = eng.groups["big"]
    assert group.is_finished()
    assert all(seq.status == SequenceStatus.FINISHED_LENGTH_CAPPED
               and len(seq.output_token_ids) < 12 for seq in group.seqs)
    assert eng.bm.get_num_free_gpu_blocks() == 8
