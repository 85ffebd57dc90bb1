"""Step 2a: PagedAttention made visible on stories260K.

    python my_debug_scripts/step2_paged_attention.py
    python my_debug_scripts/step2_paged_attention.py --block-size 8 --layer 2

What it shows, with engine internals reached through their real attributes:

1. The KV cache: one tensor per layer,
   ``llm.llm_engine.executor.worker.cache_engine.kv_caches[layer]`` of shape
   [2 (K/V), num_blocks + 1, block_size, num_kv_heads, head_size]
   (``AttentionBackend.get_kv_cache_shape``; the extra block is the padding
   block of CUDA graphs).
2. Block tables: each ``Sequence.block_table`` lists the physical blocks
   that hold its tokens, handed out by
   ``llm.llm_engine.scheduler.block_manager`` (``BlockManager``); reference
   counts come from its ``allocator`` (``BlockAllocator.ref_count``). A
   request with ``n=2`` shows blocks shared after the fork and the
   copy-on-write of the partly filled last block.
3. The slot mapping of a step: where each new token's K/V is written,
   ``slot = block_table[pos // block_size] * block_size + pos % block_size``.
4. A check: one query of one layer is attended again by hand, once over K/V
   gathered from the paged cache through the block table and once over the
   same sequence's K/V collected densely step by step; both must match the
   engine's output (the check prints "paged vs dense attention: OK").

Breakpoints worth setting while this runs:
vllm/attention/backends/torch_sdpa.py::TorchSDPAImpl.forward (write_to_paged_cache,
gather_context), vllm/worker/input_buffers.py::InputBuffers.prepare (slot
mapping), vllm/core/block_manager.py::BlockManager.append_slots / fork.
"""
import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / \
    "models" / "stories260K"


@dataclass
class LayerCall:
    """What one attention layer saw in one step (copies: the runner reuses
    its input buffers every step)."""
    query: torch.Tensor  # [T, H * D]
    key: torch.Tensor  # [T, Hkv * D]
    value: torch.Tensor  # [T, Hkv * D]
    output: torch.Tensor  # [T, H * D]
    query_start_loc: torch.Tensor  # [B + 1]
    seq_lens: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [T]
    num_decodes: int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--block-size",
                        type=int,
                        default=8,
                        choices=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=8)
    return parser.parse_args(argv)


def record_layer_calls(attn_layer: torch.nn.Module,
                       calls: list[LayerCall]) -> None:
    """Append a LayerCall each time ``attn_layer`` (an ``Attention``) runs."""
    from vllm.forward_context import get_forward_context

    def hook(module: torch.nn.Module, args: tuple[Any, ...],
             output: torch.Tensor) -> None:
        query, key, value = args
        # The batch layout comes from the forward context, as in
        # Attention.forward (vllm/attention/layer.py).
        m = get_forward_context().attn_metadata
        calls.append(
            LayerCall(query.clone(), key.clone(), value.clone(), output.clone(),
                      m.query_start_loc.clone(), m.seq_lens.clone(),
                      m.slot_mapping.clone(), m.num_decodes))

    attn_layer.register_forward_hook(hook)


def runner_order(scheduled: list[Any]) -> list[Any]:
    """The rows of the flattened batch: ModelRunner.execute_model puts the
    decodes (one new token) first, keeping the order otherwise."""
    return sorted(scheduled, key=lambda s: len(s.token_ids) > 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float) -> torch.Tensor:
    """One query over a whole context, by hand.

    q [H, D], k/v [L, Hkv, D] -> [H, D]; each group of H / Hkv query heads
    reads one KV head (grouped-query attention)."""
    group = q.shape[0] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [L, H, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * scale  # [H, L]
    return torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), v)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from vllm import LLM, SamplingParams

    # A small block size makes the blocks easy to see; async_scheduling=False
    # makes one LLMEngine.step() one batch; a short max_model_len keeps the
    # cache small (max_num_seqs full-length sequences).
    llm = LLM(model=args.model,
              block_size=args.block_size,
              max_model_len=64,
              max_num_seqs=4,
              async_scheduling=False)
    engine = llm.llm_engine
    worker = engine.executor.worker
    cache_engine = worker.cache_engine
    block_manager = engine.scheduler.block_manager
    layers = worker.model_runner.attention_layers()
    attn = layers[args.layer]
    bs = args.block_size
    assert cache_engine is not None

    # ---- 1. the KV cache tensors
    kv = cache_engine.kv_caches[args.layer]
    print("== KV cache")
    print(f"attention backend: {attn.backend.name}; {len(layers)} layers, "
          f"one cache tensor each")
    print(f"kv_caches[{args.layer}].shape = {tuple(kv.shape)}  "
          "# [K/V, num_blocks + 1 (padding block), block_size, "
          "num_kv_heads, head_size]")
    print(f"heads: {attn.num_heads} query, {attn.num_kv_heads} KV, "
          f"head_size {attn.head_size}; blocks handed out by the block "
          f"manager: {block_manager.num_total_gpu_blocks}")

    # ---- 2. two requests, stepped one batch at a time
    calls: list[LayerCall] = []
    record_layer_calls(attn, calls)
    scheduled_per_step: list[list[Any]] = []
    copies_per_step: list[list[tuple[int, int]]] = []
    execute_model = engine.executor.execute_model

    def recording_execute_model(scheduled: list[Any], *rest: Any) -> Any:
        # Wraps UniProcExecutor.execute_model to see each step's batch and
        # its copy-on-write copies (rest = swap out, swap in, copies).
        scheduled_per_step.append(list(scheduled))
        copies_per_step.append(list(rest[2] or []))
        return execute_model(scheduled, *rest)

    engine.executor.execute_model = recording_execute_model  # type: ignore

    greedy = SamplingParams(temperature=0.0,
                            max_tokens=args.max_tokens,
                            ignore_eos=True)
    # n=2: the two samples share the prompt's blocks after the fork.
    two_samples = SamplingParams(n=2,
                                 temperature=1.0,
                                 seed=1,
                                 max_tokens=args.max_tokens,
                                 ignore_eos=True)
    engine.add_request("A", "Once upon a time there was a little girl", greedy)
    engine.add_request("B", "The little dog ran to the park", two_samples)
    groups = {rid: engine.seq_groups[rid] for rid in ("A", "B")}
    seq_a = groups["A"].seqs[0]
    owner = {s.seq_id: rid for rid, g in groups.items() for s in g.seqs}

    # The dense copy of A's keys/values: row p holds position p.
    dense_k: list[torch.Tensor] = []
    dense_v: list[torch.Tensor] = []
    checked = False
    step = 0
    print("\n== steps (block tables after each step; ref counts in "
          "brackets)")
    print("   B has n=2: until the fork only its leader (the first sequence)"
          " runs; after it\n   both samples hold the prompt's blocks (ref "
          "count 2), and the shared, partly\n   filled last block is copied "
          "before the first write into it (copy-on-write).")
    while engine.has_unfinished_requests():
        step += 1
        engine.step()
        call = calls[-1]
        scheduled = runner_order(scheduled_per_step[-1])
        print(f"-- step {step}: " + ", ".join(
            f"{owner[s.seq_id]}/seq{s.seq_id} +{len(s.token_ids)} tok "
            f"(from pos {s.num_computed_tokens})" for s in scheduled))
        if copies_per_step[-1]:
            print(f"   copy-on-write (src block, dst block): "
                  f"{copies_per_step[-1]}")
        for rid, group in groups.items():
            for seq in group.seqs:
                table = " ".join(f"{b}[{block_manager.allocator.ref_count(b)}]"
                                 for b in seq.block_table)
                state = seq.status.name.lower()
                print(f"   {rid}/seq{seq.seq_id} ({state}, "
                      f"{seq.num_computed_tokens} computed): "
                      f"[{table}]")

        # Keys/values of sequence A in this step, appended in order.
        rows = [i for i, s in enumerate(scheduled) if s.seq_id == seq_a.seq_id]
        if not rows:
            continue
        row = rows[0]
        start = int(call.query_start_loc[row])
        end = int(call.query_start_loc[row + 1])
        hkv, d = attn.num_kv_heads, attn.head_size
        dense_k.append(call.key[start:end].view(-1, hkv, d))
        dense_v.append(call.value[start:end].view(-1, hkv, d))

        # ---- 3. slot mapping of this step, for sequence A
        sched_a = scheduled[row]
        positions = range(sched_a.num_computed_tokens,
                          sched_a.num_computed_tokens + end - start)
        slots = call.slot_mapping[start:end].tolist()
        expected = [
            sched_a.block_table[p // bs] * bs + p % bs for p in positions
        ]
        assert slots == expected, (slots, expected)
        if step <= 2:
            print(f"   slot mapping of A (position -> slot = block * "
                  f"{bs} + offset): " +
                  ", ".join(f"{p}->{s}" for p, s in zip(positions, slots)))
            print(f"   whole step: slot_mapping = {call.slot_mapping.tolist()}"
                  f"; seq_lens = {call.seq_lens.tolist()}; "
                  f"query_start_loc = {call.query_start_loc.tolist()}")

        # ---- 4. the check, on A's first decode step (one new token)
        if checked or end - start != 1:
            continue
        checked = True
        seq_len = int(call.seq_lens[row])
        block_ids = torch.tensor(sched_a.block_table)
        # Gather through the block table: [num_blocks_of_A, bs, Hkv, D]
        # flattened to token order, cut at the sequence length.
        paged_k = kv[0][block_ids].reshape(-1, hkv, d)[:seq_len]
        paged_v = kv[1][block_ids].reshape(-1, hkv, d)[:seq_len]
        k_all = torch.cat(dense_k)
        v_all = torch.cat(dense_v)
        q = call.query[start].view(attn.num_heads, d)
        scale = attn.impl.scale
        by_paged = attend(q, paged_k, paged_v, scale)
        by_dense = attend(q, k_all, v_all, scale)
        engine_out = call.output[start].view(attn.num_heads, d)
        print(f"\n== check, layer {args.layer}, request A's query at "
              f"position {seq_len - 1} over {seq_len} keys in blocks "
              f"{sched_a.block_table}")
        print(f"   K gathered from the paged cache == dense K: "
              f"{torch.equal(paged_k, k_all)}; same for V: "
              f"{torch.equal(paged_v, v_all)}")
        err_paged = (by_paged - engine_out).abs().max().item()
        err_dense = (by_dense - engine_out).abs().max().item()
        print(f"   max |by hand over paged K/V - engine| = {err_paged:.2e}; "
              f"max |dense - engine| = {err_dense:.2e}")
        ok = (torch.equal(paged_k, k_all) and torch.equal(paged_v, v_all)
              and torch.allclose(by_paged, engine_out, atol=1e-5)
              and torch.allclose(by_dense, engine_out, atol=1e-5))
        if not ok:
            raise SystemExit("paged vs dense attention: MISMATCH")
        print("   paged vs dense attention: OK\n")

    if not checked:
        raise SystemExit("request A never ran a decode step to check")
    print(f"\nfree blocks after all requests finished: "
          f"{block_manager.get_num_free_gpu_blocks()} of "
          f"{block_manager.num_total_gpu_blocks}")
    for rid, group in groups.items():
        for seq in group.seqs:
            print(f"{rid}/seq{seq.seq_id}: {seq.output_text!r}")


if __name__ == "__main__":
    main()
