"""EngineArgs: the user's keyword arguments / CLI flags, resolved into VllmConfig."""
import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import torch

from vllm import envs
from vllm.config import (CacheConfig, DeviceConfig, ModelConfig, ParallelConfig,
                         SchedulerConfig, VllmConfig)
from vllm.logger import init_logger
from vllm.transformers_utils.config import get_config

logger = init_logger(__name__)

_STR_TO_DTYPE = {
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}


@dataclass
class EngineArgs:
    """Every engine option, with vLLM's names and defaults."""
    model: str
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer_revision: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    load_format: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    quantization: str | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4
    cpu_offload_gb: float = 0
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = False
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool | None = None
    scheduling_policy: str = "fcfs"
    priority_aging_steps: int | None = 256
    preemption_mode: str | None = None
    block_allocator: str = "plain"
    async_scheduling: bool = True
    max_logprobs: int = 20
    enforce_eager: bool = False
    max_seq_len_to_capture: int = 8192
    disable_log_stats: bool = False

    @classmethod
    def add_cli_args(
            cls,
            parser: argparse.ArgumentParser,
            model_flag_required: bool = True) -> argparse.ArgumentParser:
        """One ``--flag-name`` per field, typed from the annotations.

        ``model_flag_required=False``: ``--model`` may be left out (``vllm
        serve MODEL`` takes the model as a positional argument)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            if kind is bool or kind == bool | None:
                parser.add_argument(flag,
                                    action=argparse.BooleanOptionalAction,
                                    default=f.default)
                continue
            base = next(
                a for a in typing.get_args(kind)
                if a is not type(None)) if typing.get_args(kind) else kind
            missing = f.default is dataclasses.MISSING
            parser.add_argument(flag,
                                type=base,
                                default=None if missing else f.default,
                                required=missing
                                and (model_flag_required or f.name != "model"))
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(
            **{f.name: getattr(args, f.name)
               for f in dataclasses.fields(cls)})

    def _reject_unsupported(self) -> None:
        unsupported = {
            "trust_remote_code": (self.trust_remote_code, False),
            "quantization": (self.quantization, None),
            "cpu_offload_gb": (self.cpu_offload_gb, 0),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"{name}={value!r} is not supported by this "
                                 f"engine yet (supported: {supported!r}).")

    def create_engine_config(self) -> VllmConfig:
        self._reject_unsupported()
        device_config = DeviceConfig.resolve(self.device)
        hf_config = get_config(self.model,
                               revision=self.revision,
                               trust_remote_code=self.trust_remote_code)
        max_model_len = _resolve_max_model_len(hf_config, self.max_model_len)
        model_config = ModelConfig(model=self.model,
                                   tokenizer=self.tokenizer or self.model,
                                   hf_config=hf_config,
                                   dtype=_resolve_dtype(hf_config, self.dtype,
                                                        device_config.device),
                                   max_model_len=max_model_len,
                                   seed=self.seed,
                                   revision=self.revision,
                                   tokenizer_revision=self.tokenizer_revision,
                                   load_format=self.load_format,
                                   skip_tokenizer_init=self.skip_tokenizer_init,
                                   max_logprobs=self.max_logprobs)
        cache_config = CacheConfig(
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            swap_space=self.swap_space,
            kv_cache_dtype=self.kv_cache_dtype,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            cpu_kvcache_space_gib=envs.VLLM_CPU_KVCACHE_SPACE,
            enable_prefix_caching=self.enable_prefix_caching,
            block_allocator=self.block_allocator)
        chunked = (True if self.enable_chunked_prefill is None else
                   self.enable_chunked_prefill)
        default_tokens, default_seqs = _default_batch_limits(
            device_config.device)
        max_num_seqs = self.max_num_seqs or default_seqs
        max_tokens = self.max_num_batched_tokens or max(
            default_tokens, max_num_seqs, 0 if chunked else max_model_len)
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=max_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
            policy=self.scheduling_policy,  # type: ignore[arg-type]
            preemption_mode=self.preemption_mode  # type: ignore[arg-type]
            or "recompute",
            priority_aging_steps=self.priority_aging_steps,
            async_scheduling=self.async_scheduling)
        return VllmConfig(model_config=model_config,
                          cache_config=cache_config,
                          scheduler_config=scheduler_config,
                          parallel_config=ParallelConfig(
                              self.tensor_parallel_size),
                          device_config=device_config,
                          enforce_eager=self.enforce_eager,
                          max_seq_len_to_capture=self.max_seq_len_to_capture)


def _default_batch_limits(device: torch.device) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) as vLLM picks them for LLM."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return (16384, 1024) if total >= 70 * (1 << 30) else (8192, 256)
    return 4096, 256


def _config_dtype(hf_config: Any) -> torch.dtype:
    dtype = (getattr(hf_config, "dtype", None)
             or getattr(hf_config, "torch_dtype", None) or torch.float32)
    if isinstance(dtype, str):
        dtype = _STR_TO_DTYPE.get(dtype, torch.float32)
    return dtype


def _resolve_dtype(hf_config: Any, dtype: str | torch.dtype,
                   device: torch.device) -> torch.dtype:
    """vLLM's rule: "auto" is the checkpoint's dtype, except that fp32
    checkpoints run in half precision on GPU. On the CPU "auto" is fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _STR_TO_DTYPE:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of "
                             f"{['auto', *_STR_TO_DTYPE]}.")
        return _STR_TO_DTYPE[dtype]
    if device.type != "cuda":
        return torch.float32
    config_dtype = _config_dtype(hf_config)
    if config_dtype == torch.float32:
        return (torch.bfloat16
                if torch.cuda.is_bf16_supported() else torch.float16)
    return config_dtype


def _resolve_max_model_len(hf_config: Any, max_model_len: int | None) -> int:
    """The model's own limit, or the user's value when it is not larger."""
    derived = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len",
                "seq_length", "max_sequence_length"):
        if getattr(hf_config, key, None):
            derived = int(getattr(hf_config, key))
            break
    if max_model_len is None:
        if derived is None:
            raise ValueError("The model's config gives no context length; "
                             "pass max_model_len.")
        return derived
    if (derived is not None and max_model_len > derived
            and not envs.VLLM_ALLOW_LONG_MAX_MODEL_LEN):
        raise ValueError(
            f"max_model_len={max_model_len} is larger than the model's "
            f"maximum context length ({derived}). Lower it, or set "
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 if you know the model can.")
    return max_model_len
