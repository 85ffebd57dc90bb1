"""Paged KV-cache bookkeeping: which physical blocks each sequence owns.

A block holds the K/V of ``block_size`` consecutive tokens of one sequence. Blocks
come from a free list and carry a reference count, so that a block may later be
shared (prefix caching, parallel samples) and is returned to the free list only
when its last holder lets go.
"""
import enum
from collections import deque

from vllm.sequence import Sequence, SequenceGroup


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


class AllocStatus(enum.Enum):
    OK = enum.auto()  # can be allocated now
    LATER = enum.auto()  # not enough free blocks right now
    NEVER = enum.auto()  # larger than the whole cache


class BlockAllocator:
    """A free list of physical block ids with per-block reference counts."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("Out of KV-cache blocks; check can_allocate / "
                               "can_append_slots before allocating.")
        block = self._free.popleft()
        self._ref_counts[block] = 1
        return block

    def free(self, block: int) -> None:
        if self._ref_counts[block] <= 0:
            raise RuntimeError(f"Block {block} freed twice.")
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)


class BlockManager:
    """Maps sequences to KV-cache blocks; the scheduler asks it before it schedules.

    NOTE: a sequence's block table always covers at least its computed tokens:
    ``len(block_table) >= cdiv(num_computed_tokens, block_size)``.
    """

    def __init__(self,
                 block_size: int,
                 num_gpu_blocks: int,
                 watermark: float = 0.01) -> None:
        self.block_size = block_size
        self.num_total_gpu_blocks = num_gpu_blocks
        # Admitting new requests stops this many blocks short of full, so that
        # running sequences can still grow without immediate preemption.
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self.allocator = BlockAllocator(num_gpu_blocks)

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq_group: SequenceGroup,
                     num_new_tokens: int) -> AllocStatus:
        """Whether a waiting request's first ``num_new_tokens`` fit."""
        seqs = seq_group.get_unfinished_seqs()
        full_need = len(seqs) * cdiv(seqs[0].num_tokens, self.block_size)
        if full_need > self.num_total_gpu_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        need = sum(self._num_new_blocks(seq, num_new_tokens) for seq in seqs)
        if self.allocator.num_free_blocks - need < self.watermark_blocks:
            return AllocStatus.LATER
        return AllocStatus.OK

    def can_append_slots(self, seq_group: SequenceGroup,
                         num_new_tokens: int) -> bool:
        """Whether every running sequence of the group can take its new tokens."""
        need = sum(
            self._num_new_blocks(seq, num_new_tokens)
            for seq in seq_group.get_unfinished_seqs())
        return need <= self.allocator.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to cover ``num_new_tokens`` more tokens."""
        for _ in range(self._num_new_blocks(seq, num_new_tokens)):
            seq.block_table.append(self.allocator.allocate())

    def allocate(self, seq_group: SequenceGroup, num_new_tokens: int) -> None:
        for seq in seq_group.get_unfinished_seqs():
            self.append_slots(seq, num_new_tokens)

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.allocator.free(block)
        seq.block_table = []

    def get_num_free_gpu_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def get_block_table(self, seq: Sequence) -> list[int]:
        return seq.block_table

    @property
    def usage(self) -> float:
        """Fraction of the KV cache in use."""
        used = self.num_total_gpu_blocks - self.allocator.num_free_blocks
        return used / self.num_total_gpu_blocks
