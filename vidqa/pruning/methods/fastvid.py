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


@dataclass(frozen=True)
class FramePlan:
    """Per-frame budgets, each (T,): salient tokens, context (density-peak) tokens, and whether an
    anchor merges only its own frame (`local`: its context count equals the per-frame share, as
    for a one-frame segment) or the whole segment's non-salient tokens."""

    salient: Tensor
    context: Tensor
    local: Tensor


def frame_budgets(segments: list[Segment], per_frame: int, ratio: float, context_share: float,
                  anchor_every: int) -> tuple[list[int], list[int], list[bool]]:
    """`stprune_plan` as Python lists (salient, context, local), each of T entries: host
    arithmetic on the segment bounds, so that the budgets cost no device op and no sync."""
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
    return salient, context, local


def stprune_plan(segments: list[Segment], per_frame: int, ratio: float, context_share: float,
                 anchor_every: int) -> FramePlan:
    """FastVID's per-frame salient/context budgets (see the module docstring).

    Where the authors' code would ask an anchor for more context tokens than it has non-salient
    tokens (retain above ~P / (1 + (p - 1) d), e.g. ratio > 0.45 at d = 0.4, p = 4; their topk
    fails there), the anchor keeps all of them and the rest of its budget goes to the segment's
    other frames as extra salient tokens, one at a time from the segment's first frame.
    """
    salient, context, local = frame_budgets(segments, per_frame, ratio, context_share, anchor_every)
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


def density_peak_scores(tokens: Tensor, neighbours: int = 4, valid: Tensor | None = None) -> Tensor:
    """(..., n) DPC score of each token of a frame: distance to the nearest denser token times
    the local density exp(-mean squared distance to its `neighbours` nearest, self included).

    tokens: (..., n, C), a batch of frames scored independently; valid: (..., n) bool or None
    (all): the tokens that take part, the others neither count as neighbours nor score (-inf).
    Distances are Euclidean / sqrt(C). The densest token's distance is the largest pairwise
    distance among the valid ones. Equal densities are not "denser" (no random tie noise).
    """
    x = tokens.float()
    if valid is None:
        valid = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    dist = torch.cdist(x, x) / x.shape[-1] ** 0.5  # (..., n, n)
    k = min(neighbours, x.shape[-2])
    nearest = torch.topk(dist.masked_fill(~valid[..., None, :], float("inf")), k=k, dim=-1, largest=False).values
    # a frame with fewer than k valid tokens averages over the ones it has
    taken = valid.sum(dim=-1, keepdim=True).clamp(max=k)  # (..., 1)
    in_mean = torch.arange(k, device=x.device) < taken[..., None]  # (..., 1, k)
    density = torch.exp(-(nearest.square().masked_fill(~in_mean, 0.0).sum(dim=-1) / taken))  # (..., n)
    pair = valid[..., :, None] & valid[..., None, :]
    largest = dist.masked_fill(~pair, float("-inf")).amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    denser = (density[..., None, :] > density[..., :, None]) & valid[..., None, :]  # [i, j]: j denser than i
    delta = torch.where(denser, dist, largest).min(dim=-1).values
    return (delta * density).masked_fill(~valid, float("-inf"))


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
    counts = torch.zeros(len(centres), dtype=torch.long, device=assign.device)
    counts.index_add_(0, assign, torch.ones_like(assign))
    centre_weight, member_weight = dtm_weights(counts, beta)
    return assign, centre_weight, member_weight


def dtm_weights(counts: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(centre weight w, member weight (1 - w) / n), float64, of centres with `counts` (...,) members."""
    counts = counts.to(torch.float64)
    centre_weight = (1 / (counts + 1)).clamp(min=beta)
    return centre_weight, (1 - centre_weight) / counts.clamp(min=1)


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
    e with rows[e] == r of coefficients[e] * x[members[e]]; an entry with rows[e] == -1 feeds no
    row (the fixed-shape layout has one per (token, anchor) pair, used or not). members, rows:
    (E,) long; coefficients: (E,) float64; row r's own token index[r] is one of its members. A
    salient row is its token with coefficient 1; a context row is w * peak + (1 - w) / n * each
    member (the peak's own entry adds both when it is a member). A token may feed several rows
    (a segment with several anchors offers its tokens to every anchor's peaks); its first entry
    is for the segment's earliest anchor. num_context: how many rows are context rows.
    """

    index: Tensor
    features: Tensor
    context: Tensor
    members: Tensor
    rows: Tensor
    coefficients: Tensor
    num_context: int = 0


@dataclass(frozen=True)
class AnchorTable:
    """Which anchors pool which frames, from the host budgets (no device op).

    frames: the A anchor frames (context > 0), increasing; counts: their context tokens;
    pooled_by: per frame, the anchors (indices into `frames`, increasing) whose pool holds its
    non-salient tokens (every anchor of its segment, or only its own frame's when local),
    padded with -1 to `slots` entries.
    """

    frames: list[int]
    counts: list[int]
    pooled_by: list[list[int]]
    slots: int

    @classmethod
    def build(cls, segments: list[Segment], context: list[int], local: list[bool]) -> AnchorTable:
        frames = [f for f in range(len(context)) if context[f] > 0]
        anchor_of = {frame: a for a, frame in enumerate(frames)}
        pooled_by = []
        for start, end in segments:
            mine = [f for f in range(start, end) if f in anchor_of]
            for frame in range(start, end):
                pooled_by.append([anchor_of[f] for f in mine if not local[f] or f == frame])
        slots = max(1, max(map(len, pooled_by), default=1))
        return cls(frames, [context[f] for f in frames], [row + [-1] * (slots - len(row)) for row in pooled_by], slots)


def device_tensor(values: list, device, dtype=torch.long) -> Tensor:
    """A host list as a tensor on `device`, copied without waiting for the device's queue."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def true_positions(mask: Tensor, count: int) -> Tensor:
    """(count,) increasing positions of the True entries of a 1-D bool mask that has exactly
    `count` of them (`mask.nonzero()` without reading the count back from the device)."""
    positions = torch.arange(len(mask), device=mask.device)
    return torch.where(mask, positions, len(mask)).sort().values[:count]


def entry_sums(x: Tensor, members: Tensor, rows: Tensor, coefficients: Tensor, num_rows: int) -> Tensor:
    """(num_rows, C) x.dtype: row m = sum of coefficients[e] * x[members[e]] over the entries e
    with rows[e] == m (-1: none), accumulated in float32 in entry order, a bounded number of
    entries at a time (`tokens.affine_row_sums`' arithmetic, without dropping the -1 entries
    from the device's arrays: they go to a spare row).

    x: (N, C); members, rows: (E,) long; coefficients: (E,) float.
    """
    sums = torch.zeros(num_rows + 1, x.shape[1], dtype=torch.float32, device=x.device)
    target = torch.where(rows >= 0, rows, num_rows)
    scale = coefficients.float()
    step = max(1, CHUNK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, len(members), step):  # a few large chunks, to bound the products' memory
        part = slice(start, start + step)
        sums.index_add_(0, target[part], x[members[part]].float() * scale[part, None])
    return sums[:num_rows].to(x.dtype)


CHUNK_ELEMENTS = 1 << 24  # float32 values at once in entry_sums and nearest_centres (64 MB)


def density_peaks(features: Tensor, candidates: Tensor, counts: list[int]) -> Tensor:
    """(A, K) positions within its frame of each anchor's density peaks, best first (ties: the
    lower position), K = max(counts); slots j >= counts[a] are padding.

    features: (A, P, C) the anchor frames; candidates: (A, P) bool, their non-salient tokens.
    """
    scores = density_peak_scores(features, valid=candidates)  # (A, P), -inf off the candidates
    return torch.argsort(scores, dim=-1, descending=True, stable=True)[:, : max(counts)]


def nearest_centres(unit: Tensor, centre_unit: Tensor, pooled_by: Tensor, centre_valid: Tensor) -> Tensor:
    """(T, P, R) for every token and every anchor pooling its frame, the slot of that anchor's
    most cosine-similar centre (first maximum on ties); 0 where the anchor slot is -1.

    unit: (T, P, C) L2-normalised tokens; centre_unit: (A, K, C) normalised centres;
    pooled_by: (T, R) long anchor per frame and slot (-1: none); centre_valid: (A, K) bool.
    Runs over frames a bounded number at a time (each frame multiplies with its own anchors'
    centres: (P, C) x (C, R * K)).
    """
    num_frames, per_frame, channels = unit.shape
    slots = pooled_by.shape[1]
    width = centre_valid.shape[1]
    anchor = pooled_by.clamp(min=0)
    allowed = centre_valid[anchor] & (pooled_by >= 0)[..., None]  # (T, R, K)
    step = max(1, CHUNK_ELEMENTS // max(slots * width * (channels + per_frame), 1))  # frames per chunk
    parts = []
    for start in range(0, num_frames, step):  # a few large chunks, to bound the gathered centres' memory
        part = slice(start, start + step)
        centres = centre_unit[anchor[part]].flatten(1, 2)  # (F, R * K, C)
        similarity = torch.bmm(unit[part], centres.transpose(1, 2)).view(-1, per_frame, slots, width)
        similarity = similarity.masked_fill(~allowed[part, None], float("-inf"))
        parts.append(similarity.argmax(dim=-1))  # (F, P, R)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def stprune(features: Tensor, attention: Tensor, segments: list[Segment], ratio: float = 0.1,
            context_share: float = 0.4, anchor_every: int = 4, beta: float = 0.6) -> STPruneResult:
    """FastVID's STPrune on a full token grid.

    features: (T, P, C) tokens as the LLM receives them; attention: (T, P) vision-encoder
    attention each token receives (ATS scores); segments: DySeg frame ranges covering 0..T.

    Every anchor is handled at once: density peaks over (A, P) padded frames (the salient tokens
    masked out), and every (token, anchor pooling its frame) pair as a (T, P, R) layout, so the
    device sees a fixed number of ops and no host sync whatever the number of frames.
    """
    num_frames, per_frame, channels = features.shape
    device = features.device
    num_tokens = num_frames * per_frame
    salient_counts, context_counts, local = frame_budgets(segments, per_frame, ratio, context_share, anchor_every)
    salient = salient_mask(attention, device_tensor(salient_counts, device))  # (T, P)
    flat = features.reshape(num_tokens, channels)
    num_salient = sum(salient_counts)
    salient_index = true_positions(salient.flatten(), num_salient)
    table = AnchorTable.build(segments, context_counts, local)
    num_context = sum(table.counts)
    if num_context == 0:
        coefficients = torch.ones(num_salient, dtype=torch.float64, device=device)
        rows = torch.arange(num_salient, device=device)
        return STPruneResult(index=salient_index, features=entry_sums(flat, salient_index, rows, coefficients, num_salient),
                             context=torch.zeros(num_salient, dtype=torch.bool, device=device),
                             members=salient_index, rows=rows, coefficients=coefficients)

    # density peaks of every anchor frame's non-salient tokens, (A, K) padded to the largest count
    anchor_frames = device_tensor(table.frames, device)
    peaks = density_peaks(features[anchor_frames], ~salient[anchor_frames], table.counts)
    width = peaks.shape[1]
    centre_valid = torch.arange(width, device=device) < device_tensor(table.counts, device)[:, None]  # (A, K)
    centre = (anchor_frames[:, None] * per_frame + peaks).flatten()  # (A * K,) flat token of each slot
    centre_slots = torch.where(centre_valid.flatten(), centre, num_tokens)  # padding -> a spare entry

    # every (token, anchor pooling its frame) pair joins that anchor's most similar peak
    unit = F.normalize(flat.float(), dim=-1)
    pooled_by = device_tensor(table.pooled_by, device)  # (T, R)
    choice = nearest_centres(unit.view(num_frames, per_frame, channels), unit[centre].view(-1, width, channels),
                             pooled_by, centre_valid)  # (T, P, R)
    joins = (~salient)[..., None] & (pooled_by >= 0)[:, None, :]  # (T, P, R)
    slot = (pooled_by.clamp(min=0)[:, None, :] * width + choice).flatten()  # (T * P * R,) into A * K
    joins = joins.flatten()
    spare = centre.numel()  # a spare count/flag slot for pairs that join nothing
    counts = torch.zeros(spare + 1, dtype=torch.long, device=device)
    counts.index_add_(0, torch.where(joins, slot, spare), torch.ones_like(slot))
    centre_weight, member_weight = dtm_weights(counts[:spare], beta)
    token = torch.arange(num_tokens, device=device).repeat_interleave(table.slots)  # (T * P * R,) pair -> token
    is_self = joins & (token == centre[slot])  # a peak in its own cluster: one entry, both coefficients
    has_self = torch.zeros(spare + 1, dtype=torch.bool, device=device)
    has_self[torch.where(is_self, slot, spare)] = True
    own = torch.where(has_self[:spare], centre_weight + member_weight, centre_weight)

    # kept tokens in increasing order, and the row of each
    is_centre = torch.zeros(num_tokens + 1, dtype=torch.bool, device=device)
    is_centre[centre_slots] = True
    is_centre = is_centre[:num_tokens]
    index = true_positions(salient.flatten() | is_centre, num_salient + num_context)
    row_of = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
    row_of[index] = torch.arange(len(index), device=device)

    # entries: salient rows, then each peak's own entry, then the pairs in (token, anchor) order,
    # so each row sums its peak first and its members by increasing index
    members = torch.cat([salient_index, centre, token])
    rows = torch.cat([row_of[salient_index], torch.where(centre_valid.flatten(), row_of[centre], -1),
                      torch.where(joins & ~is_self, row_of[centre[slot]], -1)])
    coefficients = torch.cat([torch.ones(num_salient, dtype=torch.float64, device=device), own, member_weight[slot]])
    return STPruneResult(index=index, features=entry_sums(flat, members, rows, coefficients, len(index)),
                         context=is_centre[index], members=members, rows=rows, coefficients=coefficients,
                         num_context=num_context)


def frame_means(tokens) -> torch.Tensor:
    """(T, C) float32 mean feature of each frame's tokens present in `tokens` (0 for a frame with none)."""
    num_frames = tokens.grid[0]
    features = tokens.features.float()
    sums = torch.zeros(num_frames, features.shape[1], device=features.device).index_add_(0, tokens.frame, features)
    counts = torch.zeros(num_frames, dtype=torch.long, device=features.device)
    counts = counts.index_add_(0, tokens.frame, torch.ones_like(tokens.frame)).clamp(min=1)  # bincount reads its max back
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
        out = tokens.merge(result.rows, len(result.index), features=result.features, coefficients=result.coefficients,
                           members=result.members, representatives=result.index)
        state.details["stprune"] = {
            "segments": [[int(s), int(e)] for s, e in segments],
            "salient": len(result.index) - result.num_context,
            "context": result.num_context,
        }
        return out
