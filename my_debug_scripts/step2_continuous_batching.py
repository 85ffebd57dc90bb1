"""Step 2b: continuous batching, one LLMEngine.step() at a time.

    python my_debug_scripts/step2_continuous_batching.py
    python my_debug_scripts/step2_continuous_batching.py --num-blocks 40  # no preemption

The script builds an ``LLMEngine`` (vllm/engine/llm_engine.py) and calls
``add_request`` at different steps and ``step()`` in a loop. For every step
it prints what ``Scheduler.schedule`` (vllm/core/scheduler.py) put in the
batch:

- ``prefill`` rows compute prompt tokens; ``chunk a-b/P`` means chunked
  prefill: the prompt of P tokens did not fit in the step's token budget
  (``max_num_batched_tokens``) and is computed over several steps;
- ``decode`` rows compute the one token sampled in the previous step;
- ``recompute`` rows rebuild the KV cache of a preempted request;
- the number of tokens the step runs (the budget is shared by all rows);
- requests that finish, the blocks they free, and later requests that get
  those same blocks;
- preemptions: the KV cache is kept deliberately small
  (``num_gpu_blocks_override``) so that the most recently admitted request
  is evicted and recomputed later.

``async_scheduling=False`` (CONTRIBUTING.md, Debugging) makes one step() one
batch: with the default async scheduling the engine launches step N+1
before it processes step N's tokens.

Breakpoints: vllm/core/scheduler.py::Scheduler.schedule (and
_schedule_running, _schedule_prefills, _preempt),
vllm/engine/llm_engine.py::LLMEngine.step,
vllm/core/block_manager.py::BlockManager.append_slots / free.
"""
import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / \
    "models" / "stories260K"

# (step before which the request is added, request id, prompt, max_tokens)
ARRIVALS = [
    (1, "r0", "Once upon a time", 12),
    (1, "r1", "The little dog", 6),
    (3, "r2", "Lily wanted to play with her friends in the big park", 8),
    (5, "r3", "One day, a boy named Tim found a shiny red ball", 10),
    (9, "r4", "The sun was hot", 5),
]


@dataclass
class Row:
    """One request in one step's batch, as the scheduler chose it."""
    request_id: str
    num_computed: int  # tokens in the KV cache before the step
    chunk: int  # tokens computed in this step
    num_prompt: int
    num_tokens: int  # prompt + output tokens so far
    blocks: list[int]  # the block table the step uses

    def describe(self) -> str:
        if self.num_computed >= self.num_tokens - 1 and self.chunk == 1 and \
                self.num_tokens > self.num_prompt:
            return f"{self.request_id}: decode (pos {self.num_computed})"
        end = self.num_computed + self.chunk
        kind = ("recompute" if self.num_tokens > self.num_prompt else "prefill")
        if self.num_computed > 0 or end < self.num_tokens:
            return (f"{self.request_id}: {kind} chunk {self.num_computed}-"
                    f"{end}/{self.num_tokens}")
        return f"{self.request_id}: {kind} {self.chunk} tokens"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--num-blocks",
                        type=int,
                        default=8,
                        help="KV-cache blocks (num_gpu_blocks_override); "
                        "small enough to force a preemption")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from vllm import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine.from_engine_args(
        EngineArgs(
            model=args.model,
            block_size=8,
            max_model_len=64,  # 8 blocks of 8: the smallest cache allowed
            max_num_seqs=4,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_chunked_prefill=True,
            num_gpu_blocks_override=args.num_blocks,
            async_scheduling=False,
            disable_log_stats=True))
    scheduler = engine.scheduler
    block_manager = scheduler.block_manager
    print(f"KV cache: {block_manager.num_total_gpu_blocks} blocks of "
          f"{block_manager.block_size} tokens; token budget per step: "
          f"{args.max_num_batched_tokens}; at most 4 sequences per step")

    # Wrap Scheduler.schedule on this instance to see each step's batch
    # before the engine runs it (the sequences' state changes afterwards).
    rows: list[Row] = []
    schedule = scheduler.schedule

    def recording_schedule() -> Any:
        out = schedule()
        rows.clear()
        for sg in out.scheduled_seq_groups:
            seq = sg.seq_group.get_unfinished_seqs()[0]
            rows.append(
                Row(sg.seq_group.request_id, seq.num_computed_tokens,
                    sg.token_chunk_size, seq.num_prompt_tokens, seq.num_tokens,
                    list(seq.block_table)))
        return out

    scheduler.schedule = recording_schedule  # type: ignore[method-assign]

    pending = list(ARRIVALS)
    freed: dict[int, str] = {}  # block -> request that freed it
    tables: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        step += 1
        while pending and pending[0][0] <= step:
            _, rid, prompt, max_tokens = pending.pop(0)
            engine.add_request(
                rid, prompt,
                SamplingParams(temperature=0.0,
                               max_tokens=max_tokens,
                               ignore_eos=True))
            print(f"step {step}: + add_request({rid!r}, {prompt!r}, "
                  f"max_tokens={max_tokens})")
        preempted_before = scheduler.num_cumulative_preemption
        outputs = engine.step()
        preempted = scheduler.num_cumulative_preemption - preempted_before
        num_tokens = sum(r.chunk for r in rows)
        kinds = {r.describe().split(": ")[1].split()[0] for r in rows}
        mixed = " MIXED" if len(kinds) > 1 else ""
        print(f"step {step}: {len(rows)} request(s), {num_tokens} tokens"
              f"{mixed} | " + "; ".join(r.describe() for r in rows))
        if preempted:
            print(f"   preempted {preempted} request(s): KV cache full; "
                  f"waiting again: "
                  f"{[g.request_id for g in scheduler.waiting]}")
            for group in scheduler.waiting:
                # Recompute: its blocks were freed, its tokens are kept.
                for b in tables.pop(group.request_id, []):
                    freed[b] = f"{group.request_id} (preempted)"
        for r in rows:
            reused = [b for b in r.blocks if b in freed]
            if reused:
                origins = sorted({freed.pop(b) for b in reused})
                print(f"   {r.request_id} reuses blocks {reused} freed by "
                      f"{', '.join(origins)}")
            tables[r.request_id] = r.blocks
        for out in outputs:
            if out.finished:
                blocks = tables.get(out.request_id, [])
                for b in blocks:
                    freed[b] = out.request_id
                texts[out.request_id] = out.outputs[0].text
                print(f"   {out.request_id} finished "
                      f"({out.outputs[0].finish_reason}); blocks {blocks} "
                      f"back to the free list")
        print(f"   free blocks: {block_manager.get_num_free_gpu_blocks()}"
              f"/{block_manager.num_total_gpu_blocks}; waiting "
              f"{len(scheduler.waiting)}, running {len(scheduler.running)}")
    print(f"\n{step} steps, {scheduler.num_cumulative_preemption} "
          f"preemption(s)")
    for rid in sorted(texts):
        print(f"{rid}: {texts[rid]!r}")


if __name__ == "__main__":
    main()
