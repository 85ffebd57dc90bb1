"""The scheduler and block manager driven by fake model outputs (no model)."""
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.config import SchedulerConfig
from vllm.core.block_manager import BlockManager, cdiv
from vllm.core.scheduler import Scheduler, SchedulingBudget
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
                 max_model_len: int = 64) -> None:
        config = SchedulerConfig(max_num_batched_tokens=max_tokens,
                                 max_num_seqs=max_seqs,
                                 max_model_len=max_model_len,
                                 enable_chunked_prefill=chunked)
        self.bm = BlockManager(block_size, num_blocks)
        self.scheduler = Scheduler(config, self.bm)
        self.seq_ids = 0
        self.groups: dict[str, SequenceGroup] = {}

    def add(self, request_id: str, prompt_len: int, max_out: int) -> None:
        seq = Sequence(self.seq_ids, [7] * prompt_len)
        self.seq_ids += 1
        group = SequenceGroup(request_id, [seq],
                              SamplingParams(max_tokens=max_out))
        self.groups[request_id] = group
        self.scheduler.add_seq_group(group)

    def step(self) -> int:
        out = self.scheduler.schedule()
        assert out.num_batched_tokens <= self.scheduler.config.max_num_batched_tokens
        assert len(
            out.scheduled_seq_groups) <= self.scheduler.config.max_num_seqs
        for sg in out.scheduled_seq_groups:
            for seq in sg.seq_group.get_unfinished_seqs():
                # blocks must cover what is about to be computed
                assert len(seq.block_table) * self.bm.block_size >= (
                    seq.num_computed_tokens + sg.token_chunk_size)
                seq.num_computed_tokens += sg.token_chunk_size
                if seq.num_computed_tokens == seq.num_tokens:
                    seq.output_token_ids.append(1)
                    params = sg.seq_group.sampling_params
                    if len(seq.output_token_ids) >= params.max_tokens:
                        seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
        self.scheduler.free_finished_seq_groups()
        self.check_invariants()
        return out.num_preempted

    def check_invariants(self) -> None:
        holders: Counter[int] = Counter()
        for group in self.groups.values():
            for seq in group.seqs:
                holders.update(seq.block_table)
        alloc = self.bm.allocator
        for block in range(alloc.num_blocks):
            assert alloc.ref_count(block) == holders[block], block
        assert alloc.num_free_blocks == alloc.num_blocks - len(holders)


def test_budget() -> None:
    budget = SchedulingBudget(token_budget=10, max_num_seqs=2)
    assert budget.can_schedule(num_new_tokens=10, num_new_seqs=1)
    budget.add_num_batched_tokens(8)
    budget.add_num_seqs(1)
    assert not budget.can_schedule(num_new_tokens=3, num_new_seqs=1)
    assert budget.can_schedule(num_new_tokens=2, num_new_seqs=1)
    assert not budget.can_schedule(num_new_tokens=0, num_new_seqs=1)
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


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]),
                              st.integers(1, 30), st.integers(1, 12)),
                    min_size=1,
                    max_size=40),
       num_blocks=st.integers(8, 40),
       max_tokens=st.integers(8, 48),
       chunked=st.booleans())
def test_random_workloads_keep_invariants(ops, num_blocks, max_tokens,
                                          chunked) -> None:
    """No block leaked or freed twice, ref counts equal holders, the budget is
    respected, and every request finishes."""
    max_model_len = 32
    eng = FakeEngine(num_blocks=num_blocks,
                     max_tokens=max(max_tokens, 32),
                     chunked=chunked,
                     max_model_len=max_model_len)
    aborted: set[str] = set()
    for i, (op, a, b) in enumerate(ops):
        if op == "add":
            prompt = min(a, max_model_len - b)
            if cdiv(prompt + b, 4) <= num_blocks:
                eng.add(f"r{i}", max(prompt, 1), b)
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
    for rid, group in eng.groups.items():
        assert group.is_finished()
        if rid not in aborted and group.seqs[0].status != \
                SequenceStatus.FINISHED_LENGTH_CAPPED:
            raise AssertionError(f"{rid} ended as {group.seqs[0].status}")
    assert eng.bm.get_num_free_gpu_blocks() == num_blocks
