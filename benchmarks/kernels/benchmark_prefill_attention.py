"""Micro-benchmark of the Triton paged prefill attention kernel against
torch's flash attention (``F.scaled_dot_product_attention``).

    python benchmarks/kernels/benchmark_prefill_attention.py
    python benchmarks/kernels/benchmark_prefill_attention.py --block-size 32

Qwen3-0.6B's attention shape (16 query heads, 8 kv heads, head dim 128,
bf16), two W1-like cases:

- ``prompts``: 8 fresh prompts of 1024 tokens (causal, no cached context);
- ``chunk``: one chunk of 512 tokens after 3000 cached tokens (chunked
  prefill; each query sees the whole context plus the chunk up to itself).

The Triton kernel reads K/V through block tables from a paged cache whose
blocks are shuffled; torch gets the same values as contiguous
``[B, heads, len, D]`` tensors, with the flash backend forced
(``enable_gqa``; K/V are expanded to 16 heads only if this torch's flash
cannot take them grouped) and lower-right causal alignment for the chunk.
Times are the median of ``triton.testing.do_bench``; TFLOP/s counts
``4 * D * H`` per visible (query, key) pair (QK^T and PV, causal half only);
``triton/torch`` is the ratio of the times (below 1: Triton is faster);
``rel err`` compares the two outputs.
"""
import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_HEADS = 16
NUM_KV_HEADS = 8
HEAD_SIZE = 128


@dataclass
class Case:
    name: str
    num_seqs: int
    context_len: int
    query_len: int

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len

    def flops(self) -> float:
        # Query i sees context_len + i + 1 keys.
        pairs = self.num_seqs * (self.query_len * self.context_len +
                                 self.query_len * (self.query_len + 1) // 2)
        return 4.0 * HEAD_SIZE * NUM_HEADS * pairs


CASES = [
    Case("prompts 8 x 1024", num_seqs=8, context_len=0, query_len=1024),
    Case("chunk 512 after 3000", num_seqs=1, context_len=3000, query_len=512),
]


@dataclass
class Inputs:
    # the paged layout (Triton)
    query: torch.Tensor  # [T, H, D]
    kv_cache: torch.Tensor  # [2, N, block_size, Hkv, D]
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    # the same values, contiguous (torch)
    q: torch.Tensor  # [B, H, query_len, D]
    k: torch.Tensor  # [B, Hkv, seq_len, D]
    v: torch.Tensor


def make_inputs(case: Case, block_size: int, dtype: torch.dtype) -> Inputs:
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, lq, lk = case.num_seqs, case.query_len, case.seq_len
    blocks_per_seq = math.ceil(lk / block_size)
    num_blocks = b * blocks_per_seq
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    block_tables = perm.view(b, blocks_per_seq).to(torch.int32)

    k = torch.randn(b,
                    NUM_KV_HEADS,
                    lk,
                    HEAD_SIZE,
                    device="cuda",
                    generator=gen).to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(b, NUM_HEADS, lq, HEAD_SIZE, device="cuda",
                    generator=gen).to(dtype)

    kv_cache = torch.zeros(2,
                           num_blocks,
                           block_size,
                           NUM_KV_HEADS,
                           HEAD_SIZE,
                           device="cuda",
                           dtype=dtype)
    pos = torch.arange(lk, device="cuda")
    for seq in range(b):
        blocks = block_tables[seq, pos // block_size].long()
        kv_cache[0, blocks, pos % block_size] = k[seq].transpose(0, 1)
        kv_cache[1, blocks, pos % block_size] = v[seq].transpose(0, 1)
    query = q.transpose(1, 2).reshape(b * lq, NUM_HEADS, HEAD_SIZE)
    query_start_loc = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32)
    seq_lens = torch.full((b, ), lk, dtype=torch.int32)
    return Inputs(query=query.contiguous(),
                  kv_cache=kv_cache,
                  block_tables=block_tables,
                  query_start_loc=query_start_loc.cuda(),
                  seq_lens=seq_lens.cuda(),
                  q=q,
                  k=k,
                  v=v)


def torch_flash(case: Case,
                x: Inputs) -> tuple[Callable[[], torch.Tensor], str]:
    """A closure running torch's flash attention on ``x``, and a note."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    scale = HEAD_SIZE**-0.5
    causal: dict
    if case.context_len == 0:
        causal = {"is_causal": True}
    else:  # aligned to the lower right: the last query sees every key
        mask = causal_lower_right(case.query_len, case.seq_len)
        causal = {"attn_mask": mask}

    def grouped() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x.q,
                                                  x.k,
                                                  x.v,
                                                  scale=scale,
                                                  enable_gqa=True,
                                                  **causal)

    try:
        grouped()
        return grouped, "flash, GQA"
    except RuntimeError:  # this torch's flash cannot take grouped K/V
        pass
    group = NUM_HEADS // NUM_KV_HEADS
    k, v = x.k.repeat_interleave(group, 1), x.v.repeat_interleave(group, 1)

    def expanded() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x.q,
                                                  k,
                                                  v,
                                                  scale=scale,
                                                  **causal)

    expanded()
    return expanded, f"flash, K/V expanded to {NUM_HEADS} heads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype",
                        choices=["bfloat16", "float16"],
                        default="bfloat16")
    parser.add_argument("--rep",
                        type=int,
                        default=200,
                        help="do_bench's repetition time (ms)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("benchmark_prefill_attention.py needs a CUDA GPU "
                 "(torch.cuda.is_available() is False).")
    try:
        import triton
        import triton.testing
    except ImportError:
        sys.exit("benchmark_prefill_attention.py needs triton "
                 "(pip install triton).")
    from vllm.attention.ops.triton_prefill_attention import (
        paged_prefill_attention)

    dtype = getattr(torch, args.dtype)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__},"
          f" triton {triton.__version__}; H={NUM_HEADS} Hkv={NUM_KV_HEADS} "
          f"D={HEAD_SIZE} {args.dtype}, cache block size {args.block_size}")
    print(f"{'case':22} {'triton ms':>10} {'TFLOP/s':>8} {'torch ms':>9} "
          f"{'TFLOP/s':>8} {'triton/torch':>12} {'rel err':>8}  torch")
    for case in CASES:
        x = make_inputs(case, args.block_size, dtype)
        out = torch.empty_like(x.query)

        def triton_run(x: Inputs = x,
                       out: torch.Tensor = out,
                       case: Case = case) -> None:
            paged_prefill_attention(out, x.query, x.kv_cache[0], x.kv_cache[1],
                                    x.block_tables, x.query_start_loc,
                                    x.seq_lens, case.query_len, HEAD_SIZE**-0.5)

        torch_run, note = torch_flash(case, x)
        triton_run()
        ref = torch_run().transpose(1, 2).reshape(out.shape)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

        ms_triton = triton.testing.do_bench(triton_run,
                                            rep=args.rep,
                                            return_mode="median")
        ms_torch = triton.testing.do_bench(torch_run,
                                           rep=args.rep,
                                           return_mode="median")
        tflops = case.flops() * 1e-12
        print(f"{case.name:22} {ms_triton:10.3f} "
              f"{tflops / (ms_triton * 1e-3):8.1f} {ms_torch:9.3f} "
              f"{tflops / (ms_torch * 1e-3):8.1f} "
              f"{ms_triton / ms_torch:12.2f} {err:8.1e}  {note}")


if __name__ == "__main__":
    main()
