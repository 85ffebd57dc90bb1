"""Engine configuration: frozen dataclasses, each validated in ``__post_init__``.

``EngineArgs.create_engine_config()`` (vllm/engine/arg_utils.py) resolves user input
(the model's Hugging Face config, ``dtype="auto"``, default lengths) into these.
"""
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

_BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
_KV_CACHE_DTYPES = ("auto", )
_LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")


@dataclass(frozen=True)
class ModelConfig:
    """What model runs and how its numbers are laid out."""
    model: str
    tokenizer: str
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    seed: int = 0
    revision: str | None = None
    tokenizer_revision: str | None = None
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"Unsupported dtype {self.dtype}.")
        if self.max_model_len < 1:
            raise ValueError(
                f"max_model_len must be >= 1, got {self.max_model_len}.")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"Unknown load_format {self.load_format!r}; "
                             f"choose one of {_LOAD_FORMATS}.")
        if self.max_logprobs < -1:
            raise ValueError(
                f"max_logprobs must be >= -1, got {self.max_logprobs}.")

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads",
                       None) or self.num_attention_heads

    @property
    def head_size(self) -> int:
        head_dim = getattr(self.hf_config, "head_dim", None)
        return head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size and how much memory it may take."""
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4.0  # GiB of CPU memory for swapped-out blocks
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None
    cpu_kvcache_space_gib: float = 4.0  # VLLM_CPU_KVCACHE_SPACE
    enable_prefix_caching: bool = False
    # "plain" or "smart" (SmartBlockAllocator: admits by predicted length)
    block_allocator: str = "plain"

    def __post_init__(self) -> None:
        if self.block_size not in _BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {_BLOCK_SIZES}, "
                             f"got {self.block_size}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}.")
        if self.swap_space < 0:
            raise ValueError(
                f"swap_space must be >= 0 GiB, got {self.swap_space}.")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported yet "
                f"(supported: {_KV_CACHE_DTYPES}); fp8 KV caches are planned.")
        if (self.num_gpu_blocks_override is not None
                and self.num_gpu_blocks_override < 1):
            raise ValueError("num_gpu_blocks_override must be >= 1, got "
                             f"{self.num_gpu_blocks_override}.")
        if self.block_allocator not in ("plain", "smart"):
            raise ValueError(
                f"Unknown block_allocator {self.block_allocator!r};"
                " choose 'plain' or 'smart'.")
        if self.cpu_kvcache_space_gib <= 0:
            raise ValueError("VLLM_CPU_KVCACHE_SPACE must be > 0 GiB, got "
                             f"{self.cpu_kvcache_space_gib}.")


@dataclass(frozen=True)
class SchedulerConfig:
    """The per-step budget of the scheduler."""
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    # How a preempted request gives its KV cache back: freed and recomputed
    # later, or copied to CPU memory (swap_space GiB) and copied back.
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    # Priority policy: steps of waiting that improve a request's effective
    # priority by one (None: no aging).
    priority_aging_steps: int | None = 256
    # Schedule and launch step N+1 before step N's sampled tokens reach the
    # host, when no request of step N needs them on the host first
    # (LLMEngine.step): the host work then overlaps the GPU's.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(
                f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must "
                f"be >= max_num_seqs ({self.max_num_seqs}).")
        if (not self.enable_chunked_prefill
                and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is "
                f"smaller than max_model_len ({self.max_model_len}): a long "
                "prompt could never be scheduled. Raise max_num_batched_tokens, "
                "lower max_model_len or enable chunked prefill.")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"Unknown scheduling_policy {self.policy!r}; "
                             "choose 'fcfs' or 'priority'.")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"Unknown preemption_mode {self.preemption_mode!r};"
                " choose 'recompute' or 'swap'.")
        if self.priority_aging_steps is not None and self.priority_aging_steps < 1:
            raise ValueError("priority_aging_steps must be >= 1 or None, got "
                             f"{self.priority_aging_steps}.")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet "
                             f"(got {self.tensor_parallel_size}); run with 1.")


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @staticmethod
    def resolve(device: str) -> "DeviceConfig":
        """``"auto"``: CUDA when available, else the CPU."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(
                f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was asked for but CUDA is not available.")
        resolved = torch.device(device)
        if resolved.type == "cuda" and resolved.index is None:
            # torch.cuda.set_device and memory queries need an index.
            resolved = torch.device("cuda", torch.cuda.current_device())
        return DeviceConfig(resolved)


@dataclass(frozen=True)
class VllmConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device_config: DeviceConfig
    # CUDA graphs for decode batches unless enforce_eager; batches with a
    # sequence longer than max_seq_len_to_capture run eagerly.
    enforce_eager: bool = False
    max_seq_len_to_capture: int = 8192

    def __post_init__(self) -> None:
        if self.scheduler_config.max_model_len != self.model_config.max_model_len:
            raise ValueError("scheduler and model disagree on max_model_len.")
        if self.max_seq_len_to_capture < 1:
            raise ValueError("max_seq_len_to_capture must be >= 1, got "
                             f"{self.max_seq_len_to_capture}.")
