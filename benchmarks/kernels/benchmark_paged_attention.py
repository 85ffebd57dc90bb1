"""Micro-benchmark of the decode attention kernel ``paged_attention_decode``
(csrc/attention/) against the torch reference backend's decode path
(``gather_context`` + ``scaled_dot_product_attention`` with a length mask,
as ``TorchSDPAImpl`` runs it).

    python benchmarks/kernels/benchmark_paged_attention.py
    python benchmarks/kernels/benchmark_paged_attention.py --dtype float16 \\
        --block-size 32 --repeats 200

Cases (bf16 by default, block size 16, blocks shuffled in the cache):
  * Qwen3-0.6B heads (16 query / 8 kv / 128), batch 256, contexts uniform in
    [900, 1100];
  * the same batch with max_seq_len = 4096, as under CUDA graphs where it
    is max_model_len (most partitions of the grid then exit at once);
  * Llama-3-8B heads (32 / 8 / 128), batch 1, context 4096.

Each op is timed with CUDA events around single calls, after warm-up
calls; the L2 cache is flushed (a 256 MiB write) before every timed call so
that the KV cache comes from HBM (``--no-flush`` to keep it warm). The
table shows the median over the repeats and the achieved bandwidth of the
KV bytes read (sum of seq_lens * Hkv * D * 2 (K and V) * element size).
The kernel's output is checked against the reference (relative error).
Needs a CUDA GPU and vllm._C (pip install --no-build-isolation -e .).
"""
import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kernel_bench_utils import require_kernels, time_op

from vllm import _custom_ops as ops
from vllm.attention.backends.torch_sdpa import gather_context


@dataclass
class Case:
    name: str
    batch: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    min_len: int
    max_len: int
    max_seq_len: int | None = None  # default: max(seq_lens)


CASES = [
    Case("Qwen3-0.6B, batch 256, ctx ~1000", 256, 16, 8, 128, 900, 1100),
    Case("  same, max_seq_len=4096 (graphs)", 256, 16, 8, 128, 900, 1100, 4096),
    Case("Llama-3-8B, batch 1, ctx 4096", 1, 32, 8, 128, 4096, 4096),
]


def run_case(case: Case, dtype: torch.dtype, block_size: int, warmup: int,
             repeats: int, flush: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(case.min_len,
                             case.max_len + 1, (case.batch, ),
                             generator=gen)
    blocks_per_seq = (seq_lens + block_size - 1) // block_size
    max_blocks = int(blocks_per_seq.max())
    num_blocks = int(blocks_per_seq.sum()) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(case.batch, max_blocks, dtype=torch.int32)
    start = 0
    for b, n in enumerate(blocks_per_seq.tolist()):
        tables[b, :n] = perm[start:start + n]
        start += n
    kv_cache = torch.randn(2,
                           num_blocks,
                           block_size,
                           case.num_kv_heads,
                           case.head_size,
                           dtype=dtype,
                           device="cuda")
    block_tables = tables.cuda()
    lens = seq_lens.to(torch.int32).cuda()
    query = torch.randn(case.batch,
                        case.num_heads,
                        case.head_size,
                        dtype=dtype,
                        device="cuda")
    out = torch.empty_like(query)
    scale = case.head_size**-0.5
    max_len = int(seq_lens.max())
    max_seq_len = case.max_seq_len or max_len

    def kernel() -> None:
        ops.paged_attention_decode(out, query, kv_cache[0], kv_cache[1],
                                   block_tables, lens, scale, max_seq_len)

    def reference() -> torch.Tensor:
        k = gather_context(kv_cache[0], block_tables, max_len)
        v = gather_context(kv_cache[1], block_tables, max_len)
        positions = torch.arange(max_len, device="cuda", dtype=torch.int32)
        mask = positions[None, :] < lens[:, None]
        return F.scaled_dot_product_attention(query.unsqueeze(2),
                                              k,
                                              v,
                                              attn_mask=mask[:, None, None, :],
                                              scale=scale,
                                              enable_gqa=True).squeeze(2)

    kernel()
    ref = reference()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    kernel_us = time_op(kernel, warmup, repeats, flush)
    ref_us = time_op(reference, warmup, repeats, flush)
    kv_bytes = (int(seq_lens.sum()) * case.num_kv_heads * case.head_size * 2 *
                kv_cache.element_size())
    return {
        "kernel_us": kernel_us,
        "kernel_gbps": kv_bytes / kernel_us / 1e3,
        "torch_us": ref_us,
        "speedup": ref_us / kernel_us,
        "rel_err": err,
        "kv_mb": kv_bytes / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype",
                        choices=["bfloat16", "float16", "float32"],
                        default="bfloat16")
    parser.add_argument("--block-size",
                        type=int,
                        choices=[8, 16, 32],
                        default=16)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--no-flush",
                        action="store_true",
                        help="do not flush L2 before each timed call")
    args = parser.parse_args()
    require_kernels("benchmark_paged_attention")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{args.dtype}, block size {args.block_size}, median of "
          f"{args.repeats} after {args.warmup} warm-up calls, L2 "
          f"{'kept warm' if args.no_flush else 'flushed'}")
    header = (f"{'case':<36} {'KV MB':>8} {'kernel us':>10} {'GB/s':>8} "
              f"{'torch us':>10} {'speedup':>8} {'rel err':>9}")
    print(header)
    print("-" * len(header))
    for case in CASES:
        r = run_case(case, dtype, args.block_size, args.warmup, args.repeats,
                     not args.no_flush)
        print(f"{case.name:<36} {r['kv_mb']:>8.1f} {r['kernel_us']:>10.1f} "
              f"{r['kernel_gbps']:>8.0f} {r['torch_us']:>10.1f} "
              f"{r['speedup']:>7.1f}x {r['rel_err']:>9.1e}")


if __name__ == "__main__":
    main()
