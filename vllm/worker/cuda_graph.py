"""CUDA graphs for decode batches.

A decode step launches a few hundred small kernels; at small batch sizes the
launches, not the GPU, set the pace. A CUDA graph records one forward pass per
batch size and replays it with a single launch. The graphs read their inputs from
the model runner's persistent device buffers (``InputBuffers``), so a step only
refills those buffers and replays: a batch of ``n`` decodes runs in the graph of
the smallest captured size >= n, with padding rows that write to a cache block
no sequence owns.

Graphs are captured once, after the KV cache exists, largest first so that the
smaller ones reuse the largest one's memory pool. Each graph is captured with
``max_seq_len`` = the capture limit (``max_seq_len_to_capture``, at most
``max_model_len``): kernels size their grids by it, and a batch holding a longer
sequence runs eagerly.
"""
import time
from typing import Any

import torch

from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.worker.input_buffers import InputBuffers

logger = init_logger(__name__)

# vLLM's sizes: 1, 2, 4, then every multiple of 8, up to this many sequences.
MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes to capture for at most ``max_num_seqs`` sequences."""
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    candidates = [1, 2, 4, *range(8, MAX_CAPTURE_SIZE + 1, 8)]
    # Every size below the limit, and the first one that reaches it.
    first_at_limit = next(s for s in candidates if s >= limit)
    return [s for s in candidates if s < limit] + [first_at_limit]


class CUDAGraphRunner:
    """Captured forward passes of the model, one per decode batch size."""

    def __init__(self, model: Any, buffers: InputBuffers, sizes: list[int],
                 max_seq_len: int) -> None:
        self.model = model
        self.buffers = buffers
        self.sizes = sorted(sizes)
        self.max_seq_len = max_seq_len
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def padded_size(self, num_seqs: int, max_seq_len: int) -> int | None:
        """The captured size a decode batch runs in, or None (run eagerly)."""
        if max_seq_len > self.max_seq_len or num_seqs > self.sizes[-1]:
            return None
        return next(s for s in self.sizes if s >= num_seqs)

    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        b = self.buffers
        # The buffers hold a valid one-token batch in every row (pad rows).
        b.prepare([], [], [], [], pad_to=self.sizes[-1])
        for size in reversed(self.sizes):
            metadata = b.graph_metadata(size, self.max_seq_len)
            input_ids = b.input_ids.device[:size]
            positions = b.positions.device[:size]
            # A warm-up pass outside the graph: lazy initialisation and
            # kernel compilation must not be recorded, and linear layers
            # time GEMV vs cuBLAS for 1..4 rows here (gemv_tuning.py).
            with set_forward_context(metadata):
                self.model(input_ids, positions)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph,
                                  pool=pool), set_forward_context(metadata):
                output = self.model(input_ids, positions)
            self._graphs[size] = (graph, output)
        torch.cuda.synchronize()
        logger.info("Captured %d CUDA graphs (batch sizes %d..%d) in %.1f s",
                    len(self.sizes), self.sizes[0], self.sizes[-1],
                    time.perf_counter() - start)

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of ``size``; its inputs must already be in the
        buffers. Returns the hidden states of all ``size`` rows."""
        graph, output = self._graphs[size]
        graph.replay()
        return output
