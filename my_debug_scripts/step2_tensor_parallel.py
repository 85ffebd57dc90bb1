"""Step 2: tensor parallelism (TP) of one Llama layer, on stories260K's weights.

HONEST NOTE: this engine does not run ``tensor_parallel_size > 1`` yet
(``vllm.config.ParallelConfig`` raises "not supported yet"). Its layers,
however, are already written for any TP size (vllm/model_executor/layers/
linear.py): each one reads the TP rank and size from vllm/distributed/ when it
is built and keeps only its shard of the weight. This script uses exactly those
classes to show what TP would do:

1. column-parallel ``qkv_proj`` / ``gate_up_proj``: each rank keeps a slice of
   the *output* features, taken per sub-matrix (q, k, v / gate, up), so that
   every rank owns whole attention heads and matching gate/up columns;
2. row-parallel ``o_proj`` / ``down_proj``: each rank keeps a slice of the
   *input* features and computes a partial sum; the all-reduce adds them;
3. heads per rank (and KV heads replicated when there are fewer than ranks);
4. proof: every decoder layer computed rank by rank (all "ranks" live in this
   process, the all-reduce is a plain sum) equals the unsharded layer;
5. the bytes all-reduced per token and where the two all-reduces of a layer
   happen. ``--distributed`` runs the same layer in 2 real processes over
   torch.distributed (gloo, CPU) with a real ``all_reduce``.

Run:
    python my_debug_scripts/step2_tensor_parallel.py
    python my_debug_scripts/step2_tensor_parallel.py --world-sizes 2 4 8
    python my_debug_scripts/step2_tensor_parallel.py --distributed
    F5 in VSCode: configuration "Step2: tensor parallel sharding"

Good breakpoints: ``QKVParallelLinear.weight_loader`` (linear.py: how the fused
q/k/v weight is cut per rank) and ``RowParallelLinear.forward`` (the
all-reduce).
"""
import argparse
import contextlib
import inspect
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vllm.distributed.parallel_state as parallel_state
from vllm import LLM
from vllm.attention.backends.abstract import AttentionMetadata
from vllm.config import ParallelConfig
from vllm.distributed import initialize_model_parallel
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.linear import (QKVParallelLinear,
                                               RowParallelLinear)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import (LlamaAttention, LlamaDecoderLayer,
                                              LlamaMLP)

DEFAULT_MODEL = (Path(__file__).resolve().parents[1].parent / "shared" /
                 "models" / "stories260K")
DEFAULT_PROMPT = "Once upon a time, there was a little girl named Lily."
# fp32 sums in a different order (per rank, then across ranks) round
# differently; anything above this would be a sharding bug, not rounding.
ATOL = 1e-5


# --------------------------------------------------------------------------
# Simulating ranks in one process
# --------------------------------------------------------------------------
@contextlib.contextmanager
def simulated_rank(tp_size: int, rank: int) -> Iterator[None]:
    """Pretend to be ``rank`` of a TP group of ``tp_size`` while layers are
    built.

    ``LinearBase.__init__`` (and LlamaAttention) read the rank and size ONCE,
    at construction, to size their shards; their ``weight_loader`` later cuts
    the full checkpoint tensor with that rank. ``tensor_model_parallel_all_
    reduce`` reads the size again at call time: outside this context it is 1,
    so the all-reduce is a no-op and a layer returns its *partial* result,
    which is exactly what we want: we add the ranks' partials ourselves.
    """
    saved = (parallel_state._TP_WORLD_SIZE, parallel_state._TP_RANK)
    parallel_state._TP_WORLD_SIZE, parallel_state._TP_RANK = tp_size, rank
    try:
        yield
    finally:
        parallel_state._TP_WORLD_SIZE, parallel_state._TP_RANK = saved


def load_full_weights(module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Give every parameter of ``module`` (built for some rank) its shard of
    the full tensors ``full`` (the unsharded layer's state dict).

    Each parameter carries the engine's ``weight_loader``: handed the FULL
    tensor it narrows it to this rank's shard. With no shard id, the fused
    loaders of QKVParallelLinear / MergedColumnParallelLinear first split the
    fused tensor into q, k, v (gate, up) and shard each part separately.
    """
    for name, param in module.named_parameters():
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, full[name])


def build_rank_modules(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                       full: dict[str,
                                  torch.Tensor], tp_size: int) -> list[Any]:
    """``tp_size`` copies of ``cls(*args, **kwargs)``, copy r built as rank r
    and loaded with its shard of ``full``."""
    modules: list[Any] = []
    for rank in range(tp_size):
        with simulated_rank(tp_size, rank):
            module = cls(*args, **kwargs).eval()
        load_full_weights(module, full)
        modules.append(module)
    return modules


def all_reduce_sum(partials: list[torch.Tensor]) -> torch.Tensor:
    """What ``dist.all_reduce(x)`` (op=SUM) leaves on every rank."""
    return torch.stack(partials).sum(dim=0)


def prefill_metadata(num_tokens: int) -> AttentionMetadata:
    """One whole prompt and no KV cache: the backend's profiling-run path,
    where a sequence attends to exactly its new tokens (causal)."""
    return AttentionMetadata(num_actual_tokens=num_tokens,
                             num_decodes=0,
                             max_query_len=num_tokens,
                             max_seq_len=num_tokens,
                             query_start_loc=torch.tensor([0, num_tokens],
                                                          dtype=torch.int32),
                             seq_lens=torch.tensor([num_tokens],
                                                   dtype=torch.int32),
                             block_tables=torch.zeros((1, 1),
                                                      dtype=torch.int32),
                             slot_mapping=torch.arange(num_tokens))


def tp_decoder_layer_forward(
        ranks: list[LlamaDecoderLayer], positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``LlamaDecoderLayer.forward`` run on every rank in lock-step, with its
    two all-reduces written out (each rank's RowParallelLinear returns a
    partial sum here because the simulated all-reduce is a no-op)."""
    # RMSNorm weights are replicated: every rank computes the same normed
    # input (rank 0's result stands for all of them).
    if residual is None:
        residual = hidden
        normed = ranks[0].input_layernorm(hidden)
    else:
        normed, residual = ranks[0].input_layernorm(hidden, residual)
    # Attention: rank r runs its heads only, then its slice of o_proj.
    attn_partials = [r.self_attn(positions, normed) for r in ranks]
    attn_out = all_reduce_sum(attn_partials)  # ALL-REDUCE #1 (o_proj)
    normed, residual = ranks[0].post_attention_layernorm(attn_out, residual)
    # MLP: rank r has I/tp gate and up columns and the same rows of down.
    mlp_partials = [r.mlp(normed) for r in ranks]
    return all_reduce_sum(mlp_partials), residual  # ALL-REDUCE #2 (down)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------
@dataclass
class ShardCheck:
    """The outcome of one world size."""
    tp_size: int
    what: str  # "decoder layer" or "attention only"
    heads_per_rank: int
    kv_heads_per_rank: int
    kv_head_replicas: int
    shard_shapes: dict[str, tuple[int, ...]]
    max_abs_diff: list[float] = field(default_factory=list)  # per layer

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff) and max(self.max_abs_diff) <= ATOL


def qkv_rows_by_hand(full_qkv: torch.Tensor, qkv: QKVParallelLinear,
                     rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of the fused [q; k; v] weight, cut by hand: the
    rank's q heads, then its (maybe replicated) kv head(s) of k and of v."""
    d = qkv.head_size
    q_full = qkv.total_num_heads * d
    kv_full = qkv.total_num_kv_heads * d
    q, k, v = full_qkv.split([q_full, kv_full, kv_full])
    kv_index = rank // qkv.num_kv_head_replicas
    return torch.cat([
        q[rank * qkv.q_size:(rank + 1) * qkv.q_size],
        k[kv_index * qkv.kv_size:(kv_index + 1) * qkv.kv_size],
        v[kv_index * qkv.kv_size:(kv_index + 1) * qkv.kv_size],
    ])


def check_world_size(model: Any, config: Any, input_ids: torch.Tensor,
                     tp_size: int) -> ShardCheck | None:
    """Shard every decoder layer for ``tp_size`` ranks and compare its output
    with the unsharded layer's, feeding both the real hidden states of the
    prompt. Attention only when the MLP's size does not divide; None when
    not even the heads divide."""
    num_heads = config.num_attention_heads
    if num_heads % tp_size:
        return None
    whole_layer = config.intermediate_size % tp_size == 0
    layers = model.model.layers
    num_tokens = input_ids.shape[0]
    positions = torch.arange(num_tokens)
    check: ShardCheck | None = None
    with torch.no_grad(), set_forward_context(prefill_metadata(num_tokens)):
        hidden = model.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for index, layer in enumerate(layers):
            full = {k: v.detach() for k, v in layer.state_dict().items()}
            if whole_layer:
                ranks = build_rank_modules(LlamaDecoderLayer, (config, ),
                                           {"prefix": f"layers.{index}"}, full,
                                           tp_size)
                sharded, sharded_res = tp_decoder_layer_forward(
                    ranks, positions, hidden, residual)
                ref, ref_res = layer(positions, hidden, residual)
                diff = max((sharded - ref).abs().max().item(),
                           (sharded_res - ref_res).abs().max().item())
                attn = ranks[0].self_attn
            else:
                # attention only: input = the normed hidden state
                attn_full = {
                    k.removeprefix("self_attn."): v
                    for k, v in full.items() if k.startswith("self_attn.")
                }
                attn_ranks = build_rank_modules(
                    LlamaAttention, (), {
                        "config": config,
                        "hidden_size": config.hidden_size,
                        "num_heads": num_heads,
                        "num_kv_heads": config.num_key_value_heads,
                        "max_position_embeddings":
                        config.max_position_embeddings,
                    }, attn_full, tp_size)
                normed = layer.input_layernorm(
                    hidden) if residual is None else layer.input_layernorm(
                        hidden, residual)[0]
                sharded = all_reduce_sum(
                    [a(positions, normed) for a in attn_ranks])
                ref = layer.self_attn(positions, normed)
                diff = (sharded - ref).abs().max().item()
                attn = attn_ranks[0]
                ref, ref_res = layer(positions, hidden, residual)
            if check is None:
                check = ShardCheck(
                    tp_size=tp_size,
                    what="decoder layer" if whole_layer else "attention only",
                    heads_per_rank=attn.num_heads,
                    kv_heads_per_rank=attn.num_kv_heads,
                    kv_head_replicas=attn.qkv_proj.num_kv_head_replicas,
                    shard_shapes=_shard_shapes(
                        ranks[0] if whole_layer else attn))
                _check_qkv_layout(
                    full["self_attn.qkv_proj.weight"],
                    [(r.self_attn if whole_layer else r).qkv_proj
                     for r in (ranks if whole_layer else attn_ranks)])
            check.max_abs_diff.append(diff)
            # continue with the unsharded layer's output: every layer is
            # compared on the hidden states the real model feeds it
            hidden, residual = ref, ref_res
    return check


def _shard_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name.removesuffix(".weight"): tuple(p.shape)
        for name, p in module.named_parameters() if name.endswith("proj.weight")
    }


def _check_qkv_layout(full_qkv: torch.Tensor,
                      ranks: list[QKVParallelLinear]) -> None:
    """The engine's loader cut q, k and v separately (not the fused rows
    contiguously): compare with the cut by hand."""
    for rank, qkv in enumerate(ranks):
        expected = qkv_rows_by_hand(full_qkv, qkv, rank)
        if not torch.equal(qkv.weight.data, expected):
            raise AssertionError(f"rank {rank}: qkv shard is not [q heads; "
                                 "kv heads of k; of v]")


def communication_per_token(config: Any, tp_size: int,
                            elem_bytes: int) -> dict[str, float]:
    """Bytes of all-reduce per token: each all-reduce sums a [T, hidden]
    tensor, two per layer (o_proj, down_proj). A ring all-reduce sends
    2 * (tp - 1) / tp times the payload out of every rank."""
    payload = config.hidden_size * elem_bytes
    per_layer = 2 * payload
    layers = config.num_hidden_layers
    return {
        "payload_per_all_reduce": payload,
        "per_layer": per_layer,
        "per_model": per_layer * layers + payload,  # + the embedding's
        "ring_sent_per_rank_per_layer": per_layer * 2 * (tp_size - 1) / tp_size,
    }


def where_all_reduces_happen() -> list[str]:
    """file:line of the calls whose RowParallelLinear all-reduces."""
    places = []
    for cls, attr in ((LlamaAttention, "o_proj"), (LlamaMLP, "down_proj")):
        lines, start = inspect.getsourcelines(cls.forward)
        path = os.path.relpath(inspect.getfile(cls))
        for offset, line in enumerate(lines):
            if f"self.{attr}(" in line:
                places.append(f"{path}:{start + offset} {cls.__name__}."
                              f"forward: {line.strip()}")
    lines, start = inspect.getsourcelines(RowParallelLinear.forward)
    for offset, line in enumerate(lines):
        if "tensor_model_parallel_all_reduce(" in line:
            places.append(
                f"  -> {os.path.relpath(inspect.getfile(RowParallelLinear))}:"
                f"{start + offset} RowParallelLinear.forward: "
                f"{line.strip()}")
    return places


# --------------------------------------------------------------------------
# --distributed: two real processes, a real all_reduce
# --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _distributed_worker(rank: int, world_size: int, port: int, config: Any,
                        full: dict[str, torch.Tensor], hidden: torch.Tensor,
                        expected: torch.Tensor, results: Any) -> None:
    """One TP rank: the engine's own LlamaDecoderLayer.forward, whose
    RowParallelLinear layers call dist.all_reduce for real."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo",
                            init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank,
                            world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        initialize_model_parallel(world_size)  # records rank and size
        layer = LlamaDecoderLayer(config, prefix="layers.0").eval()
        load_full_weights(layer, full)
        positions = torch.arange(hidden.shape[0])
        with torch.no_grad(), set_forward_context(
                prefill_metadata(hidden.shape[0])):
            out, _ = layer(positions, hidden, None)
        results.put((rank, (out - expected).abs().max().item(),
                     tuple(layer.self_attn.qkv_proj.weight.shape)))
    finally:
        initialize_model_parallel(1)
        dist.destroy_process_group()


def run_distributed(model: Any,
                    config: Any,
                    input_ids: torch.Tensor,
                    world_size: int = 2) -> list[tuple[int, float, tuple]]:
    """Layer 0 on ``world_size`` gloo processes; (rank, max abs diff with the
    unsharded layer, qkv shard shape) per rank."""
    layer = model.model.layers[0]
    full = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    with torch.no_grad(), set_forward_context(
            prefill_metadata(input_ids.shape[0])):
        hidden = model.model.embed_tokens(input_ids)
        expected, _ = layer(torch.arange(input_ids.shape[0]), hidden, None)
    # fork: the children inherit the imported modules (no 5 s re-import of
    # vllm each); spawn elsewhere.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    results = mp.get_context(method).SimpleQueue()
    mp.start_processes(_distributed_worker,
                       args=(world_size, _free_port(), config, full, hidden,
                             expected, results),
                       nprocs=world_size,
                       join=True,
                       start_method=method)
    out = [results.get() for _ in range(world_size)]
    return sorted(out)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
def load_engine_model(model_path: str) -> tuple[LLM, Any]:
    """The engine and its live torch module (the path to remember)."""
    # swap_space=0 and a small cache: this script never needs the KV cache.
    llm = LLM(model=model_path, swap_space=0, num_gpu_blocks_override=32)
    model = llm.llm_engine.executor.worker.model_runner.model
    return llm, model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--world-sizes",
                        type=int,
                        nargs="+",
                        default=[2, 4, 8],
                        help="TP sizes to simulate (skipped when the heads "
                        "do not divide)")
    parser.add_argument("--distributed",
                        action="store_true",
                        help="also run layer 0 on 2 gloo processes")
    args = parser.parse_args(argv)

    print("=" * 72)
    print("NOTE: this engine does not support tensor_parallel_size > 1 yet:")
    try:
        ParallelConfig(tensor_parallel_size=2)
    except ValueError as e:
        print(f"  ParallelConfig(tensor_parallel_size=2) -> ValueError: {e}")
    print("The layers are TP-ready; below, ranks are simulated with them.")
    print("=" * 72)

    llm, model = load_engine_model(args.model)
    config = model.config
    print("live model: llm.llm_engine.executor.worker.model_runner.model "
          f"({type(model).__name__})")
    print(f"hidden={config.hidden_size} heads={config.num_attention_heads} "
          f"kv_heads={config.num_key_value_heads} head_dim="
          f"{model.model.layers[0].self_attn.head_dim} intermediate="
          f"{config.intermediate_size} layers={config.num_hidden_layers}")
    layer0 = model.model.layers[0]
    print("unsharded shapes of layer 0: " +
          ", ".join(f"{k}={v}" for k, v in _shard_shapes(layer0).items()))
    input_ids = torch.tensor(llm.get_tokenizer().encode(args.prompt))
    print(f"prompt: {args.prompt!r} ({input_ids.shape[0]} tokens)")

    elem_bytes = next(model.parameters()).element_size()
    checks: list[ShardCheck] = []
    for tp_size in args.world_sizes:
        print("-" * 72)
        check = check_world_size(model, config, input_ids, tp_size)
        if check is None:
            print(f"TP={tp_size}: skipped ({config.num_attention_heads} "
                  f"heads do not divide by {tp_size})")
            continue
        checks.append(check)
        print(f"TP={tp_size} ({check.what}): {check.heads_per_rank} query "
              f"heads and {check.kv_heads_per_rank} kv head(s) per rank" +
              (f", each kv head replicated on {check.kv_head_replicas} "
               "ranks" if check.kv_head_replicas > 1 else ""))
        if check.what == "attention only":
            print(f"  (MLP: intermediate_size {config.intermediate_size} does "
                  f"not divide by {tp_size}, so only attention is sharded)")
        for name, shape in check.shard_shapes.items():
            kind = ("row-parallel: a slice of the INPUT features"
                    if name.endswith(("o_proj", "down_proj")) else
                    "column-parallel: a slice of the OUTPUT features")
            print(f"  rank shard {name:24s} {str(shape):10s} {kind}")
        print("  qkv rows of rank r = [its q heads; its kv heads of k; of v]"
              " (checked against a cut by hand); a contiguous cut of the "
              "fused [q; k; v] rows would be wrong: e.g. rank 0 would get "
              "only q rows")
        comm = communication_per_token(config, tp_size, elem_bytes)
        print(f"  all-reduced per token: {comm['payload_per_all_reduce']:.0f}"
              f" B per all-reduce, {comm['per_layer']:.0f} B per layer, "
              f"{comm['per_model']:.0f} B per forward (+embedding); ring "
              f"traffic sent per rank per layer: "
              f"{comm['ring_sent_per_rank_per_layer']:.0f} B")
        diffs = ", ".join(f"{d:.1e}" for d in check.max_abs_diff)
        print(f"  max |sharded - unsharded| per layer: {diffs} -> "
              f"{'OK' if check.ok else 'MISMATCH'} (atol {ATOL})")
        if not check.ok:
            raise AssertionError(f"TP={tp_size}: sharded != unsharded")

    print("-" * 72)
    print("the two all-reduces of a decoder layer:")
    for place in where_all_reduces_happen():
        print(f"  {place}")
    print("(plus one in VocabParallelEmbedding.forward per forward pass and an"
          " all-gather of the logits in LogitsProcessor)")

    if args.distributed:
        print("-" * 72)
        start = time.perf_counter()
        results = run_distributed(model, config, input_ids)
        for rank, diff, shape in results:
            print(f"gloo rank {rank}: qkv shard {shape}, max |out - "
                  f"unsharded| = {diff:.1e}")
        print(f"--distributed: 2 processes, real dist.all_reduce, "
              f"{time.perf_counter() - start:.1f} s")
        if max(d for _, d, _ in results) > ATOL:
            raise AssertionError("distributed TP output != unsharded output")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
