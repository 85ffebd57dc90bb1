"""Build a model on its device in its dtype, then fill its parameters.

``get_model(model_config, device_config)``:
1. resolve the class from ``hf_config.architectures`` (``ModelRegistry``);
2. construct it directly on the target device with the target dtype as the
   default (no CPU copy, no fp32 detour);
3. load the weights: ``dummy`` fills every parameter with small uniform
   noise (seeded); ``auto`` / ``safetensors`` / ``pt`` stream the checkpoint
   tensors into ``model.load_weights`` one at a time;
4. check every parameter was loaded, and return the model in eval mode.
"""
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vllm.config import DeviceConfig, ModelConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.weight_utils import (
    PT_PATTERNS, SAFETENSORS_PATTERNS, find_safetensors_files,
    find_weight_files, load_weights_into, pt_weights_iterator,
    safetensors_weights_iterator)
from vllm.model_executor.models.registry import ModelRegistry

logger = init_logger(__name__)

# Dummy weights: uniform in [-_DUMMY_RANGE, _DUMMY_RANGE], small enough that
# fp16 activations stay finite through many layers.
_DUMMY_RANGE = 1e-3


@contextmanager
def set_default_torch_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make ``dtype`` the default within the block; always restored."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)


def get_model_architecture(model_config: ModelConfig) -> type[nn.Module]:
    """The model class for ``hf_config.architectures``; a config that names
    none (built in code rather than saved from a model) falls back on its
    ``model_type``."""
    hf_config = model_config.hf_config
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures:
        default = ModelRegistry.architecture_for_model_type(
            getattr(hf_config, "model_type", None))
        if default is not None:
            architectures = [default]
    return ModelRegistry.resolve_model_cls(architectures)


def initialize_model(model_config: ModelConfig,
                     device_config: DeviceConfig) -> nn.Module:
    """Construct the model on the target device, in the target dtype, with
    uninitialised parameters."""
    model_cls = get_model_architecture(model_config)
    with set_default_torch_dtype(model_config.dtype), torch.device(
            device_config.device):
        return model_cls(model_config.hf_config)


def initialize_dummy_weights(model: nn.Module,
                             seed: int = 0,
                             low: float = -_DUMMY_RANGE,
                             high: float = _DUMMY_RANGE) -> None:
    """Fill every floating-point parameter with U(low, high), reproducibly
    for a given seed and device."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for _, param in model.named_parameters():
            if not torch.is_floating_point(param):
                continue
            gen = generators.get(param.device)
            if gen is None:
                gen = torch.Generator(device=param.device).manual_seed(seed)
                generators[param.device] = gen
            if param.dtype in (torch.float16, torch.bfloat16, torch.float32,
                               torch.float64):
                param.data.uniform_(low, high, generator=gen)
            else:
                # e.g. fp8: draw in fp32, then cast
                tmp = torch.empty(param.shape,
                                  dtype=torch.float32,
                                  device=param.device)
                tmp.uniform_(low, high, generator=gen)
                param.data.copy_(tmp)


def _weights_folder(model_config: ModelConfig, load_format: str) -> str:
    """A local folder holding the checkpoint: the model path itself, or a
    Hub snapshot of only the weight files the format needs."""
    model = model_config.model
    if os.path.isdir(model):
        return model
    from vllm.transformers_utils.config import get_model_path
    revision = model_config.revision
    if load_format in ("auto", "safetensors"):
        folder = get_model_path(model, revision, SAFETENSORS_PATTERNS)
        if load_format == "safetensors" or find_safetensors_files(folder):
            return folder
    return get_model_path(model, revision, PT_PATTERNS)


def get_weights_iterator(
        model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) of every checkpoint tensor, read lazily."""
    load_format = model_config.load_format
    folder = _weights_folder(model_config, load_format)
    files, use_safetensors = find_weight_files(folder, load_format)
    logger.info("Loading weights from %d %s file(s) in %s", len(files),
                "safetensors" if use_safetensors else "torch", folder)
    if use_safetensors:
        return safetensors_weights_iterator(files)
    return pt_weights_iterator(files)


def _missing_params_error(model: nn.Module, missing: list[str]) -> ValueError:
    packed = getattr(model, "packed_modules_mapping", {})
    described = []
    for name in missing:
        parts = name.split(".")
        hint = next((packed[p] for p in parts if p in packed), None)
        described.append(
            f"{name} (checkpoint names: {', '.join(hint)})" if hint else name)
    return ValueError(f"The checkpoint of {type(model).__name__} is missing "
                      f"weights for {len(missing)} parameter(s): "
                      f"{described}")


def load_checkpoint(model: nn.Module, model_config: ModelConfig) -> None:
    """Stream the checkpoint into ``model.load_weights`` and check that every
    parameter got its value."""
    weights = get_weights_iterator(model_config)
    load_weights = getattr(model, "load_weights", None)
    with torch.no_grad():
        if load_weights is not None:
            loaded = load_weights(weights)
        else:
            # a model without its own: names must match one to one
            loaded = load_weights_into(model, weights)
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise _missing_params_error(model, missing)


def get_model(model_config: ModelConfig,
              device_config: DeviceConfig) -> nn.Module:
    """The model of ``model_config``, on ``device_config.device``, in
    ``model_config.dtype``, with its weights loaded, in eval mode."""
    model = initialize_model(model_config, device_config)
    if model_config.load_format == "dummy":
        initialize_dummy_weights(model, seed=model_config.seed)
    else:
        load_checkpoint(model, model_config)
    return model.eval()
