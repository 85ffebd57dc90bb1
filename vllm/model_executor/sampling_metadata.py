"""The sampler's per-step inputs, as tensors on the logits' device."""
from dataclasses import dataclass

import torch

from vllm.sampling_params import SamplingParams, SamplingType


@dataclass
class SamplingMetadata:
    """Sampling inputs of one step: row i describes the i-th sequence that
    samples a token this step (row i of the logits).

    Built once per step by ``prepare``: a parameter's tensor is None when no
    row uses it, so the sampler skips that step entirely.
    """
    temperature: torch.Tensor  # [N] float32; 1.0 on greedy rows
    is_greedy: torch.Tensor  # [N] bool
    all_greedy: bool
    all_random: bool  # no greedy row
    top_p: torch.Tensor | None  # [N] float32
    top_k: torch.Tensor | None  # [N] int64; "off" is vocab_size
    min_p: torch.Tensor | None  # [N] float32
    # Row -> its request's own generator, for seeded rows only.
    generators: dict[int, torch.Generator]
    # Top logprobs to return (the batch's largest request); None: no row asked.
    max_num_logprobs: int | None
    # Positions that min_tokens forbids (row, token id): (rows [M], cols [M]).
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None
    # Kept as lists for the sampling steps that need the history.
    output_token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]

    @classmethod
    def prepare(cls, params: list[SamplingParams],
                generators: list[torch.Generator | None],
                output_token_ids: list[list[int]],
                prompt_token_ids: list[list[int]], vocab_size: int,
                device: torch.device) -> "SamplingMetadata":
        """Build the metadata of one step; every list has one entry per row.

        ``generators[i]`` is the seeded generator of row i's request (on
        ``device``), None for unseeded rows. ``vocab_size`` is the width of
        the logits.
        """
        is_greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        # Greedy rows divide by 1.0: they are sampled and then discarded.
        temperature = [
            1.0 if greedy else p.temperature
            for p, greedy in zip(params, is_greedy)
        ]
        top_k = [
            vocab_size if p.top_k == 0 else min(p.top_k, vocab_size)
            for p in params
        ]
        use_top_k = any(k < vocab_size for k in top_k)
        use_top_p = any(p.top_p < 1.0 for p in params)
        use_min_p = any(p.min_p > 0.0 for p in params)

        # -1 asks for the whole vocabulary.
        num_logprobs = [
            vocab_size if p.logprobs == -1 else min(p.logprobs, vocab_size)
            for p in params if p.logprobs is not None
        ]

        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for row, (p, output) in enumerate(zip(params, output_token_ids)):
            if len(output) < p.min_tokens:
                # Ids outside the logits can never be sampled anyway.
                cols = [t for t in p.all_stop_token_ids if t < vocab_size]
                mask_rows += [row] * len(cols)
                mask_cols += cols

        # Pinned host memory makes the copy asynchronous: no device sync.
        pin_memory = device.type == "cuda"

        def to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
            host = torch.tensor(values, dtype=dtype, pin_memory=pin_memory)
            return host.to(device, non_blocking=True)

        return cls(
            temperature=to_device(temperature, torch.float32),
            is_greedy=to_device(is_greedy, torch.bool),
            all_greedy=all(is_greedy),
            all_random=not any(is_greedy),
            top_p=(to_device([p.top_p for p in params], torch.float32)
                   if use_top_p else None),
            top_k=to_device(top_k, torch.int64) if use_top_k else None,
            min_p=(to_device([p.min_p for p in params], torch.float32)
                   if use_min_p else None),
            generators={
                row: gen
                for row, gen in enumerate(generators) if gen is not None
            },
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            min_tokens_mask=((to_device(mask_rows, torch.int64),
                              to_device(mask_cols, torch.int64))
                             if mask_rows else None),
            output_token_ids=output_token_ids,
            prompt_token_ids=prompt_token_ids,
        )
