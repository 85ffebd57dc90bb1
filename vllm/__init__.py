"""A from-scratch, vLLM-compatible LLM inference engine."""
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.engine.llm_engine import LLMEngine
from vllm.entrypoints.llm import LLM
from vllm.outputs import CompletionOutput, Logprob, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "LLMEngine", "AsyncLLMEngine", "EngineArgs", "SamplingParams",
    "RequestOutputKind", "RequestOutput", "CompletionOutput", "Logprob",
    "__version__"
]
