"""InputBuffers lays a batch out as the attention backends expect."""
import torch

from vllm.worker.cuda_graph import capture_sizes
from vllm.worker.input_buffers import InputBuffers


def _buffers() -> InputBuffers:
    return InputBuffers(max_tokens=64,
                        max_seqs=8,
                        max_blocks=4,
                        block_size=4,
                        device=torch.device("cpu"))


def test_mixed_batch_layout() -> None:
    b = _buffers()
    # A decode at position 5 (blocks 7, 2), then a 3-token chunk after 2
    # cached tokens (block 4), then a fresh 6-token prompt (blocks 1, 3).
    input_ids, positions, logits_indices, md = b.prepare(
        token_ids=[[11], [21, 22, 23], [31, 32, 33, 34, 35, 36]],
        num_computed=[5, 2, 0],
        block_tables=[[7, 2], [4, 0], [1, 3]],
        sample_rows=[0, 2])
    assert input_ids.tolist() == [11, 21, 22, 23, 31, 32, 33, 34, 35, 36]
    assert positions.tolist() == [5, 2, 3, 4, 0, 1, 2, 3, 4, 5]
    # slot = block * 4 + position % 4
    assert md.slot_mapping.tolist() == [9, 18, 19, 0, 4, 5, 6, 7, 12, 13]
    assert md.query_start_loc.tolist() == [0, 1, 4, 10]
    assert md.seq_lens.tolist() == [6, 5, 6]
    assert md.block_tables[:, :2].tolist() == [[7, 2], [4, 0], [1, 3]]
    assert (md.num_actual_tokens, md.num_decodes, md.max_query_len,
            md.max_seq_len) == (10, 1, 6, 6)
    assert logits_indices.tolist() == [0, 9]


def test_padded_decode_batch() -> None:
    """CUDA-graph padding: extra one-token rows in the pad block."""
    b = _buffers()
    b.pad_block = 9
    input_ids, positions, logits_indices, md = b.prepare(
        token_ids=[[11], [12], [13]],
        num_computed=[0, 4, 9],
        block_tables=[[1], [2, 3], [4, 5, 6]],
        sample_rows=[0, 1, 2],
        pad_to=4,
        max_seq_len=16)
    assert input_ids.tolist() == [11, 12, 13, 0]
    assert md.slot_mapping.tolist() == [4, 12, 25, 36]
    assert md.seq_lens.tolist() == [1, 5, 10, 1]
    assert md.block_tables[3, 0] == 9
    assert md.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert (md.num_actual_tokens, md.num_decodes, md.max_seq_len) == (4, 4, 16)
    assert logits_indices.tolist() == [0, 1, 2]


def test_empty_batch_padded_to_capture_size() -> None:
    """Graph capture fills every row with padding."""
    b = _buffers()
    _, _, logits_indices, md = b.prepare([], [], [], [], pad_to=8)
    assert md.seq_lens.tolist() == [1] * 8
    assert md.num_decodes == 8 and logits_indices.numel() == 0


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(4096)[-1] == 512
