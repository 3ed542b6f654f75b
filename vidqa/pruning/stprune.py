"""STPrune, FastVID's density-based spatiotemporal pruning within DySeg segments.

Every frame keeps its `salient` tokens: the ones the vision encoder attends to most (ATS).
Every `anchor_every`-th frame of a segment, counted back from its last frame, is an anchor: it
also keeps `context` tokens, the density peaks of its remaining tokens (DPC score = distance to
the nearest denser token x local density), into which the segment's other non-salient tokens
are merged (DTM). Kept tokens keep their own index (hence their position).

Budgets, as the authors' LLaVA-OneVision code computes them, for P tokens per frame:
retain = int(P * ratio), context per frame c = int(retain * d), salient s = retain - c; a segment
of L frames has ceil(L / p) anchors, each with (c * L) // ceil(L / p) context tokens, so every
segment keeps about L * retain tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .segments import Segment


@dataclass(frozen=True)
class FramePlan:
    """Per-frame budgets, each (T,): salient tokens, context (density-peak) tokens, and whether an
    anchor merges only its own frame (`local`: its context count equals the per-frame share, as
    for a one-frame segment) or the whole segment's non-salient tokens."""

    salient: Tensor
    context: Tensor
    local: Tensor


def stprune_plan(segments: list[Segment], per_frame: int, ratio: float, context_share: float,
                 anchor_every: int) -> FramePlan:
    """FastVID's per-frame salient/context budgets (see the module docstring).

    Where the authors' code would ask an anchor for more context tokens than it has non-salient
    tokens (retain above ~P / (1 + (p - 1) d), e.g. ratio > 0.45 at d = 0.4, p = 4; their topk
    fails there), the anchor keeps all of them and the rest of its budget goes to the segment's
    other frames as extra salient tokens, one at a time from the segment's first frame.
    """
    num_frames = segments[-1][1] if segments else 0
    retain = max(1, int(per_frame * ratio))  # at least one token per frame
    share = int(retain * context_share)  # c
    salient = [retain - share] * num_frames
    context = [0] * num_frames
    local = [False] * num_frames
    for start, end in segments:
        length = end - start
        anchors = (length + anchor_every - 1) // anchor_every
        count = (share * length) // anchors
        spare = 0
        for frame in range(start, end):
            if (end - 1 - frame) % anchor_every == 0:
                room = per_frame - salient[frame]
                context[frame] = min(count, room)
                local[frame] = count == share
                spare += count - context[frame]
        frame = start
        while spare > 0 and any(salient[f] + context[f] < per_frame for f in range(start, end)):
            if salient[frame] + context[frame] < per_frame:
                salient[frame] += 1
                spare -= 1
            frame = start + (frame + 1 - start) % length
    return FramePlan(
        salient=torch.tensor(salient, dtype=torch.long),
        context=torch.tensor(context, dtype=torch.long),
        local=torch.tensor(local, dtype=torch.bool),
    )


def salient_mask(attention: Tensor, counts: Tensor) -> Tensor:
    """(T, P) bool: the top counts[t] tokens of each frame by attention (ties: lower index).

    attention: (T, P); counts: (T,) long.
    """
    order = torch.argsort(attention.float(), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(attention.shape[1], device=order.device).expand_as(order))
    return rank < counts.to(rank.device)[:, None]


def density_peak_scores(tokens: Tensor, neighbours: int = 4) -> Tensor:
    """(n,) DPC score of each token of one frame: distance to the nearest denser token times
    the local density exp(-mean squared distance to its `neighbours` nearest, self included).

    tokens: (n, C). Distances are Euclidean / sqrt(C). The densest token's distance is the
    largest pairwise distance. Equal densities are not "denser" (no random tie noise).
    """
    x = tokens.float()
    dist = torch.cdist(x, x) / x.shape[-1] ** 0.5  # (n, n)
    nearest = torch.topk(dist, k=min(neighbours, x.shape[0]), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))  # (n,)
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    return delta * density


def nearest_centres(centres: Tensor, pool: Tensor) -> Tensor:
    """(m,) long: the most cosine-similar of the (k, C) `centres` for each (m, C) `pool` token
    (the first maximum on ties)."""
    similarity = F.normalize(pool.float(), dim=-1) @ F.normalize(centres.float(), dim=-1).T  # (m, k)
    return similarity.argmax(dim=1)


def merge_into_centres(centres: Tensor, pool: Tensor, beta: float) -> Tensor:
    """DTM: every pool token joins its most cosine-similar centre; each centre becomes
    w * centre + (1 - w) * mean(its members), w = max(1 / (members + 1), beta) (w = 1 without members).

    centres: (k, C); pool: (m, C) (may contain the centres themselves). Returns (k, C) float32.
    """
    centres, pool = centres.float(), pool.float()
    assign = nearest_centres(centres, pool)
    counts = torch.bincount(assign, minlength=len(centres)).to(pool.dtype)[:, None]  # (k, 1)
    sums = torch.zeros_like(centres).index_add_(0, assign, pool)
    mean = sums / counts.clamp(min=1)
    weight = (1 / (counts + 1)).clamp(min=beta)
    return centres + (1 - weight) * (mean - centres)  # = w*centre + (1-w)*mean; exact when mean == centre


@dataclass(frozen=True)
class STPruneResult:
    """index: (k,) kept flat token indices into the (T * P) grid, increasing; features: (k, C)
    their features (context tokens merged); context: (k,) True for density-peak tokens.
    members: (T * P,) long, the row of `index` each grid token went into (kept tokens: their
    own; merged tokens: their centre's, the first anchor's where several anchors of a segment
    merged it; -1: dropped)."""

    index: Tensor
    features: Tensor
    context: Tensor
    members: Tensor | None = None


def stprune(features: Tensor, attention: Tensor, segments: list[Segment], ratio: float = 0.1,
            context_share: float = 0.4, anchor_every: int = 4, beta: float = 0.6) -> STPruneResult:
    """FastVID's STPrune on a full token grid.

    features: (T, P, C) tokens as the LLM receives them; attention: (T, P) vision-encoder
    attention each token receives (ATS scores); segments: DySeg frame ranges covering 0..T.
    """
    num_frames, per_frame, _ = features.shape
    plan = stprune_plan(segments, per_frame, ratio, context_share, anchor_every)
    salient = salient_mask(attention, plan.salient)  # (T, P)
    flat = features.reshape(num_frames * per_frame, -1)
    kept = [salient.flatten().nonzero().flatten()]
    kept_features = [flat[kept[0]]]
    joined = []  # (pool tokens, the centre token each joined), per anchor in order
    for start, end in segments:
        for frame in range(start, end):
            count = int(plan.context[frame])
            if count == 0:
                continue
            candidates = (~salient[frame]).nonzero().flatten()  # increasing
            scores = density_peak_scores(features[frame, candidates])
            chosen = torch.argsort(scores, descending=True, stable=True)[:count]
            centres = candidates[chosen] + frame * per_frame
            frames = range(frame, frame + 1) if bool(plan.local[frame]) else range(start, end)
            pool = torch.cat([(~salient[f]).nonzero().flatten() + f * per_frame for f in frames])
            kept.append(centres)
            kept_features.append(merge_into_centres(flat[centres], flat[pool], beta).to(flat.dtype))
            joined.append((pool, centres[nearest_centres(flat[centres], flat[pool])]))
    index = torch.cat(kept)
    is_context = torch.ones(len(index), dtype=torch.bool, device=index.device)
    is_context[: len(kept[0])] = False
    order = torch.argsort(index)
    return STPruneResult(index=index[order], features=torch.cat(kept_features)[order], context=is_context[order],
                         members=_members(index[order], joined, len(flat)))


def _members(index: Tensor, joined: list[tuple[Tensor, Tensor]], num_tokens: int) -> Tensor:
    """(num_tokens,) the row of the sorted kept `index` each token went into, -1 if dropped: kept
    tokens are their own row; a merged token takes its centre's row from the first anchor."""
    owner = torch.full((num_tokens,), -1, dtype=torch.long, device=index.device)
    owner[index] = index
    for pool, centre in joined:
        free = owner[pool] < 0
        owner[pool[free]] = centre[free]
    rows = torch.searchsorted(index, owner.clamp(min=0))
    return torch.where(owner >= 0, rows, torch.full_like(rows, -1))
