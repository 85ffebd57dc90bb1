"""Finding checkpoint files and streaming their tensors, one at a time.

Tensors are yielded lazily (safetensors: one ``get_tensor`` per name; torch
pickles: memory-mapped), so a checkpoint is never held twice in host memory:
each tensor is copied into its parameter and dropped before the next is read.
"""
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from vllm.logger import init_logger

logger = init_logger(__name__)

SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PT_PATTERNS = ["*.bin", "*.pt", "*.bin.index.json"]

# Files that training runs leave beside the weights; never model tensors.
_NOT_WEIGHTS = {
    "training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt",
    "scaler.pt", "rng_state.pth"
}


def default_weight_loader(param: torch.Tensor,
                          loaded_weight: torch.Tensor) -> None:
    """Copy a whole checkpoint tensor into ``param`` (cast to its dtype and
    device). Raises ValueError naming both shapes when they differ."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: checkpoint tensor has shape "
                         f"{tuple(loaded_weight.shape)}, parameter has shape "
                         f"{tuple(param.shape)}")
    with torch.no_grad():
        param.data.copy_(loaded_weight)


def _filter_by_index(files: list[str], folder: str,
                     index_name: str) -> list[str]:
    """Keep only the files an index's ``weight_map`` names (sharded
    checkpoints may sit beside other, e.g. consolidated, weight files)."""
    index_file = os.path.join(folder, index_name)
    if not os.path.isfile(index_file):
        return files
    with open(index_file) as f:
        weight_map = json.load(f)["weight_map"]
    wanted = set(weight_map.values())
    missing = sorted(name for name in wanted
                     if not os.path.isfile(os.path.join(folder, name)))
    if missing:
        raise ValueError(f"{index_file} lists weight files that are not in "
                         f"{folder}: {missing}")
    return [f for f in files if os.path.basename(f) in wanted]


def find_safetensors_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    return _filter_by_index(files, folder, SAFE_WEIGHTS_INDEX_NAME)


def find_pt_files(folder: str) -> list[str]:
    files: list[str] = []
    for pattern in ("*.bin", "*.pt"):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        files = [f for f in files if os.path.basename(f) not in _NOT_WEIGHTS]
        if files:
            break
    return _filter_by_index(files, folder, PT_WEIGHTS_INDEX_NAME)


def find_weight_files(folder: str, load_format: str) -> tuple[list[str], bool]:
    """The checkpoint files of ``folder`` and whether they are safetensors.

    ``auto`` prefers ``*.safetensors`` and falls back to ``*.bin`` / ``*.pt``;
    ``safetensors`` and ``pt`` look for their own kind only. Raises
    ValueError naming the folder and the format when nothing is found.
    """
    if load_format not in ("auto", "safetensors", "pt"):
        raise ValueError(f"load_format {load_format!r} reads no files.")
    if load_format in ("auto", "safetensors"):
        files = find_safetensors_files(folder)
        if files:
            return files, True
    if load_format in ("auto", "pt"):
        files = find_pt_files(folder)
        if files:
            return files, False
    looked_for = {
        "auto": "*.safetensors, *.bin or *.pt",
        "safetensors": "*.safetensors",
        "pt": "*.bin or *.pt",
    }[load_format]
    raise ValueError(f"No model weights found in {folder!r} for "
                     f"load_format={load_format!r} (looked for {looked_for}).")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_weights_iterator(
        files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of the files, read one by one.

    Plain reads into a fresh buffer per tensor, not a memory map: the pages of
    a map stay resident in the process until the file is closed, which would
    hold a second copy of the whole checkpoint beside the model.
    """
    for file in files:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            base = 8 + header_len
            # in file order, so that the reads are sequential
            for name, info in sorted(header.items(),
                                     key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                tensor = torch.empty(info["shape"],
                                     dtype=_SAFETENSORS_DTYPES[info["dtype"]])
                if end > begin:
                    f.seek(base + begin)
                    buffer = tensor.reshape(-1).view(torch.uint8).numpy()
                    if f.readinto(buffer.data) != end - begin:
                        raise ValueError(f"{file} is truncated: tensor {name} "
                                         "ends past the end of the file.")
                yield name, tensor


def _torch_load(file: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file,
                          map_location="cpu",
                          weights_only=True,
                          mmap=True)
    except RuntimeError as err:
        # Checkpoints in torch's legacy (pre-zip) format cannot be mmapped.
        if "mmap" not in str(err):
            raise
        logger.warning("%s cannot be memory-mapped (%s); reading it whole.",
                       file, err)
        return torch.load(file, map_location="cpu", weights_only=True)


def pt_weights_iterator(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of torch-pickled checkpoints."""
    for file in files:
        state = _torch_load(file)
        if not isinstance(state, dict):
            raise ValueError(f"{file} does not hold a state dict "
                             f"(got {type(state).__name__}).")
        yield from state.items()
        del state


# (fused parameter's module name, checkpoint module name, shard id)
StackedParamsMapping = Sequence[tuple[str, str, object]]


def load_weights_into(
    module: torch.nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params_mapping: StackedParamsMapping = (),
    skip: Callable[[str], bool] | None = None,
) -> set[str]:
    """Load checkpoint tensors into ``module``'s parameters by name.

    A checkpoint name whose module-path component matches the second entry
    of a ``stacked_params_mapping`` row (e.g. ``q_proj``) goes to the fused
    parameter (``qkv_proj``) with that row's shard id; other names map to
    the parameter of the same name. Each parameter's ``weight_loader`` does
    the copy (``default_weight_loader`` when it has none).

    Returns the names of the parameters that were fully loaded: a fused
    parameter only once all of its shards were. Raises ValueError naming
    the tensor when it has no parameter, or when its shape does not fit.
    ``skip(name)`` True drops a checkpoint tensor silently.
    """
    params = dict(module.named_parameters())
    shards_needed: dict[str, set[object]] = {}
    for fused, _, shard_id in stacked_params_mapping:
        shards_needed.setdefault(fused, set()).add(shard_id)
    loaded: set[str] = set()
    shards_loaded: dict[str, set[object]] = {}
    for name, loaded_weight in weights:
        if skip is not None and skip(name):
            continue
        parts = name.split(".")
        param_name, shard_id, fused_module = name, None, None
        for fused, ckpt_module, sid in stacked_params_mapping:
            if ckpt_module in parts[:-1]:
                i = parts.index(ckpt_module)
                param_name = ".".join(parts[:i] + [fused] + parts[i + 1:])
                shard_id, fused_module = sid, fused
                break
        param = params.get(param_name)
        if param is None:
            raise ValueError(
                f"Checkpoint tensor {name!r} has no matching parameter in "
                f"{type(module).__name__} (looked for {param_name!r}).")
        weight_loader: Callable[..., None] = getattr(param, "weight_loader",
                                                     default_weight_loader)
        try:
            if fused_module is None:
                weight_loader(param, loaded_weight)
            else:
                weight_loader(param, loaded_weight, shard_id)
        except ValueError as err:
            raise ValueError(f"Cannot load checkpoint tensor {name!r} into "
                             f"parameter {param_name!r}: {err}") from err
        if fused_module is None:
            loaded.add(param_name)
        else:
            got = shards_loaded.setdefault(param_name, set())
            got.add(shard_id)
            if got == shards_needed[fused_module]:
                loaded.add(param_name)
    return loaded
