"""Integer token budgets: exact-sum rounding under caps, and AdaTP per-segment budgets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def capped_quotas(weights: Sequence[float], total: float, caps: Sequence[int]) -> list[float]:
    """Split `total` proportionally to `weights`, with entry i never above `caps[i]`.

    Water-filling: entries whose proportional share would exceed their cap are fixed at the
    cap and the rest of `total` is split among the others, repeatedly. When the entries still
    free all have zero weight, the remainder is split equally among them.

    Args:
        weights: `S` non-negative weights.
        total: amount to split, `0 <= total <= sum(caps)`.
        caps: `S` non-negative caps.

    Returns:
        `S` real quotas summing to `total` (up to float error), `0 <= quota_i <= caps[i]`.
    """
    num = len(weights)
    quotas = [0.0] * num
    free = [i for i in range(num) if caps[i] > 0]
    remaining = float(total)
    while free and remaining > 0:
        weight_sum = sum(weights[i] for i in free)
        if weight_sum > 0:
            share = {i: remaining * weights[i] / weight_sum for i in free}
        else:
            share = {i: remaining / len(free) for i in free}
        over = [i for i in free if share[i] >= caps[i]]
        if not over:
            for i in free:
                quotas[i] = share[i]
            break
        for i in over:
            quotas[i] = float(caps[i])
            remaining -= caps[i]
        free = [i for i in free if i not in over]
    return quotas


def round_to_total(
    weights: Tensor | Sequence[float], total: int, caps: Sequence[int] | None = None
) -> list[int]:
    """Round proportional shares of `total` to integers that sum exactly to `total`.

    Shares are `total * w_i / sum(w)`, capped at `caps[i]` with the excess redistributed to
    the entries with room, proportionally to their weights (`capped_quotas`). Each share is
    then floored and the units still missing go, one each, to the entries with the largest
    fractional remainders (ties: the lower index), skipping entries at their cap. If all weights
    are zero, `total` is split equally.

    Args:
        weights: `[S]` non-negative weights (tensor or sequence of floats).
        total: integer total, >= 0.
        caps: optional `S` non-negative integer caps.

    Returns:
        `S` non-negative ints with `sum == total` and `out[i] <= caps[i]`.

    Raises:
        ValueError: negative or non-finite weights, negative total, mismatched caps, or
            `total > sum(caps)`.
    """
    if isinstance(weights, Tensor):
        weights = weights.detach().double().cpu().tolist()
    weights = [float(w) for w in weights]
    num = len(weights)
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {weights}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if caps is None:
        caps = [total] * num
    caps = [int(c) for c in caps]
    if len(caps) != num:
        raise ValueError(f"got {num} weights but {len(caps)} caps")
    if any(c < 0 for c in caps):
        raise ValueError(f"caps must be non-negative, got {caps}")
    if total > sum(caps):
        raise ValueError(f"total {total} exceeds the sum of caps {sum(caps)}")

    quotas = capped_quotas(weights, total, caps)
    counts = [min(math.floor(q), c) for q, c in zip(quotas, caps)]
    remainders = [q - n for q, n in zip(quotas, counts)]
    missing = total - sum(counts)
    # Largest remainder first, lower index on ties; loop again in case float error left more
    # units missing than entries with a positive remainder.
    while missing > 0:
        order = sorted(range(num), key=lambda i: (-remainders[i], i))
        for i in order:
            if missing == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                remainders[i] -= 1.0
                missing -= 1
    while missing < 0:  # float error only: take back from the smallest remainders
        i = min((i for i in range(num) if counts[i] > 0), key=lambda i: (remainders[i], -i))
        counts[i] -= 1
        remainders[i] += 1.0
        missing += 1
    return counts


def adatp_segment_budgets(
    sizes: Sequence[int],
    relevance: Tensor | Sequence[float],
    budget: int,
    mix: float = 0.5,
    temperature: float = 0.1,
) -> list[int]:
    """AdaTP: split a token budget across segments by size and text relevance.

    `B_s = B * (mix * |s| / N + (1 - mix) * |s| exp(rel_s / T) / sum_s' |s'| exp(rel_s' / T))`
    with `N = sum |s|`, rounded with `round_to_total` and capped at `|s|`. The second term is a
    softmax over `rel / T + log|s|`, computed stably (max subtracted) in float64.

    Args:
        sizes: `S` segment sizes (tokens per segment), >= 0.
        relevance: `[S]` text relevance of each segment (a tensor, or floats already on the host).
        budget: total number of tokens to keep, `0 <= budget <= sum(sizes)`.
        mix: weight of the size-proportional term, in `[0, 1]`.
        temperature: softmax temperature, > 0.

    Returns:
        `S` ints summing to `budget`, each `<= sizes[s]`.
    """
    num_segments = len(sizes)
    if not isinstance(relevance, Tensor):
        relevance = torch.tensor(list(relevance), dtype=torch.float64)
    if relevance.numel() != num_segments:
        raise ValueError(f"got {num_segments} sizes but {relevance.numel()} relevance scores")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be non-negative, got {list(sizes)}")
    total_size = sum(sizes)
    if num_segments == 0 or total_size == 0:
        return round_to_total([1.0] * num_segments, budget, caps=list(sizes))

    size = torch.tensor(list(sizes), dtype=torch.float64)  # [S]
    logits = relevance.detach().double().cpu().flatten() / temperature + torch.log(size)  # [S]
    exp_logits = torch.exp(logits - logits.max())  # [S]; stable; 0 where size == 0
    relevant_share = exp_logits / exp_logits.sum()  # [S]
    weights = mix * size / total_size + (1.0 - mix) * relevant_share  # [S], sums to 1
    return round_to_total(weights, budget, caps=list(sizes))
