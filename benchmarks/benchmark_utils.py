"""Helpers shared by the benchmark scripts (imported as a sibling module:
running a script puts benchmarks/ on sys.path)."""
import random


def random_lengths(num_prompts: int, input_len: int, output_len: int,
                   range_ratio: float,
                   rng: random.Random) -> list[tuple[int, int]]:
    """(input length, output length) of ``num_prompts`` random requests,
    each uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(
            f"--random-range-ratio must be in [0, 1), got {range_ratio}")

    def bounds(length: int) -> tuple[int, int]:
        lo = max(1, int(length * (1 - range_ratio)))
        return lo, max(lo, int(length * (1 + range_ratio)))

    in_lo, in_hi = bounds(input_len)
    out_lo, out_hi = bounds(output_len)
    return [(rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi))
            for _ in range(num_prompts)]
