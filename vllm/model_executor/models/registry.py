"""Maps Hugging Face ``architectures`` names to model classes.

Model modules are imported lazily, on first use. An architecture whose
module is not in the tree (yet) is not listed as supported.
"""
import importlib
import importlib.util

from torch import nn

_MODELS_PACKAGE = "vllm.model_executor.models"

# architecture -> (module in vllm/model_executor/models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
}

# Hugging Face model_type -> architecture, for configs that name none.
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "opt": "OPTForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


class _ModelRegistry:

    def __init__(self) -> None:
        # architecture -> "module:Class" path or the class itself
        self._entries: dict[str, str | type[nn.Module]] = {
            arch: f"{_MODELS_PACKAGE}.{module}:{cls}"
            for arch, (module, cls) in _MODELS.items()
        }

    def register_model(self, architecture: str,
                       model_cls: "type[nn.Module] | str") -> None:
        """Add (or replace) an architecture: a class, or a lazy
        ``"package.module:ClassName"`` path."""
        if isinstance(model_cls, str) and ":" not in model_cls:
            raise ValueError("A lazy model path must look like "
                             f"'package.module:ClassName', got {model_cls!r}.")
        self._entries[architecture] = model_cls

    def _available(self, architecture: str) -> bool:
        entry = self._entries.get(architecture)
        if entry is None:
            return False
        if not isinstance(entry, str):
            return True
        module = entry.split(":")[0]
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    def get_supported_archs(self) -> list[str]:
        return sorted(a for a in self._entries if self._available(a))

    def is_supported(self, architecture: str) -> bool:
        return self._available(architecture)

    def _load(self, architecture: str) -> type[nn.Module]:
        entry = self._entries[architecture]
        if not isinstance(entry, str):
            return entry
        module_name, cls_name = entry.split(":")
        model_cls = getattr(importlib.import_module(module_name), cls_name,
                            None)
        if model_cls is None:
            raise ValueError(f"{module_name} defines no {cls_name} (registered "
                             f"for architecture {architecture}).")
        self._entries[architecture] = model_cls
        return model_cls

    def architecture_for_model_type(self, model_type: str | None) -> str | None:
        """The default architecture of a config's ``model_type`` (used when
        ``hf_config.architectures`` is empty), or None."""
        return _MODEL_TYPES.get(model_type or "")

    def resolve_model_cls(
            self, architectures: list[str] | str | None) -> type[nn.Module]:
        """The class of the first supported name in ``architectures``
        (``hf_config.architectures``); ValueError listing the supported
        architectures if there is none."""
        if isinstance(architectures, str):
            architectures = [architectures]
        architectures = list(architectures or [])
        for arch in architectures:
            if self._available(arch):
                return self._load(arch)
        if not architectures:
            raise ValueError("The model config names no architecture "
                             "(hf_config.architectures is empty); supported "
                             f"architectures: {self.get_supported_archs()}.")
        raise ValueError(
            f"Model architectures {architectures} are not supported for now. "
            f"Supported architectures: {self.get_supported_archs()}.")


ModelRegistry = _ModelRegistry()
