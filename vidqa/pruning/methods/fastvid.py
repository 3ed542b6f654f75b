"""FastVID (Shen et al., NeurIPS 2025; code: LunarShen/FastVID): dynamic density pruning before
the LLM, as two stages so that later presets can reuse the segmentation.

- `DySegStage` (`type: dyseg`): cut the clip into segments where adjacent frames' global
  features are dissimilar (below tau), plus the lowest-similarity cuts up to `min_segments`;
  annotates meta "segment" and drops nothing.
- `STPruneStage` (`type: stprune`): within each segment, every frame keeps the tokens the vision
  encoder attends to most; anchor frames also keep density-peak tokens into which the segment's
  other tokens are merged. Reads meta "segment" (one segment without DySeg before it) and meta
  "vision_attention" (the encoder layer is this stage's `vision_layer`).

The algorithm:
STPrune, FastVID's density-based spatiotemporal pruning within DySeg segments.

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
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from vidqa.errors import BadInput
from vidqa.pruning.core.stage import BeforeLLM, param
from vidqa.pruning.ops.dyseg import dyseg_segments, segment_of_frames
from vidqa.pruning.ops.segments import Segment
from vidqa.tensors.tokens import affine_row_sums


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


def centre_coefficients(centres: Tensor, pool: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """DTM as coefficients: every pool token joins its most cosine-similar centre, and centre j
    becomes w_j * centre_j + (1 - w_j) * mean(its n_j members), w_j = max(1 / (n_j + 1), beta)
    (w_j = 1 without members).

    centres: (k, C); pool: (m, C) (may contain the centres themselves). Returns assign (m,) long
    (the centre each pool token joins), centre_weight (k,) = w and member_weight (k,) = (1 - w) / n,
    float64 (so that a centre whose only member is itself gets exactly w + (1 - w) = 1).
    """
    similarity = F.normalize(pool.float(), dim=-1) @ F.normalize(centres.float(), dim=-1).T  # (m, k)
    assign = similarity.argmax(dim=1)  # (m,) first maximum on ties
    counts = torch.bincount(assign, minlength=len(centres)).to(torch.float64)  # (k,)
    centre_weight = (1 / (counts + 1)).clamp(min=beta)
    member_weight = (1 - centre_weight) / counts.clamp(min=1)
    return assign, centre_weight, member_weight


def merge_into_centres(centres: Tensor, pool: Tensor, beta: float) -> Tensor:
    """(k, C) float32: the merged centres of `centre_coefficients` (centres (k, C), pool (m, C))."""
    assign, centre_weight, member_weight = centre_coefficients(centres, pool, beta)
    merged = centres.float() * centre_weight.float()[:, None]
    return merged.index_add_(0, assign, pool.float() * member_weight.float()[assign][:, None])


@dataclass(frozen=True)
class STPruneResult:
    """index: (k,) kept flat token indices into the (T * P) grid, increasing; features: (k, C)
    their features (context tokens merged); context: (k,) True for density-peak tokens.

    How the rows are made, as E (token, row, coefficient) entries: row r = sum over the entries
    e with rows[e] == r of coefficients[e] * x[members[e]]. members, rows: (E,) long; coefficients:
    (E,) float64; row r's own token index[r] is one of its members. A salient row
    is its token with coefficient 1; a context row is w * peak + (1 - w) / n * each member (the
    peak's own entry adds both when it is a member). A token may feed several rows (a segment
    with several anchors offers its tokens to every anchor's peaks).
    """

    index: Tensor
    features: Tensor
    context: Tensor
    members: Tensor
    rows: Tensor
    coefficients: Tensor


def stprune(features: Tensor, attention: Tensor, segments: list[Segment], ratio: float = 0.1,
            context_share: float = 0.4, anchor_every: int = 4, beta: float = 0.6) -> STPruneResult:
    """FastVID's STPrune on a full token grid.

    features: (T, P, C) tokens as the LLM receives them; attention: (T, P) vision-encoder
    attention each token receives (ATS scores); segments: DySeg frame ranges covering 0..T.
    """
    num_frames, per_frame, _ = features.shape
    device = features.device
    plan = stprune_plan(segments, per_frame, ratio, context_share, anchor_every)
    salient = salient_mask(attention, plan.salient)  # (T, P)
    flat = features.reshape(num_frames * per_frame, -1)
    salient_index = salient.flatten().nonzero().flatten()
    kept = [salient_index]
    # entries (member token, the kept token whose row it feeds, coefficient); a salient token is its own row
    members, owners = [salient_index], [salient_index]
    coefficients = [torch.ones(len(salient_index), dtype=torch.float64, device=device)]
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
            assign, centre_weight, member_weight = centre_coefficients(flat[centres], flat[pool], beta)
            is_self = pool == centres[assign]  # a peak in its own cluster: one entry, both coefficients
            own = centre_weight.clone()
            own.index_add_(0, assign[is_self], member_weight[assign[is_self]])
            kept.append(centres)
            members += [centres, pool[~is_self]]
            owners += [centres, centres[assign[~is_self]]]
            coefficients += [own, member_weight[assign[~is_self]]]
    index = torch.cat(kept)
    is_context = torch.ones(len(index), dtype=torch.bool, device=device)
    is_context[: len(kept[0])] = False
    order = torch.argsort(index)
    index, is_context = index[order], is_context[order]
    row_of = torch.full((num_frames * per_frame,), -1, dtype=torch.long, device=device)
    row_of[index] = torch.arange(len(index), device=device)
    members, owners = torch.cat(members), torch.cat(owners)
    rows, coefficients = row_of[owners], torch.cat(coefficients)
    merged = affine_row_sums(flat, rows, len(index), coefficients, members)
    return STPruneResult(index=index, features=merged, context=is_context, members=members, rows=rows,
                         coefficients=coefficients)


def frame_means(tokens) -> torch.Tensor:
    """(T, C) float32 mean feature of each frame's tokens present in `tokens` (0 for a frame with none)."""
    num_frames = tokens.grid[0]
    features = tokens.features.float()
    sums = torch.zeros(num_frames, features.shape[1], device=features.device).index_add_(0, tokens.frame, features)
    counts = torch.bincount(tokens.frame, minlength=num_frames).clamp(min=1)
    return sums / counts[:, None].to(sums.dtype)


def segments_from_meta(segment_of_frame: torch.Tensor) -> list[tuple[int, int]]:
    """Frame ranges from a (T,) per-frame segment id (runs of equal ids, in order)."""
    ids = segment_of_frame.tolist()
    bounds = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


@dataclass(frozen=True)
class DySegStage(BeforeLLM):
    """DySeg: adjacent-frame cosine of the frames' mean features; cut below tau, and at the
    min_segments - 1 lowest similarities. Adds meta "segment" (segment id of each token's frame)."""

    kind: ClassVar[str] = "dyseg"
    min_segments: int = param(8, 1, 4096, "c: the c - 1 lowest-similarity cuts are always made (at least c segments)")
    tau: float = param(0.9, 0.0, 1.01, "also cut wherever adjacent frames' cosine is below tau")

    def apply(self, tokens, state):
        segments = dyseg_segments(frame_means(tokens), self.min_segments, self.tau)
        segment = segment_of_frames(segments, tokens.frame.device)[tokens.frame]
        state.details["dyseg"] = {"segments": [[int(s), int(e)] for s, e in segments]}
        return tokens.replace(meta={**tokens.meta, "segment": segment})


@dataclass(frozen=True)
class STPruneStage(BeforeLLM):
    """STPrune: per frame the top `(1 - d)` share of int(P * ratio) tokens by vision-encoder
    attention; every p-th frame of a segment (from its end) an anchor with the segment's density
    peaks, merged with the segment's remaining tokens (weight max(1/(n+1), beta) on the peak).
    Tokens keep their own positions."""

    kind: ClassVar[str] = "stprune"
    budget_param: ClassVar[str] = "ratio"  # --keep/--flops set the retained fraction per frame
    ratio: float = param(0.10, 0.0, 1.0, "retained fraction of each frame's tokens, int(P * ratio) (--keep sets it)")
    context_share: float = param(0.4, 0.0, 1.0, "d: share of the retained tokens that are density-peak (merged) tokens")
    anchor_every: int = param(4, 1, 1024, "p: every p-th frame of a segment, counted from its last, is an anchor")
    beta: float = param(0.6, 0.0, 1.0, "lowest weight of the density-peak token itself in its merged average")
    vision_layer: int = param(-1, -64, 63, "vision-encoder layer whose attention ranks tokens (< 0: from the feature layer)")

    def kept_at_retention(self, num_in: int, grid: tuple[int, int, int], fraction: float) -> int:
        """Tokens kept at `ratio` = `fraction` (for --keep/--flops): max(1, int(P * fraction)) per frame. The
        segments are not known yet; a segment of L frames may keep up to ceil(L/p) - 1 fewer
        (anchors get (c * L) // ceil(L / p) each)."""
        num_frames, rows, cols = grid
        return num_frames * max(1, int(rows * cols * fraction))

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens, "put it (after dyseg) before any stage that drops tokens")
        attention = tokens.meta.get("vision_attention")
        if attention is None:
            raise BadInput(f"stage '{self.kind}' needs vision-encoder attention, which this model did not provide")
        segment = tokens.meta.get("segment")
        if segment is None:
            segments = [(0, num_frames)]
        else:
            segments = segments_from_meta(segment.view(num_frames, per_frame)[:, 0])
        result = stprune(
            tokens.features.view(num_frames, per_frame, -1),
            attention.view(num_frames, per_frame),
            segments, ratio=self.ratio, context_share=self.context_share,
            anchor_every=self.anchor_every, beta=self.beta,
        )
        # each row is a coefficient combination of its members: DeepStack rows (Qwen3-VL) combine alike
        out = tokens.merge(result.rows, len(result.index), coefficients=result.coefficients,
                           members=result.members, representatives=result.index)
        state.details["stprune"] = {
            "segments": [[int(s), int(e)] for s, e in segments],
            "salient": int((~result.context).sum()),
            "context": int(result.context.sum()),
        }
        return out
