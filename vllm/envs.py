"""Every VLLM_* environment variable, parsed in one place.

Read them as attributes (``vllm.envs.VLLM_LOGGING_LEVEL``): each access reads the
environment again, so tests can monkeypatch them. Components receive values through
their config; only entry points read this module.
"""
import os
from typing import Any, Callable


def _bool(name: str, default: str) -> Callable[[], bool]:
    return lambda: os.getenv(name, default).strip().lower() in ("1", "true")


def _opt_str(name: str) -> Callable[[], str | None]:
    return lambda: os.getenv(name) or None


environment_variables: dict[str, Callable[[], Any]] = {
    # Logging: level of the "vllm" logger, whether vLLM configures it, line prefix.
    "VLLM_LOGGING_LEVEL":
    lambda: os.getenv("VLLM_LOGGING_LEVEL", "INFO").upper(),
    "VLLM_CONFIGURE_LOGGING":
    _bool("VLLM_CONFIGURE_LOGGING", "1"),
    "VLLM_LOGGING_PREFIX":
    lambda: os.getenv("VLLM_LOGGING_PREFIX", ""),
    # 1: log every Python function call of the engine to a file (debug only; slow).
    "VLLM_TRACE_FUNCTION":
    _bool("VLLM_TRACE_FUNCTION", "0"),
    # Attention backend by name (TORCH_SDPA, ...); None picks automatically.
    "VLLM_ATTENTION_BACKEND":
    _opt_str("VLLM_ATTENTION_BACKEND"),
    # GiB of KV cache when running on the CPU.
    "VLLM_CPU_KVCACHE_SPACE":
    lambda: float(os.getenv("VLLM_CPU_KVCACHE_SPACE", "4")),
    # The engine always runs in-process here; the variable is accepted for
    # compatibility with vLLM's debugging advice (0 = in-process).
    "VLLM_ENABLE_V1_MULTIPROCESSING":
    _bool("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),
    "VLLM_WORKER_MULTIPROC_METHOD":
    lambda: os.getenv("VLLM_WORKER_MULTIPROC_METHOD", "fork"),
    # Directory for torch profiler traces (LLM.start_profile / stop_profile).
    "VLLM_TORCH_PROFILER_DIR":
    _opt_str("VLLM_TORCH_PROFILER_DIR"),
    "VLLM_CACHE_ROOT":
    lambda: os.path.expanduser(
        os.getenv("VLLM_CACHE_ROOT", os.path.join("~", ".cache", "vllm"))),
    "VLLM_HOST_IP":
    lambda: os.getenv("VLLM_HOST_IP", ""),
    "VLLM_PORT":
    lambda: int(os.environ["VLLM_PORT"]) if os.getenv("VLLM_PORT") else None,
    "VLLM_API_KEY":
    _opt_str("VLLM_API_KEY"),
    "VLLM_ENGINE_ITERATION_TIMEOUT_S":
    lambda: int(os.getenv("VLLM_ENGINE_ITERATION_TIMEOUT_S", "60")),
    # Allow max_model_len above the model's max_position_embeddings.
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN":
    _bool("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0"),
    # 0: linear layers never use the decode GEMV kernel (1..4 rows), only
    # cuBLAS; read when a weight shape is first seen.
    "VLLM_GEMV":
    _bool("VLLM_GEMV", "1"),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
