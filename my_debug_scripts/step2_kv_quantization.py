"""Step 2: what an FP8 (e4m3) or INT8 KV cache would cost in accuracy.

HONEST NOTE: this engine does not support ``kv_cache_dtype="fp8"`` yet
(``vllm.config.CacheConfig`` raises "not supported yet"): its paged KV cache
is stored in the model's dtype. This script MEASURES what an 8-bit cache would
change, on the real keys and values of stories260K:

1. generate once and capture every layer's K and V. They are read from the
   engine's paged cache (``CacheEngine.kv_caches[layer]``, shape
   ``[2, num_blocks, block_size, kv_heads, head_dim]``) at the slots the
   forward pass wrote (``AttentionMetadata.slot_mapping``, seen by a forward
   pre-hook on each ``Attention`` layer, which also keeps the queries);
2. quantize / dequantize them: FP8 e4m3 (``torch.float8_e4m3fn``, max 448) and
   symmetric INT8 (-127..127), each with one scale per tensor or one per KV
   head; print the relative and max abs error per layer and the memory saved;
3. recompute the attention of the prompt's last token in every layer (plain
   softmax attention with GQA, as the model uses) with the dequantized K/V vs
   the original, and report the relative error of its output;
4. generate greedily again while every layer's K/V are fake-quantized before
   they enter the cache (static scales calibrated on step 1), and count how
   many generated tokens agree with the unquantized run.

Run:
    python my_debug_scripts/step2_kv_quantization.py
    python my_debug_scripts/step2_kv_quantization.py --max-tokens 64
    F5 in VSCode: configuration "Step2: KV-cache quantization error"

Good breakpoints: ``write_to_paged_cache`` (attention/backends/torch_sdpa.py)
where K/V enter the cache, and ``quantize_dequantize`` below.
"""
import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm import LLM, SamplingParams
from vllm.attention.layer import Attention
from vllm.config import CacheConfig
from vllm.forward_context import get_forward_context

DEFAULT_MODEL = (Path(__file__).resolve().parents[1].parent / "shared" /
                 "models" / "stories260K")
DEFAULT_PROMPT = ("Once upon a time, there was a little girl named Lily. "
                  "She loved to play outside in the park with her friends.")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
INT8_MAX = 127.0
SCHEMES = [("fp8", "tensor"), ("fp8", "head"), ("int8", "tensor"),
           ("int8", "head")]


# --------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------
def compute_scale(x: torch.Tensor, dtype: str,
                  granularity: str) -> torch.Tensor:
    """Symmetric scale mapping amax onto the format's largest value.
    x: [T, kv_heads, head_dim]; "tensor" -> one scale, "head" -> one per KV
    head (shape [1, kv_heads, 1], broadcasts over x)."""
    qmax = FP8_MAX if dtype == "fp8" else INT8_MAX
    if granularity == "tensor":
        amax = x.abs().amax()
    else:
        amax = x.abs().amax(dim=(0, 2), keepdim=True)
    # a tiny floor: an all-zero head must not divide by zero
    return amax.clamp(min=1e-8) / qmax


def quantize_dequantize(x: torch.Tensor, dtype: str,
                        scale: torch.Tensor) -> torch.Tensor:
    """x -> 8-bit -> back to x's dtype. What attention would read from an
    8-bit cache (a real kernel dequantizes on the fly the same way)."""
    if dtype == "fp8":
        # e4m3: 4 exponent bits, 3 mantissa bits: relative rounding error
        # about 2^-4 for every value, whatever its size (floating point).
        # Clamp first: values beyond a static scale's range saturate.
        q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        # int8: 255 evenly spaced levels: absolute error up to scale / 2, so
        # small values lose relatively more than with fp8.
        q = (x / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.to(x.dtype) * scale


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm().clamp(min=1e-12)).item()


# --------------------------------------------------------------------------
# Capturing K/V from the engine
# --------------------------------------------------------------------------
@dataclass
class LayerCapture:
    """What one attention layer saw during one generate call."""
    queries: list[torch.Tensor]  # per forward: [T, H*D]
    slots: list[torch.Tensor]  # per forward: [T] cache slots written
    outputs: list[torch.Tensor]  # per forward: [T, H*D]


def attention_layers(llm: LLM) -> list[Attention]:
    model = llm.llm_engine.executor.worker.model_runner.model
    return [m for m in model.modules() if isinstance(m, Attention)]


@contextmanager
def capture_attention(llm: LLM) -> Iterator[list[LayerCapture]]:
    """Hooks on every Attention layer: queries, slot mappings, outputs."""
    captures = [LayerCapture([], [], []) for _ in attention_layers(llm)]
    handles = []
    for layer, cap in zip(attention_layers(llm), captures):

        def pre_hook(module: nn.Module,
                     args: tuple[Any, ...],
                     cap: LayerCapture = cap) -> None:
            query = args[0]
            cap.queries.append(query.detach().clone())
            slots = get_forward_context().attn_metadata.slot_mapping
            cap.slots.append(slots[:query.shape[0]].detach().clone())

        def hook(module: nn.Module,
                 args: tuple[Any, ...],
                 output: torch.Tensor,
                 cap: LayerCapture = cap) -> None:
            cap.outputs.append(output.detach().clone())

        handles.append(layer.register_forward_pre_hook(pre_hook))
        handles.append(layer.register_forward_hook(hook))
    try:
        yield captures
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def fake_quantized_kv(
        llm: LLM, dtype: str,
        scales: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Quantize/dequantize each layer's new K and V before the layer writes
    them into the cache and attends: what an 8-bit cache with static
    (calibrated) scales would feed attention."""
    handles = []
    for layer, (k_scale, v_scale) in zip(attention_layers(llm), scales):

        def pre_hook(module: nn.Module,
                     args: tuple[Any, ...],
                     k_scale: torch.Tensor = k_scale,
                     v_scale: torch.Tensor = v_scale) -> tuple[Any, ...]:
            query, key, value = args[:3]
            assert isinstance(module, Attention)
            shape = (key.shape[0], module.num_kv_heads, module.head_size)
            key = quantize_dequantize(key.view(shape), dtype,
                                      k_scale).view(key.shape)
            value = quantize_dequantize(value.view(shape), dtype,
                                        v_scale).view(value.shape)
            return (query, key, value, *args[3:])

        handles.append(layer.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def read_kv_from_cache(
        llm: LLM, layer: int,
        slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [T, kv_heads, head_dim] of the given slots, from the paged
    cache: slot s is block s // block_size, row s % block_size."""
    cache_engine = llm.llm_engine.executor.worker.cache_engine
    assert cache_engine is not None, "the KV cache is allocated at start-up"
    kv_cache = cache_engine.kv_caches[layer]  # [2, blocks, bs, Hkv, D]
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    keys = kv_cache[0].reshape(-1, num_kv_heads, head_dim)[slots]
    values = kv_cache[1].reshape(-1, num_kv_heads, head_dim)[slots]
    return keys.clone(), values.clone()


def attend_last_token(query: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of one query [H, D] over keys/values [T, Hkv, D]
    with GQA: query head h reads KV head h // (H / Hkv), as the engine's
    ``scaled_dot_product_attention(..., enable_gqa=True)`` does."""
    num_heads, num_kv_heads = query.shape[0], keys.shape[1]
    group = num_heads // num_kv_heads
    k = keys.repeat_interleave(group, dim=1)  # [T, H, D]
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,thd->ht", query, k) * scale  # [H, T]
    weights = scores.softmax(dim=-1)
    return torch.einsum("ht,thd->hd", weights, v)  # [H, D]


# --------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------
@dataclass
class LayerError:
    layer: int
    scheme: str  # e.g. "fp8/tensor"
    k_rel: float
    v_rel: float
    k_max_abs: float
    v_max_abs: float
    attn_rel: float  # output of the prompt's last token


@dataclass
class KVQuantReport:
    num_prompt_tokens: int
    errors: list[LayerError]
    engine_attention_max_diff: float  # plain torch vs the engine, unquantized
    bytes_per_token: dict[str, float]
    baseline_tokens: list[int]
    # scheme -> generated tokens equal to the baseline's before a difference
    free_running: dict[str, int]
    # scheme -> positions whose most likely next token is the baseline's
    teacher_forced: dict[str, int]
    num_forced_positions: int

    def worst(self, scheme: str) -> LayerError:
        rows = [e for e in self.errors if e.scheme == scheme]
        return max(rows, key=lambda e: max(e.k_rel, e.v_rel))


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0,
                          max_tokens=max_tokens,
                          ignore_eos=True)


def _top1_per_position(llm: LLM, prompt: dict[str, list[int]]) -> list[int]:
    """The most likely next token after every prefix of the prompt (from the
    engine's prompt logprobs: the candidate of rank 1)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    out = llm.generate([prompt], params, use_tqdm=False)[0]  # type: ignore
    assert out.prompt_logprobs is not None
    top1 = []
    for position in out.prompt_logprobs[1:]:  # position 0 has no prefix
        assert position is not None
        top1.append(next(t for t, lp in position.items() if lp.rank == 1))
    return top1


def measure(llm: LLM,
            prompt: str,
            max_tokens: int,
            log: Callable[[str], None] = print) -> KVQuantReport:
    layers = attention_layers(llm)
    # 1. one prefill (max_tokens=1: the prompt only), K/V from the cache
    with capture_attention(llm) as captures:
        llm.generate([prompt], _greedy(1), use_tqdm=False)
    num_tokens = captures[0].queries[0].shape[0]

    errors: list[LayerError] = []
    engine_diff = 0.0
    calibration: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {
        f"{d}/{g}": []
        for d, g in SCHEMES
    }
    for index, (layer, cap) in enumerate(zip(layers, captures)):
        slots = cap.slots[0]
        keys, values = read_kv_from_cache(llm, index, slots)  # [T, Hkv, D]
        query = cap.queries[0][-1].view(layer.num_heads, layer.head_size)
        scale = layer.impl.scale
        ref = attend_last_token(query, keys, values, scale)
        # sanity: our plain attention is the engine's for this token
        engine_out = cap.outputs[0][-1].view_as(ref)
        engine_diff = max(engine_diff, (ref - engine_out).abs().max().item())
        for dtype, granularity in SCHEMES:
            name = f"{dtype}/{granularity}"
            k_scale = compute_scale(keys, dtype, granularity)
            v_scale = compute_scale(values, dtype, granularity)
            calibration[name].append((k_scale, v_scale))
            k_q = quantize_dequantize(keys, dtype, k_scale)
            v_q = quantize_dequantize(values, dtype, v_scale)
            out_q = attend_last_token(query, k_q, v_q, scale)
            errors.append(
                LayerError(index, name, relative_error(k_q, keys),
                           relative_error(v_q, values),
                           (k_q - keys).abs().max().item(),
                           (v_q - values).abs().max().item(),
                           relative_error(out_q, ref)))

    # memory: keys + values of one token in every layer
    first = layers[0]
    per_layer_elems = 2 * first.num_kv_heads * first.head_size
    num_layers = len(layers)
    model_dtype = llm.llm_engine.model_config.dtype
    bytes_per_token: dict[str, float] = {
        f"{model_dtype} (now)":
        per_layer_elems * num_layers * model_dtype.itemsize,
        "fp16/bf16": per_layer_elems * num_layers * 2,
        "fp8/int8": per_layer_elems * num_layers * 1,
    }

    # 4. greedy agreement with fake-quantized K/V (static scales above).
    # Free running: tokens equal to the unquantized run before the first
    # difference (one near-tie flips the rest of the text). Teacher forced:
    # prompt + the unquantized continuation as one prompt; at each position
    # does the most likely next token (rank 1 of prompt_logprobs) agree?
    baseline = list(
        llm.generate([prompt], _greedy(max_tokens),
                     use_tqdm=False)[0].outputs[0].token_ids)
    prompt_ids = llm.get_tokenizer().encode(prompt)
    forced = {"prompt_token_ids": prompt_ids + baseline}
    ref_top1 = _top1_per_position(llm, forced)
    free_running: dict[str, int] = {}
    teacher_forced: dict[str, int] = {}
    for name, scales in calibration.items():
        with fake_quantized_kv(llm, name.split("/")[0], scales):
            tokens = llm.generate([prompt], _greedy(max_tokens),
                                  use_tqdm=False)[0].outputs[0].token_ids
            top1 = _top1_per_position(llm, forced)
        same = 0
        for a, b in zip(tokens, baseline):
            if a != b:
                break
            same += 1
        free_running[name] = same
        teacher_forced[name] = sum(a == b for a, b in zip(top1, ref_top1))
    return KVQuantReport(num_tokens, errors, engine_diff, bytes_per_token,
                         baseline, free_running, teacher_forced, len(ref_top1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens",
                        type=int,
                        default=32,
                        help="tokens generated for the greedy agreement")
    args = parser.parse_args(argv)

    print("=" * 72)
    print('NOTE: kv_cache_dtype="fp8" is not supported by this engine yet:')
    try:
        CacheConfig(kv_cache_dtype="fp8")
    except ValueError as error:
        print(f"  CacheConfig(kv_cache_dtype='fp8') -> ValueError: {error}")
    print("This script measures what an 8-bit KV cache WOULD change.")
    print("=" * 72)

    # prefix caching off: the measuring prefill must compute every token.
    llm = LLM(model=args.model,
              swap_space=0,
              num_gpu_blocks_override=64,
              enable_prefix_caching=False)
    report = measure(llm, args.prompt, args.max_tokens)

    print(f"prompt: {report.num_prompt_tokens} tokens; K/V read from "
          "llm.llm_engine.executor.worker.cache_engine.kv_caches[layer] at "
          "the slots of the prefill")
    print(f"plain-torch attention vs the engine's (unquantized): max abs "
          f"diff {report.engine_attention_max_diff:.1e}")
    print(f"{'scheme':12s} {'layer':>5s} {'K rel':>9s} {'V rel':>9s} "
          f"{'K maxabs':>9s} {'V maxabs':>9s} {'attn rel':>9s}")
    for e in report.errors:
        print(f"{e.scheme:12s} {e.layer:5d} {e.k_rel:9.2e} {e.v_rel:9.2e} "
              f"{e.k_max_abs:9.2e} {e.v_max_abs:9.2e} {e.attn_rel:9.2e}")
    print("KV cache bytes per token (all layers, K+V): " +
          ", ".join(f"{k}: {v:.0f} B"
                    for k, v in report.bytes_per_token.items()))
    now = next(iter(report.bytes_per_token.values()))
    print(
        f"  -> 8-bit saves {100 * (1 - report.bytes_per_token['fp8/int8'] / now):.0f}% "
        "of the cache (the same memory holds "
        f"{now / report.bytes_per_token['fp8/int8']:.0f}x the tokens); "
        "scales cost 2 floats per layer (tensor) or 2 per KV head (head)")
    n = len(report.baseline_tokens)
    print(f"greedy agreement with the unquantized run ({n} generated "
          "tokens; free running = tokens equal before the first difference; "
          f"teacher forced = positions of prompt + continuation, "
          f"{report.num_forced_positions}, whose top-1 token agrees):")
    for name in report.free_running:
        print(f"  {name:12s} free running {report.free_running[name]:3d}/{n}"
              f"   teacher forced {report.teacher_forced[name]:3d}/"
              f"{report.num_forced_positions}")


if __name__ == "__main__":
    main()
