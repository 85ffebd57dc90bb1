"""Small helpers shared by the layers, the models and the loader."""
from typing import Any

import torch


def set_weight_attrs(weight: torch.Tensor,
                     weight_attrs: dict[str, Any] | None) -> None:
    """Attach loader metadata (``weight_loader``, ``output_dim``, ...) to a
    parameter. Refuses to overwrite an attribute the tensor already has."""
    if weight_attrs is None:
        return
    for key, value in weight_attrs.items():
        if hasattr(weight, key):
            raise AttributeError(
                f"Overwriting existing tensor attribute: {key}")
        setattr(weight, key, value)


def set_random_seed(seed: int) -> None:
    """Seed torch's CPU and (when present) CUDA generators."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
