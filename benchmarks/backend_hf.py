"""Hugging Face transformers as the peer backend of the benchmarks.

Two ways to batch:
- ``continuous``: transformers' continuous batching manager
  (``init_continuous_batching``), one request per prompt with its own
  ``max_new_tokens`` and EOS disabled, so every request produces exactly its
  ``max_tokens``. This is the fair peer and the default on CUDA.
- ``static``: ``model.generate`` on left-padded batches. A batch runs to the
  largest ``max_tokens`` in it (``min_new_tokens`` = ``max_new_tokens`` keeps
  EOS away); only each request's own ``max_tokens`` are counted as output, the
  rest is reported as wasted.
"""

import importlib.util
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationConfig,
                          PreTrainedModel)

_DTYPES: dict[str, torch.dtype] = {
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}

# Sizing of the continuous-batching KV cache on CPU (transformers sizes it
# from free memory on GPUs).
_CPU_BLOCK_SIZE = 16
_CPU_MAX_BATCH_TOKENS = 512


@dataclass
class HFRun:
    """What one timed run of the HF backend did."""

    elapsed: float  # seconds
    num_requests: int
    prompt_tokens: int
    output_tokens: int  # counted: at most each request's max_tokens (x n)
    generated_tokens: int  # actually produced, incl. static-batch overrun
    mode: str  # how the requests were batched, in words


def get_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(dtype: str, config: Any, device: torch.device) -> torch.dtype:
    """vLLM's ``--dtype`` rule: ``auto`` is the checkpoint's dtype on GPU
    (fp32 checkpoints run in bf16), fp32 on CPU."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported --dtype {dtype!r} for the hf "
                             f"backend; choose auto or one of {list(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    config_dtype = getattr(config, "dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype)
    if config_dtype is None or config_dtype == torch.float32:
        return torch.bfloat16
    return config_dtype


def load_model(model: str,
               *,
               dtype: str = "auto",
               load_format: str = "auto",
               trust_remote_code: bool = False,
               seed: int = 0) -> PreTrainedModel:
    """Load ``model`` (a directory or hub id) on CUDA if available, else CPU;
    ``load_format="dummy"`` builds it from its config with random weights."""
    device = get_device()
    config = AutoConfig.from_pretrained(model,
                                        trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype, config, device)
    torch.manual_seed(seed)
    if load_format == "dummy":
        # Initialise directly on the device: fast even for 8B shapes.
        with torch.device(device):
            hf_model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(
            model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        hf_model = hf_model.to(device)  # type: ignore[arg-type]
    return hf_model.eval()


def has_continuous_batching(model: PreTrainedModel) -> bool:
    return hasattr(model, "init_continuous_batching")


def choose_batching(model: PreTrainedModel, batching: str) -> str:
    """``auto``: continuous batching on CUDA when transformers has it, static
    batches otherwise (on CPU transformers can only size its paged cache with
    psutil installed)."""
    if batching == "auto":
        if has_continuous_batching(model) and model.device.type == "cuda":
            return "continuous"
        return "static"
    if batching == "continuous":
        if not has_continuous_batching(model):
            raise RuntimeError("this transformers has no continuous batching "
                               "(init_continuous_batching); use "
                               "--hf-batching static")
        if (model.device.type != "cuda"
                and importlib.util.find_spec("psutil") is None):
            raise RuntimeError("transformers' continuous batching on CPU "
                               "needs psutil to size its cache; install it "
                               "or use --hf-batching static")
    return batching


def run(model: PreTrainedModel,
        prompts: list[list[int]],
        max_tokens: list[int],
        *,
        temperature: float,
        top_p: float,
        n: int = 1,
        batching: str = "auto",
        max_batch_size: int | None = None,
        seed: int = 0,
        warmup_prompts: list[list[int]] | None = None,
        warmup_max_tokens: int = 8) -> HFRun:
    """Warm up on ``warmup_prompts``, then time one pass over all requests.

    Every request ignores EOS and asks for ``max_tokens[i]`` new tokens.
    """
    assert len(prompts) == len(max_tokens)
    mode = choose_batching(model, batching)
    warmup_prompts = warmup_prompts or []
    warmup_limits = [warmup_max_tokens] * len(warmup_prompts)
    if mode == "continuous":
        return _run_continuous(model, prompts, max_tokens, temperature, top_p,
                               n, max_batch_size, seed, warmup_prompts,
                               warmup_limits)
    return _run_static(model, prompts, max_tokens, temperature, top_p, n,
                       max_batch_size or 64, seed, warmup_prompts,
                       warmup_limits)


# ----------------------------------------------------------- continuous --- #


def _run_continuous(model: PreTrainedModel, prompts: list[list[int]],
                    max_tokens: list[int], temperature: float, top_p: float,
                    n: int, max_batch_size: int | None, seed: int,
                    warmup_prompts: list[list[int]],
                    warmup_limits: list[int]) -> HFRun:
    from transformers.generation.configuration_utils import (
        ContinuousBatchingConfig)
    from transformers.generation.continuous_batching.utils import (WorkloadHints
                                                                   )

    device = model.device
    all_prompts = prompts + warmup_prompts
    all_limits = max_tokens + warmup_limits
    gen_config = _generation_config(temperature, top_p, n, max(all_limits))
    cb_kwargs: dict[str, Any] = {"seed": seed}
    if max_batch_size is not None:
        cb_kwargs["max_requests_per_batch"] = max_batch_size
    if device.type != "cuda":
        # Size the cache to the workload, not to the host's RAM.
        blocks = sum(
            math.ceil((len(p) + m) / _CPU_BLOCK_SIZE)
            for p, m in zip(all_prompts, all_limits)) * n
        cb_kwargs.update(block_size=_CPU_BLOCK_SIZE,
                         num_blocks=blocks + 1,
                         max_batch_tokens=_CPU_MAX_BATCH_TOKENS)
    hints = WorkloadHints(max_prompt_length=max(map(len, all_prompts)),
                          max_generated_length=max(all_limits),
                          num_requests=len(prompts) * n)

    with model.continuous_batching_context_manager(  # type: ignore[operator]
            generation_config=gen_config,
            continuous_batching_config=ContinuousBatchingConfig(**cb_kwargs),
            workload_hints=hints) as manager:
        if warmup_prompts:
            _cb_generate(manager, warmup_prompts, warmup_limits, n, "warmup")
        synchronize(device)
        start = time.perf_counter()
        outputs = _cb_generate(manager, prompts, max_tokens, n, "req")
        synchronize(device)
        elapsed = time.perf_counter() - start

    generated = sum(len(o.generated_tokens) for o in outputs)
    by_id = {f"req{i}": m for i, m in enumerate(max_tokens)}
    counted = sum(
        min(len(o.generated_tokens), by_id[o.request_id.split("__")[0]])
        for o in outputs)
    return HFRun(elapsed=elapsed,
                 num_requests=len(prompts),
                 prompt_tokens=sum(map(len, prompts)),
                 output_tokens=counted,
                 generated_tokens=generated,
                 mode="continuous batching (init_continuous_batching, "
                 "per-request max_new_tokens, EOS disabled)")


def _cb_generate(manager: Any, prompts: list[list[int]], limits: list[int],
                 n: int, prefix: str) -> list[Any]:
    """Submit one request per prompt and wait for all (x n) to finish."""
    for i, (ids, limit) in enumerate(zip(prompts, limits)):
        manager.add_request(ids,
                            request_id=f"{prefix}{i}",
                            max_new_tokens=limit,
                            eos_token_id=-1)
    expected = len(prompts) * n
    done: dict[str, Any] = {}
    while len(done) < expected:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("the continuous batching thread stopped "
                                   f"with {expected - len(done)} requests "
                                   "unfinished")
            continue
        if result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"request {result.request_id} failed: "
                                   f"{result.error}")
            done[result.request_id] = result
    return list(done.values())


# --------------------------------------------------------------- static --- #


def _run_static(model: PreTrainedModel, prompts: list[list[int]],
                max_tokens: list[int], temperature: float, top_p: float, n: int,
                batch_size: int, seed: int, warmup_prompts: list[list[int]],
                warmup_limits: list[int]) -> HFRun:
    device = model.device
    pad_id = _pad_token_id(model)
    torch.manual_seed(seed)
    if warmup_prompts:
        _static_generate(model, warmup_prompts, warmup_limits, temperature,
                         top_p, n, batch_size, pad_id)
    synchronize(device)
    start = time.perf_counter()
    generated, counted = _static_generate(model, prompts, max_tokens,
                                          temperature, top_p, n, batch_size,
                                          pad_id)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return HFRun(elapsed=elapsed,
                 num_requests=len(prompts),
                 prompt_tokens=sum(map(len, prompts)),
                 output_tokens=counted,
                 generated_tokens=generated,
                 mode=f"static batches of {batch_size} (sorted by max_tokens,"
                 " left-padded, each batch runs to its largest max_tokens)")


@torch.inference_mode()
def _static_generate(model: PreTrainedModel, prompts: list[list[int]],
                     limits: list[int], temperature: float, top_p: float,
                     n: int, batch_size: int, pad_id: int) -> tuple[int, int]:
    """Returns (tokens generated, tokens counted as output)."""
    device = model.device
    # Similar lengths together: less padding and less overrun.
    order = sorted(range(len(prompts)),
                   key=lambda i: (limits[i], len(prompts[i])),
                   reverse=True)
    generated = counted = 0
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        max_new = max(limits[i] for i in batch)
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = prompts[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": 0,
            }
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            num_return_sequences=n,
            pad_token_id=pad_id,
            **sampling)
        new = out.shape[1] - width
        generated += new * len(batch) * n
        counted += sum(min(new, limits[i]) for i in batch) * n
    return generated, counted


def _generation_config(temperature: float, top_p: float, n: int,
                       max_new_tokens: int) -> GenerationConfig:
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        kwargs = {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": 0,
        }
    return GenerationConfig(max_new_tokens=max_new_tokens,
                            num_return_sequences=n,
                            eos_token_id=-1,
                            pad_token_id=0,
                            **kwargs)


def _pad_token_id(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and 0 <= value < config.vocab_size:
            return int(value)
    return 0
