import pytest

from vllm.core.block_manager import AllocStatus, BlockAllocator, BlockManager
from vllm.sampling_params import SamplingParams
from vllm.sequence import Sequence, SequenceGroup


def _group(request_id: str, prompt_len: int, n: int = 1) -> SequenceGroup:
    seqs = [Sequence(i, list(range(prompt_len))) for i in range(n)]
    return SequenceGroup(request_id, seqs, SamplingParams())


def test_allocator_free_list_and_ref_counts() -> None:
    alloc = BlockAllocator(3)
    blocks = [alloc.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and alloc.num_free_blocks == 0
    with pytest.raises(RuntimeError, match="Out of KV-cache blocks"):
        alloc.allocate()
    alloc.free(blocks[1])
    assert alloc.num_free_blocks == 1 and alloc.ref_count(blocks[1]) == 0
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free(blocks[1])


def test_allocate_covers_chunks_and_grows_by_block() -> None:
    bm = BlockManager(block_size=4, num_gpu_blocks=10, watermark=0.0)
    group = _group("a", prompt_len=10)
    seq = group.seqs[0]
    assert bm.can_allocate(group, 6) == AllocStatus.OK
    bm.allocate(group, 6)  # first chunk: 6 tokens -> 2 blocks
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 6
    bm.append_slots(seq, 4)  # rest of the prompt: 10 tokens -> 3 blocks
    assert len(seq.block_table) == 3
    seq.num_computed_tokens = 10
    seq.output_token_ids.append(1)
    bm.append_slots(seq, 1)  # token 11 still fits in block 3
    assert len(seq.block_table) == 3
    assert bm.get_num_free_gpu_blocks() == 7
    bm.free(seq)
    assert bm.get_num_free_gpu_blocks() == 10 and seq.block_table == []


def test_can_allocate_never_later() -> None:
    bm = BlockManager(block_size=4, num_gpu_blocks=4, watermark=0.0)
    assert bm.can_allocate(_group("big", 17), 17) == AllocStatus.NEVER
    first = _group("a", 12)
    bm.allocate(first, 12)  # 3 of 4 blocks
    assert bm.can_allocate(_group("b", 8), 8) == AllocStatus.LATER
    assert bm.can_allocate(_group("c", 4), 4) == AllocStatus.OK
    assert bm.usage == pytest.approx(0.75)
