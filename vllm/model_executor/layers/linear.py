"""Linear layers, sharded for tensor parallelism.

Every layer keeps this rank's shard of the full weight ``[out, in]`` and gives
each parameter a ``weight_loader(param, loaded_weight[, shard_id])`` that takes
the *full* checkpoint tensor, narrows it to this rank's shard and copies it in
place. Shapes are checked first; a mismatch raises ValueError naming both.

As in vLLM, ``forward`` returns ``(output, output_bias)``: ``output_bias`` is
the bias when ``skip_bias_add=True`` (the caller adds it, e.g. fused into a
later op) and None otherwise, in which case the bias is already in ``output``.

- ``ColumnParallelLinear``: weight split along the output dim (``[out/tp, in]``).
- ``MergedColumnParallelLinear``: several column-parallel outputs fused into one
  matmul (e.g. gate_proj + up_proj); each rank holds its slice of every part.
- ``QKVParallelLinear``: q/k/v fused, split by heads; KV heads are replicated
  when there are fewer of them than ranks.
- ``RowParallelLinear``: weight split along the input dim (``[out, in/tp]``);
  partial outputs are summed across ranks (all-reduce).

All of them multiply through ``linear``: ``F.linear``, except that batches of
1..4 rows without bias may run the decode GEMV kernel instead, where it was
measured faster than cuBLAS for the weight's shape (``gemv_tuning``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from vllm.distributed import (get_tensor_model_parallel_rank,
                              get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_gather,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers import gemv_tuning
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.utils import set_weight_attrs


def linear(x: torch.Tensor,
           weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``. Decode-sized inputs (1..4 rows, no
    bias) run the GEMV kernel when it was measured faster than cuBLAS for
    this case; the result then differs from cuBLAS's only in rounding."""
    if bias is None and gemv_tuning.gemv_supports(x, weight):
        x2d = x.reshape(-1, x.shape[-1])
        if (x2d.is_contiguous() and x2d.data_ptr() % 16 == 0
                and gemv_tuning.use_gemv(x2d, weight)):
            out = gemv_tuning.gemv_linear(x2d, weight)
            return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator} "
                         "(tensor-parallel sharding needs equal shards).")
    return numerator // denominator


def _check_loaded_shape(param: torch.Tensor,
                        loaded_weight: torch.Tensor,
                        expected: tuple[int, ...],
                        what: str = "") -> None:
    if tuple(loaded_weight.shape) != tuple(expected):
        raise ValueError(
            f"shape mismatch{what}: checkpoint tensor has shape "
            f"{tuple(loaded_weight.shape)}, expected {tuple(expected)} "
            f"(this rank's parameter has shape {tuple(param.shape)})")


def _replace_dim(shape: torch.Size, dim: int, size: int) -> tuple[int, ...]:
    out = list(shape)
    out[dim] = size
    return tuple(out)


def _no_shard_id(loaded_shard_id: object, layer: nn.Module) -> None:
    if loaded_shard_id is not None:
        raise ValueError(f"{type(layer).__name__} has no shards; got "
                         f"shard_id={loaded_shard_id!r}")


class LinearBase(nn.Module):
    """Common state: sizes, dtype, tensor-parallel rank and size."""

    def __init__(self,
                 input_size: int,
                 output_size: int,
                 skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.skip_bias_add = skip_bias_add
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.prefix = prefix
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()

    def _make_param(self, *shape: int, **attrs: object) -> nn.Parameter:
        param = nn.Parameter(torch.empty(*shape, dtype=self.params_dtype),
                             requires_grad=False)
        set_weight_attrs(param, {"weight_loader": self.weight_loader, **attrs})
        return param

    def weight_loader(self,
                      param: nn.Parameter,
                      loaded_weight: torch.Tensor,
                      loaded_shard_id: object = None) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.input_size}, "
                f"out_features={self.output_size}, "
                f"bias={getattr(self, 'bias', None) is not None}, "
                f"tp_size={self.tp_size}")


class ReplicatedLinear(LinearBase):
    """A plain linear layer with the full weight on every rank."""

    def __init__(self,
                 input_size: int,
                 output_size: int,
                 bias: bool = True,
                 skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        super().__init__(input_size, output_size, skip_bias_add, params_dtype,
                         prefix)
        self.weight = self._make_param(output_size, input_size)
        self.bias = self._make_param(output_size) if bias else None

    def weight_loader(self,
                      param: nn.Parameter,
                      loaded_weight: torch.Tensor,
                      loaded_shard_id: object = None) -> None:
        _no_shard_id(loaded_shard_id, self)
        default_weight_loader(param, loaded_weight)

    def forward(self,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if self.skip_bias_add else self.bias
        output = linear(x, self.weight, bias)
        return output, (self.bias if self.skip_bias_add else None)


class ColumnParallelLinear(LinearBase):
    """Y = X A + b with A split by columns: rank r holds rows
    ``[r * out/tp, (r + 1) * out/tp)`` of the ``[out, in]`` weight.

    ``gather_output=True`` all-gathers the shards so every rank sees the full
    output; otherwise each rank returns its slice (for a row-parallel layer).
    """

    def __init__(self,
                 input_size: int,
                 output_size: int,
                 bias: bool = True,
                 gather_output: bool = False,
                 skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        super().__init__(input_size, output_size, skip_bias_add, params_dtype,
                         prefix)
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, self.tp_size)
        self.weight = self._make_param(self.output_size_per_partition,
                                       input_size,
                                       output_dim=0,
                                       input_dim=1)
        self.bias = (self._make_param(self.output_size_per_partition,
                                      output_dim=0) if bias else None)

    def weight_loader(self,
                      param: nn.Parameter,
                      loaded_weight: torch.Tensor,
                      loaded_shard_id: object = None) -> None:
        _no_shard_id(loaded_shard_id, self)
        dim = param.output_dim  # type: ignore[attr-defined]
        shard_size = param.shape[dim]
        _check_loaded_shape(
            param, loaded_weight,
            _replace_dim(param.shape, dim, shard_size * self.tp_size))
        loaded_weight = loaded_weight.narrow(dim, self.tp_rank * shard_size,
                                             shard_size)
        default_weight_loader(param, loaded_weight)

    def forward(self,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if self.skip_bias_add else self.bias
        output = linear(x, self.weight, bias)
        if self.gather_output:
            output = tensor_model_parallel_all_gather(output, dim=-1)
        return output, (self.bias if self.skip_bias_add else None)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears of the same input fused into one
    matmul. ``output_sizes`` are the full sizes of the parts; rank r's weight
    is ``[part0_r; part1_r; ...]``. Load each part with ``shard_id`` = its
    index, or the whole fused tensor with ``shard_id=None``.
    """

    def __init__(self,
                 input_size: int,
                 output_sizes: list[int],
                 bias: bool = True,
                 gather_output: bool = False,
                 skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        self.output_sizes = list(output_sizes)
        tp_size = get_tensor_model_parallel_world_size()
        for size in self.output_sizes:
            divide(size, tp_size)
        super().__init__(input_size, sum(self.output_sizes), bias,
                         gather_output, skip_bias_add, params_dtype, prefix)

    def weight_loader(self,
                      param: nn.Parameter,
                      loaded_weight: torch.Tensor,
                      loaded_shard_id: object = None) -> None:
        dim = param.output_dim  # type: ignore[attr-defined]
        if loaded_shard_id is None:
            # the whole fused tensor: split it into its parts
            _check_loaded_shape(
                param, loaded_weight,
                _replace_dim(param.shape, dim, sum(self.output_sizes)),
                " (fused tensor)")
            offset = 0
            for shard_id, size in enumerate(self.output_sizes):
                self.weight_loader(param,
                                   loaded_weight.narrow(dim, offset,
                                                        size), shard_id)
                offset += size
            return
        if not (isinstance(loaded_shard_id, int)
                and 0 <= loaded_shard_id < len(self.output_sizes)):
            raise ValueError(f"shard_id must be an int in "
                             f"[0, {len(self.output_sizes)}), got "
                             f"{loaded_shard_id!r}")
        full_size = self.output_sizes[loaded_shard_id]
        _check_loaded_shape(param, loaded_weight,
                            _replace_dim(param.shape, dim, full_size),
                            f" for shard {loaded_shard_id}")
        shard_size = full_size // self.tp_size
        shard_offset = sum(self.output_sizes[:loaded_shard_id]) // self.tp_size
        loaded_weight = loaded_weight.narrow(dim, self.tp_rank * shard_size,
                                             shard_size)
        with torch.no_grad():
            param.data.narrow(dim, shard_offset,
                              shard_size).copy_(loaded_weight)


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections fused, split across ranks by heads.

    Rank r's weight is ``[q heads of r; kv heads of r (k); (v)]``. With more
    ranks than KV heads, each KV head is replicated on ``tp / kv_heads`` ranks.
    Load with ``shard_id`` in ``"q"``, ``"k"``, ``"v"`` (or None for a tensor
    already fused in q, k, v order).
    """

    def __init__(self,
                 hidden_size: int,
                 head_size: int,
                 total_num_heads: int,
                 total_num_kv_heads: int | None = None,
                 bias: bool = True,
                 skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        self.hidden_size = hidden_size
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tensor_model_parallel_world_size()
        self.num_heads = divide(self.total_num_heads, tp_size)
        if tp_size >= self.total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, self.total_num_kv_heads)
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size  # per rank
        self.kv_size = self.num_kv_heads * head_size  # per rank
        output_size = (self.num_heads +
                       2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, False, skip_bias_add,
                         params_dtype, prefix)

    def _shard(self, shard_id: str) -> tuple[int, int, int, int]:
        """(offset in this rank's param, size, full size, index of the
        checkpoint slice this rank takes)."""
        q, kv = self.q_size, self.kv_size
        kv_full = self.total_num_kv_heads * self.head_size
        kv_index = self.tp_rank // self.num_kv_head_replicas
        return {
            "q": (0, q, self.total_num_heads * self.head_size, self.tp_rank),
            "k": (q, kv, kv_full, kv_index),
            "v": (q + kv, kv, kv_full, kv_index),
        }[shard_id]

    def weight_loader(self,
                      param: nn.Parameter,
                      loaded_weight: torch.Tensor,
                      loaded_shard_id: object = None) -> None:
        dim = param.output_dim  # type: ignore[attr-defined]
        if loaded_shard_id is None:
            # a checkpoint that already fuses q, k, v (in that order)
            q_full = self.total_num_heads * self.head_size
            kv_full = self.total_num_kv_heads * self.head_size
            _check_loaded_shape(
                param, loaded_weight,
                _replace_dim(param.shape, dim, q_full + 2 * kv_full),
                " (fused qkv tensor)")
            for shard_id, start, size in (("q", 0, q_full), ("k", q_full,
                                                             kv_full),
                                          ("v", q_full + kv_full, kv_full)):
                self.weight_loader(param,
                                   loaded_weight.narrow(dim, start,
                                                        size), shard_id)
            return
        if loaded_shard_id not in ("q", "k", "v"):
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got "
                             f"{loaded_shard_id!r}")
        offset, size, full_size, index = self._shard(loaded_shard_id)
        _check_loaded_shape(param, loaded_weight,
                            _replace_dim(param.shape, dim, full_size),
                            f" for shard {loaded_shard_id!r}")
        loaded_weight = loaded_weight.narrow(dim, index * size, size)
        with torch.no_grad():
            param.data.narrow(dim, offset, size).copy_(loaded_weight)


class RowParallelLinear(LinearBase):
    """Y = X A + b with A split by rows of ``A`` (columns of the ``[out, in]``
    weight): rank r holds ``weight[:, r * in/tp:(r + 1) * in/tp]``.

    ``input_is_parallel``: x is already this rank's slice (the output of a
    column-parallel layer); else it is split here. ``reduce_results`` sums the
    partial outputs across ranks. NOTE: the bias is added by rank 0 only, so
    the sum over ranks (here or by the caller) holds it exactly once.
    """

    def __init__(self,
                 input_size: int,
                 output_size: int,
                 bias: bool = True,
                 input_is_parallel: bool = True,
                 skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None,
                 reduce_results: bool = True,
                 prefix: str = "") -> None:
        super().__init__(input_size, output_size, skip_bias_add, params_dtype,
                         prefix)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, self.tp_size)
        self.weight = self._make_param(output_size,
                                       self.input_size_per_partition,
                                       output_dim=0,
                                       input_dim=1)
        # the bias is not sharded: every rank loads all of it
        self.bias = self._make_param(output_size) if bias else None

    def weight_loader(self,
                      param: nn.Parameter,
                      loaded_weight: torch.Tensor,
                      loaded_shard_id: object = None) -> None:
        _no_shard_id(loaded_shard_id, self)
        dim = getattr(param, "input_dim", None)
        if dim is not None:
            shard_size = param.shape[dim]
            _check_loaded_shape(
                param, loaded_weight,
                _replace_dim(param.shape, dim, shard_size * self.tp_size))
            loaded_weight = loaded_weight.narrow(dim, self.tp_rank * shard_size,
                                                 shard_size)
        default_weight_loader(param, loaded_weight)

    def forward(self,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel and self.tp_size > 1:
            x = x.chunk(self.tp_size, dim=-1)[self.tp_rank]
        bias = (None if self.skip_bias_add or self.tp_rank > 0 else self.bias)
        output = linear(x, self.weight, bias)
        if self.reduce_results:
            output = tensor_model_parallel_all_reduce(output)
        return output, (self.bias if self.skip_bias_add else None)
