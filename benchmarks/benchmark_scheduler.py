"""Simulate the scheduler and KV-cache allocator on a synthetic workload (no model).

A fake runner drives ``vllm.core.scheduler.Scheduler`` the way ``LLMEngine``
does, with the model replaced by a fake sampler: every scheduled sequence's
``num_computed_tokens`` advances by its chunk, a sequence that reaches its
known length gets a new (fake) token, and it finishes when it reaches its
output length drawn in advance. That length is hidden from the engine, as in
reality: a request asks for ``max_tokens`` (the cap, 1024 by default) and stops
earlier by "EOS" (``FINISHED_STOPPED``) or at the cap
(``FINISHED_LENGTH_CAPPED``).

It compares block managers under a tight KV budget:

- ``plain``: ``BlockManager`` admits a request when its prompt fits;
- ``smart``: ``SmartBlockAllocator`` admits it when its predicted total length
  fits, the prediction coming from ``OutputLengthPredictor`` trained online on
  the requests that finished before.

Workload (every number is a flag): ``--num-requests`` requests arrive as a
Poisson process (``--arrival-rate`` per step); prompt and output lengths are
log-normal (medians 200 and 150 tokens, the outputs heavy-tailed) and the KV
cache holds ``--kv-fraction`` (1/4) of the blocks the requests would hold
together if nothing held them back (``--num-blocks`` sets it directly).

Metrics, per allocator: steps to finish everything, preemptions, recomputed
tokens (tokens computed again after a preemption), latency from arrival to
the last token and to the first token (in steps; mean and p99), throughput
(tokens per step) and the mean KV-cache usage. Time is counted in scheduler
steps: the cost of a step does not depend on its batch here.

    python benchmarks/benchmark_scheduler.py                 # plain and smart
    python benchmarks/benchmark_scheduler.py --allocator plain --num-requests 500
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vllm.config import SchedulerConfig
from vllm.core.block_manager import (SMART_QUANTILE, BlockManager,
                                     SmartBlockAllocator, cdiv)
from vllm.core.length_predictor import OutputLengthPredictor
from vllm.core.scheduler import Scheduler
from vllm.sampling_params import SamplingParams
from vllm.sequence import Sequence, SequenceGroup, SequenceStatus

ALLOCATORS = ("plain", "smart")
# Prompt token ids are drawn below this.
_VOCAB = 10_000
# The token every fake sampling step produces.
_FAKE_TOKEN = 1
# A scheduler that schedules nothing this many steps in a row while work is
# waiting is stuck.
_MAX_IDLE_STEPS = 1000


@dataclass
class SimRequest:
    request_id: str
    arrival_step: int
    prompt_len: int
    # What the request asks for: the cap, the engine sees only this.
    max_tokens: int
    # Tokens it will generate (hidden from the engine): min(drawn, max_tokens).
    output_len: int

    @property
    def stops_by_eos(self) -> bool:
        return self.output_len < self.max_tokens


def make_workload(args: argparse.Namespace) -> list[SimRequest]:
    """Poisson arrivals, log-normal prompt and output lengths, seeded."""
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    arrivals = np.floor(np.cumsum(rng.exponential(1 / args.arrival_rate, n)))
    max_prompt = args.max_model_len - args.max_tokens
    prompts = np.clip(
        np.rint(
            rng.lognormal(math.log(args.prompt_median), args.prompt_sigma, n)),
        1, max_prompt)
    outputs = np.clip(
        np.rint(
            rng.lognormal(math.log(args.output_median), args.output_sigma, n)),
        1, args.max_tokens)
    return [
        SimRequest(f"req-{i}", int(arrivals[i]), int(prompts[i]),
                   args.max_tokens, int(outputs[i])) for i in range(n)
    ]


def kv_demand_blocks(workload: list[SimRequest], block_size: int) -> float:
    """Blocks the requests hold on average if each runs, unhindered, from its
    arrival: a request of prompt p holds p + k tokens during its k-th decode
    step (Little's law over the span of the arrivals)."""
    token_steps = sum(r.prompt_len * r.output_len + r.output_len *
                      (r.output_len + 1) / 2 for r in workload)
    span = max(workload[-1].arrival_step + 1, 1)
    return token_steps / span / block_size


def choose_num_blocks(args: argparse.Namespace,
                      workload: list[SimRequest]) -> int:
    """``--num-blocks``, or ``--kv-fraction`` of the demand; never fewer than
    the longest request needs (it would never finish)."""
    longest = max(r.prompt_len + r.output_len for r in workload)
    # headroom for the 1% admission watermark of the block managers
    minimum = math.ceil((cdiv(longest, args.block_size) + 1) / 0.99) + 1
    if args.num_blocks is not None:
        if args.num_blocks < minimum:
            raise ValueError(f"--num-blocks {args.num_blocks} is smaller than "
                             f"the longest request needs ({minimum}).")
        return args.num_blocks
    demand = kv_demand_blocks(workload, args.block_size)
    return max(math.ceil(args.kv_fraction * demand), minimum)


def make_block_manager(allocator: str, args: argparse.Namespace,
                       num_blocks: int) -> BlockManager:
    if allocator == "plain":
        return BlockManager(args.block_size, num_blocks)
    predictor = OutputLengthPredictor(quantile=args.predictor_quantile)
    return SmartBlockAllocator(args.block_size, num_blocks, predictor=predictor)


@dataclass
class SimResult:
    allocator: str
    num_blocks: int
    num_requests: int
    num_finished: int
    num_ignored: int  # never fit the cache (should stay 0)
    num_stopped: int  # finished by "EOS"
    num_length_capped: int  # finished at max_tokens
    total_steps: int
    num_preemptions: int
    num_preempted_requests: int
    recomputed_tokens: int
    computed_tokens: int  # everything the fake model computed
    prompt_tokens: int
    output_tokens: int
    mean_latency_steps: float
    p50_latency_steps: float
    p99_latency_steps: float
    mean_ttft_steps: float
    p99_ttft_steps: float
    output_tokens_per_step: float
    tokens_per_step: float  # prompt + output tokens per step
    mean_running: float  # requests running per busy step
    mean_kv_usage: float  # fraction of the cache held, per busy step
    # smart only: requests with a prediction at their first admission, and
    # the fraction of those whose output did not exceed it
    predicted_requests: int
    prediction_coverage: float | None
    wall_time_s: float


def simulate(workload: list[SimRequest], allocator: str,
             args: argparse.Namespace, num_blocks: int) -> SimResult:
    """Run every request to completion; one loop iteration is one step."""
    start = time.perf_counter()
    config = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                             max_num_seqs=args.max_num_seqs,
                             max_model_len=args.max_model_len,
                             enable_chunked_prefill=True)
    bm = make_block_manager(allocator, args, num_blocks)
    predictor: OutputLengthPredictor | None = getattr(bm, "predictor", None)
    scheduler = Scheduler(config, bm)
    token_rng = np.random.default_rng(args.seed + 1)

    by_group: dict[str, SimRequest] = {}
    max_computed: dict[int, int] = {}  # seq_id -> most tokens ever computed
    first_token: dict[str, int] = {}
    finished_at: dict[str, int] = {}
    predictions: dict[str, int | None] = {}
    preempted: set[str] = set()
    ignored = 0
    recomputed = computed = 0
    busy_steps = running_sum = 0
    usage_sum = 0.0

    next_arrival = 0
    step = 0  # the step being simulated; its tokens exist at its end
    idle = 0
    n = len(workload)
    while len(finished_at) + ignored < n:
        while next_arrival < n and workload[next_arrival].arrival_step <= step:
            req = workload[next_arrival]
            seq = Sequence(
                next_arrival,
                token_rng.integers(0, _VOCAB, req.prompt_len).tolist())
            group = SequenceGroup(req.request_id, [seq],
                                  SamplingParams(max_tokens=req.max_tokens))
            by_group[req.request_id] = req
            max_computed[seq.seq_id] = 0
            scheduler.add_seq_group(group)
            next_arrival += 1
        if not scheduler.has_unfinished_seqs():
            step = workload[next_arrival].arrival_step  # idle until then
            continue

        out = scheduler.schedule()
        ignored += len(out.ignored_seq_groups)
        if out.is_empty:
            idle += 1
            if idle > _MAX_IDLE_STEPS:
                raise RuntimeError(
                    f"{allocator}: nothing scheduled for {idle} steps with "
                    f"{scheduler.get_num_unfinished_seq_groups()} requests "
                    "unfinished.")
        else:
            idle = 0
        busy_steps += 1
        running_sum += len(out.scheduled_seq_groups)
        usage_sum += bm.usage

        for sg in out.scheduled_seq_groups:
            group = sg.seq_group
            req = by_group[group.request_id]
            for seq in group.get_unfinished_seqs():
                if predictor and req.request_id not in predictions:
                    # first admission: what the allocator was told
                    predictions[req.request_id] = predictor.predict(
                        req.prompt_len, req.max_tokens)
                begin = seq.num_computed_tokens
                end = begin + sg.token_chunk_size
                if begin < max_computed[seq.seq_id]:
                    preempted.add(req.request_id)  # computed again
                recomputed += max(0, min(end, max_computed[seq.seq_id]) - begin)
                max_computed[seq.seq_id] = max(max_computed[seq.seq_id], end)
                computed += sg.token_chunk_size
                seq.num_computed_tokens = end
                if end < seq.num_tokens:
                    continue  # a prefill chunk short of the prompt's end
                seq.append_token(_FAKE_TOKEN, None)
                first_token.setdefault(req.request_id, step)
                if len(seq.output_token_ids) >= req.output_len:
                    seq.status = (SequenceStatus.FINISHED_STOPPED
                                  if req.stops_by_eos else
                                  SequenceStatus.FINISHED_LENGTH_CAPPED)
                    finished_at[req.request_id] = step
        scheduler.free_finished_seq_groups()
        step += 1

    done = [r for r in workload if r.request_id in finished_at]
    latency = np.array(
        [finished_at[r.request_id] - r.arrival_step + 1 for r in done])
    ttft = np.array(
        [first_token[r.request_id] - r.arrival_step + 1 for r in done])
    prompt_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    scored: list[tuple[SimRequest, int]] = []
    for r in done:
        guess = predictions.get(r.request_id)
        if guess is not None:
            scored.append((r, guess))
    coverage = (sum(r.output_len <= p
                    for r, p in scored) / len(scored) if scored else None)
    return SimResult(
        allocator=allocator,
        num_blocks=num_blocks,
        num_requests=n,
        num_finished=len(done),
        num_ignored=ignored,
        num_stopped=sum(r.stops_by_eos for r in done),
        num_length_capped=sum(not r.stops_by_eos for r in done),
        total_steps=step,
        num_preemptions=scheduler.num_cumulative_preemption,
        num_preempted_requests=len(preempted),
        recomputed_tokens=recomputed,
        computed_tokens=computed,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        mean_latency_steps=float(latency.mean()) if done else 0.0,
        p50_latency_steps=float(np.percentile(latency, 50)) if done else 0.0,
        p99_latency_steps=float(np.percentile(latency, 99)) if done else 0.0,
        mean_ttft_steps=float(ttft.mean()) if done else 0.0,
        p99_ttft_steps=float(np.percentile(ttft, 99)) if done else 0.0,
        output_tokens_per_step=output_tokens / max(step, 1),
        tokens_per_step=(prompt_tokens + output_tokens) / max(step, 1),
        mean_running=running_sum / max(busy_steps, 1),
        mean_kv_usage=usage_sum / max(busy_steps, 1),
        predicted_requests=len(scored),
        prediction_coverage=coverage,
        wall_time_s=time.perf_counter() - start)


# Rows of the printed table: (field, format).
_TABLE = (
    ("total_steps", "{:.0f}"),
    ("num_preemptions", "{:.0f}"),
    ("num_preempted_requests", "{:.0f}"),
    ("recomputed_tokens", "{:.0f}"),
    ("computed_tokens", "{:.0f}"),
    ("mean_latency_steps", "{:.1f}"),
    ("p50_latency_steps", "{:.1f}"),
    ("p99_latency_steps", "{:.1f}"),
    ("mean_ttft_steps", "{:.1f}"),
    ("p99_ttft_steps", "{:.1f}"),
    ("output_tokens_per_step", "{:.2f}"),
    ("tokens_per_step", "{:.2f}"),
    ("mean_running", "{:.1f}"),
    ("mean_kv_usage", "{:.3f}"),
    ("prediction_coverage", "{:.3f}"),
    ("wall_time_s", "{:.2f}"),
)
# Fields whose ratio smart/plain is reported.
RATIO_FIELDS = tuple(name for name, _ in _TABLE
                     if name not in ("prediction_coverage", "wall_time_s"))


def ratios(smart: SimResult, plain: SimResult) -> dict[str, float | None]:
    """smart / plain for each metric (None where plain's is 0)."""
    out: dict[str, float | None] = {}
    for name in RATIO_FIELDS:
        a, b = getattr(smart, name), getattr(plain, name)
        out[name] = a / b if b else None
    return out


def _fmt(fmt: str, value: Any) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(results: dict[str, SimResult],
                 ratio: dict[str, float | None] | None) -> str:
    names = list(results)
    header = ["metric"] + names + (["smart/plain"] if ratio else [])
    rows = [header]
    for field, fmt in _TABLE:
        row = [field] + [_fmt(fmt, getattr(results[a], field)) for a in names]
        if ratio is not None:
            row.append(_fmt("{:.3f}", ratio.get(field)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--allocator", choices=[*ALLOCATORS, "both"], default="both")
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arrival-rate",
                   type=float,
                   default=2.0,
                   help="mean requests arriving per step (Poisson)")
    p.add_argument("--prompt-median", type=float, default=200.0)
    p.add_argument("--prompt-sigma",
                   type=float,
                   default=0.8,
                   help="sigma of the log-normal prompt lengths")
    p.add_argument("--output-median", type=float, default=150.0)
    p.add_argument("--output-sigma",
                   type=float,
                   default=1.0,
                   help="sigma of the log-normal output lengths")
    p.add_argument("--max-tokens",
                   type=int,
                   default=1024,
                   help="every request's SamplingParams.max_tokens (the cap)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks",
                   type=int,
                   default=None,
                   help="KV-cache blocks (default: --kv-fraction of demand)")
    p.add_argument("--kv-fraction",
                   type=float,
                   default=0.25,
                   help="KV-cache size as a fraction of the blocks the "
                   "requests would hold together, unhindered")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--predictor-quantile",
                   type=float,
                   default=SMART_QUANTILE,
                   help="OutputLengthPredictor quantile (smart; the "
                   "allocator's default)")
    p.add_argument("--output-json", type=str, default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = make_parser().parse_args(argv)
    if args.max_tokens >= args.max_model_len:
        raise SystemExit("--max-tokens must be below --max-model-len.")
    if args.allocator == "both":
        allocators = list(ALLOCATORS)
    else:
        allocators = [args.allocator]

    workload = make_workload(args)
    num_blocks = choose_num_blocks(args, workload)
    demand = kv_demand_blocks(workload, args.block_size)
    print(f"{len(workload)} requests over {workload[-1].arrival_step + 1} "
          f"steps; prompt tokens {sum(r.prompt_len for r in workload)}, "
          f"output tokens {sum(r.output_len for r in workload)} "
          f"({sum(not r.stops_by_eos for r in workload)} reach max_tokens="
          f"{args.max_tokens}); KV cache {num_blocks} blocks of "
          f"{args.block_size} = {num_blocks / demand:.2f} of the demand "
          f"({demand:.0f} blocks)")

    results = {a: simulate(workload, a, args, num_blocks) for a in allocators}
    ratio = (ratios(results["smart"], results["plain"])
             if len(results) == 2 else None)
    print(format_table(results, ratio))

    report: dict[str, Any] = {
        "config": vars(args),
        "workload": {
            "num_requests": len(workload),
            "arrival_span_steps": workload[-1].arrival_step + 1,
            "prompt_tokens": sum(r.prompt_len for r in workload),
            "output_tokens": sum(r.output_len for r in workload),
            "num_reaching_max_tokens":
            sum(not r.stops_by_eos for r in workload),
            "kv_demand_blocks": demand,
            "num_blocks": num_blocks,
        },
        "results": {
            a: asdict(r)
            for a, r in results.items()
        },
        "ratios": ratio,
    }
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
