"""FlashVID (Fan et al., ICLR 2026; code: Fanziyang-v/FlashVID): one new stage,
`ADTSTreeMerge` (`type: adts_tstm`), between the shared `dyseg` stage and FastV's
`last_token_attention` at a late layer. The algorithm is in pruning/methods/flashvid.py.

The algorithm:
FlashVID's pre-LLM compression (Fan et al., ICLR 2026; code: Fanziyang-v/FlashVID), on one
segment of frames at a time:

1. ADTS (attention and diversity-based token selection): per frame, `num_selected` tokens chosen
   greedily as the farthest (max-min) from the ones already chosen under a cosine distance
   calibrated by the vision encoder's attention (and, in v2, by relevance to the segment);
2. TSTM (tree-based spatiotemporal merging): every other token links to its most similar
   non-selected token in the previous frame; links above `threshold` merge, so each tree rooted
   in the earliest frame becomes one token (the released arithmetic, `tstm` below);
3. the roots left are clustered per frame with DPC-kNN to the segment's contextual budget
   (`num_context` per frame on average); a cluster is the mean of its roots and sits at its centre.

Everything returns a plan over token indices (output row, representative token), so the stage
can change rows through `VisualTokens.merge` with these exact features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vidqa.errors import BadInput
from vidqa.pruning.core.stage import BeforeLLM, param
from vidqa.pruning.methods.fastvid import segments_from_meta
from vidqa.pruning.ops.cluster import density_rank, knn_log_density, pairwise_distances

SELECTIONS = ("attn_div_v2", "attn_div")
ATTENTION_SCALE = 1e6  # the released code scales the attention up before multiplying (float32 range)


def frame_budgets(per_frame: int, ratio: float, alpha: float) -> tuple[int, int]:
    """(selected, contextual) tokens per frame: budget = ceil(P * ratio), at least 1 (ratio is
    their retention_ratio * expansion); selected = ceil(budget * alpha); contextual = the rest."""
    budget = min(per_frame, max(1, math.ceil(per_frame * ratio - 1e-9)))  # -1e-9: 0.3125*64 is 20, not 21
    selected = math.ceil(budget * alpha - 1e-9)
    return selected, budget - selected


def cosine_distances(features: Tensor) -> Tensor:
    """(F, P, C) -> (F, P, P) float32 1 - cosine similarity within each frame."""
    normed = features / features.norm(dim=-1, keepdim=True)
    return 1.0 - normed @ normed.transpose(-1, -2)


def segment_relevance(features: Tensor, segments: list[tuple[int, int]]) -> Tensor:
    """ADTS v2's relevance r: (F, P) float32, for each token the mean over the frames of its
    segment of its dot product with that frame's mean feature. features: (F, P, C)."""
    features = features.float()
    frame_means = features.mean(dim=1)  # (F, C)
    parts = [torch.einsum("fnc,gc->fgn", features[start:end], frame_means[start:end]).mean(dim=1)
             for start, end in segments]
    return torch.cat(parts)


def adts_select(features: Tensor, attention: Tensor, count: int, selection: str = "attn_div_v2",
                segments: list[tuple[int, int]] | None = None) -> Tensor:
    """ADTS: (F, count) sorted indices of the tokens each frame keeps.

    features: (F, P, C); attention: (F, P) attention each token receives in the vision encoder;
    segments: frame ranges covering 0..F (default: one segment), which scope v2's relevance, so
    that every frame of the clip runs in one batch. Distances d(i, j) = (1 - cos(i, j)) * a_j
    (* r_j in v2, `segment_relevance`). The first pick is the j with the largest
    second-smallest d(., j); then repeatedly the j farthest from its nearest pick,
    min_s d(s, j). Ties: the lower index.
    """
    frames, per_frame, _ = features.shape
    if count <= 0:
        return torch.zeros(frames, 0, dtype=torch.long, device=features.device)
    features = features.float()
    distances = cosine_distances(features)  # (F, P, P)
    calibration = attention.float() * ATTENTION_SCALE  # (F, P)
    if selection == "attn_div_v2":
        relevance = segment_relevance(features, segments or [(0, frames)])
        distances = distances * calibration[:, None, :] * relevance[:, None, :]
    elif selection == "attn_div":
        distances = distances * calibration[:, None, :]
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    picks = torch.zeros(frames, count, dtype=torch.long, device=features.device)
    if per_frame == 1:
        return picks
    first = torch.topk(distances, k=2, dim=1, largest=False).values[:, 1, :]  # (F, P)
    picks[:, 0] = first.argmax(dim=-1)
    frame = torch.arange(frames, device=features.device)
    nearest = distances[frame, picks[:, 0]]  # (F, P) distance of every token to its nearest pick
    taken = torch.zeros(frames, per_frame, dtype=torch.bool, device=features.device)
    taken[frame, picks[:, 0]] = True
    for i in range(1, count):
        picks[:, i] = nearest.masked_fill(taken, float("-inf")).argmax(dim=-1)
        taken[frame, picks[:, i]] = True
        nearest = torch.minimum(nearest, distances[frame, picks[:, i]])
    return picks.sort(dim=-1).values


@dataclass
class TreeMerge:
    """TSTM on one segment. kept: (F, P) bool, the tree roots (non-selected tokens that did not
    merge into the previous frame); features: (F, P, C) the roots' merged features (rows of other
    tokens are meaningless); root: (F, P) long, flat index (f * P + p) of the root each
    non-selected token ended in (selected tokens: their own index); divisor: (F, P) what each
    root's sum was divided by (1 + its direct children; 1 elsewhere), so every member of a tree
    enters its root with coefficient 1 / divisor[root]."""

    kept: Tensor
    features: Tensor
    root: Tensor
    divisor: Tensor


def tstm(features: Tensor, free: Tensor, threshold: float, lower_bound: int) -> TreeMerge:
    """Tree-based spatiotemporal merging, the released arithmetic.

    features: (F, P, C); free: (F, P) bool, the tokens ADTS did not select. A free token of frame
    t >= 1 links to its most cosine-similar free token of frame t-1 and merges into it when that
    similarity exceeds `threshold`; if fewer than `lower_bound` tokens (selected ones and frame 0
    included) would stay, the threshold rises to the (F*P - lower_bound)-th largest link
    similarity, still compared strictly (so one token more than the bound stays, as released).
    Frames are folded from the last to the first: a token that stays is divided by its count
    (1 + the tokens merged DIRECTLY into it); a merging token adds its current value (its own
    features plus its children's, not yet divided) to its parent and adds 1 to the parent's
    count. So a root is sum(tree) / (1 + its direct children): a mean only for trees of depth 1
    (what Fanziyang-v/FlashVID's `spatiotemporal_compression` computes; vidqa keeps it).
    """
    frames, per_frame, _ = features.shape
    device = features.device
    normed = features.float() / features.float().norm(dim=-1, keepdim=True)
    similarity = normed[1:] @ normed[:-1].transpose(-1, -2)  # (F-1, P, P): frame t token i vs frame t-1 token j
    similarity = similarity.masked_fill(~free[1:, :, None], -1.0).masked_fill(~free[:-1, None, :], -1.0)
    best, parent = similarity.max(dim=-1)  # (F-1, P)
    best = torch.cat([best.new_full((1, per_frame), -1.0), best])  # frame 0 never merges
    parent = torch.cat([parent.new_zeros((1, per_frame)), parent])
    merges = best > threshold
    if int((~merges).sum()) < lower_bound:
        extra = frames * per_frame - lower_bound  # how many may merge
        merges = torch.zeros_like(merges)
        if extra > 0:
            soft = max(float(best.flatten().topk(extra).values[-1]), -1.0 + 1e-6)
            merges = best > soft

    merged = features.float().clone()
    counts = torch.ones(frames, per_frame, device=device)
    divisor = torch.ones(frames, per_frame, device=device)
    for t in range(frames - 1, -1, -1):
        stay = ~merges[t]
        merged[t, stay] = merged[t, stay] / counts[t, stay, None]
        divisor[t, stay] = counts[t, stay]
        counts[t, stay] = 1.0
        if t > 0:  # (a token that stays adds zero: no host sync on which tokens merge)
            weight = merges[t].to(merged.dtype)  # (P,)
            merged[t - 1].index_add_(0, parent[t], merged[t] * weight[:, None])
            counts[t - 1].index_add_(0, parent[t], weight)

    root = torch.arange(frames * per_frame, device=device).view(frames, per_frame).clone()
    for t in range(1, frames):
        root[t] = torch.where(merges[t], root[t - 1, parent[t]], root[t])
    return TreeMerge(kept=~merges & free, features=merged.to(features.dtype), root=root, divisor=divisor)


def dpc_knn_centres(x: Tensor, num_clusters: int, k: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN as FlashVID's `dpc_knn` runs it: density from the k nearest tokens counting the
    token itself; centres = the num_clusters largest delta * density; every token joins its
    nearest centre, a centre itself. Density ties go to the lower index instead of random noise.

    x: (N, C). Returns labels (N,) in [0, num_clusters) (label i = i-th best centre) and
    centres (num_clusters,) token indices.
    """
    distances = pairwise_distances(x)  # (N, N) float32, / sqrt(C)
    log_density = knn_log_density(distances, k, count_self_as_neighbour=True)
    rank = density_rank(log_density)
    denser = rank[None, :] < rank[:, None]  # [i, j]: j denser than i
    delta = torch.where(denser, distances, distances.max()).min(dim=-1).values
    score = torch.log(delta) + log_density  # log(delta * density)
    centres = torch.sort(score, descending=True, stable=True).indices[:num_clusters]
    labels = distances[:, centres].argmin(dim=-1)
    labels[centres] = torch.arange(num_clusters, device=x.device)
    return labels, centres


@dataclass
class SegmentPlan:
    """What FlashVID makes of one segment, over its F * P tokens (flat index f * P + p).

    rows: (F*P,) long, the output row of each token, -1 when dropped (numbered in the order of
    the representatives); representative: (rows,) the token whose place each row takes (a selected
    token, or a cluster's centre root); features: (rows, C) the rows' features (input dtype);
    selected: (rows,) bool, rows that are ADTS tokens; coefficients: (F*P,) float64, each token's
    weight in its row (row = sum of coefficient * token over its members: 1 for a selected token,
    1 / (tree divisor * cluster size) for a merged one), so per-token features that must follow
    the merge (Qwen3-VL's DeepStack rows) get the same arithmetic.
    """

    rows: Tensor
    representative: Tensor
    features: Tensor
    selected: Tensor
    coefficients: Tensor


def compress_segment(
    features: Tensor, attention: Tensor, num_selected: int, num_context: int,
    threshold: float = 0.8, selection: str = "attn_div_v2", picks: Tensor | None = None,
) -> SegmentPlan:
    """ADTS, TSTM and the per-frame DPC-kNN merge on one segment.

    features: (F, P, C); attention: (F, P); num_selected / num_context: per-frame budgets
    (`frame_budgets`); picks: (F, num_selected) ADTS picks when already made for the whole clip
    (`adts_select` with segments). With num_context == 0 or threshold >= 1 the released code
    keeps only the selected tokens, and so does this.
    """
    frames, per_frame, _ = features.shape
    device = features.device
    if picks is None:
        picks = adts_select(features, attention, num_selected, selection)  # (F, s)
    flat_picks = (picks + torch.arange(frames, device=device)[:, None] * per_frame).flatten()
    free = torch.ones(frames * per_frame, dtype=torch.bool, device=device)
    free[flat_picks] = False
    free = free.view(frames, per_frame)
    flat = features.reshape(frames * per_frame, -1)

    representative = [flat_picks]
    outputs = [flat[flat_picks]]
    member_of = torch.full((frames * per_frame,), -1, dtype=torch.long, device=device)  # row among this segment's outputs
    member_of[flat_picks] = torch.arange(flat_picks.shape[0], device=device)
    coefficients = torch.ones(frames * per_frame, dtype=torch.float64, device=device)
    budget = num_context * frames
    if budget > 0 and threshold < 1.0:
        tree = tstm(features, free, threshold, (num_selected + num_context) * frames)
        roots = [torch.nonzero(tree.kept[t]).flatten() for t in range(frames)]
        share = budget / max(sum(len(r) for r in roots), 1)
        root_row = torch.full((frames * per_frame,), -1, dtype=torch.long, device=device)
        root_weight = 1.0 / tree.divisor.flatten().to(torch.float64)  # (F*P,) 1 / (tree divisor * cluster size)
        row = flat_picks.shape[0]
        for t, kept in enumerate(roots):
            values = tree.features[t, kept]  # (n_t, C)
            index = kept + t * per_frame
            clusters = math.ceil(len(kept) * share)  # float arithmetic as released
            if clusters > 0 and share < 1.0:
                labels, centres = dpc_knn_centres(values, clusters, min(clusters, 7))
                sums = torch.zeros(clusters, values.shape[1], dtype=torch.float32, device=device)
                sums.index_add_(0, labels, values.float())
                sizes = torch.bincount(labels, minlength=clusters).float()
                outputs.append((sums / sizes[:, None]).to(features.dtype))
                representative.append(index[centres])
                root_row[index] = labels + row
                root_weight[index] /= sizes.to(torch.float64)[labels]
                row += clusters
            else:
                outputs.append(values)
                representative.append(index)
                root_row[index] = torch.arange(len(kept), device=device) + row
                row += len(kept)
        free_flat = free.flatten()
        member_of[free_flat] = root_row[tree.root.flatten()[free_flat]]
        coefficients[free_flat] = root_weight[tree.root.flatten()[free_flat]]
    representative = torch.cat(representative)
    order = torch.argsort(representative)  # rows in sequence order of their representative
    renumber = torch.empty_like(order)
    renumber[order] = torch.arange(order.shape[0], device=device)
    rows = torch.where(member_of >= 0, renumber[member_of.clamp(min=0)], member_of)
    selected = torch.zeros(representative.shape[0], dtype=torch.bool, device=device)
    selected[: flat_picks.shape[0]] = True
    return SegmentPlan(rows=rows, representative=representative[order], features=torch.cat(outputs)[order],
                       selected=selected[order], coefficients=coefficients)


@dataclass(frozen=True)
class ADTSTreeMerge(BeforeLLM):
    """Per segment (meta "segment" from dyseg; the whole clip without it), every frame keeps
    ceil(P * ratio) tokens: an `alpha` share chosen by ADTS from vision-encoder attention and
    diversity, the rest contextual tokens made by tree-merging the other tokens across frames
    (TSTM) and clustering what is left per frame (DPC-kNN). Each row sits at its representative
    token's place (the selected token, the cluster's centre)."""

    kind: ClassVar[str] = "adts_tstm"
    budget_param: ClassVar[str] = "ratio"  # --keep/--flops set the retained fraction per frame
    # --keep sets `ratio` to keep / (share the in-LLM stages leave): their expansion factor
    budget_with_inner_stages: ClassVar[bool] = True
    ratio: float = param(0.3125, 0.0, 1.0, "tokens kept per frame before the LLM, ceil(P * ratio) (their retention_ratio * expansion)")
    alpha: float = param(0.7, 0.0, 1.0, "share of each frame's tokens chosen by ADTS (attention + diversity); the rest are merged")
    temporal_threshold: float = param(0.8, -1.0, 1.0, "TSTM: a token merges into its most similar token of the previous frame above this cosine (1 = no contextual tokens, as released)")
    selection: str = param("attn_div_v2", help=f"ADTS variant: {' | '.join(SELECTIONS)} (v2 also weighs relevance to the segment)", choices=SELECTIONS)
    vision_layer: int = param(-1, -64, 63, "vision-encoder layer whose attention calibrates ADTS (< 0: from the feature layer)")

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise BadInput(f"{self.kind}.selection '{self.selection}' is not one of: {', '.join(SELECTIONS)}")

    def kept_at_retention(self, num_in: int, grid: tuple[int, int, int], fraction: float) -> int:
        """Tokens kept at `ratio` = `fraction` (for --keep/--flops): ceil(P * fraction) per frame, at least one.
        The clustering rounds each frame's count up, so a clip may keep up to one more per frame;
        fewer when the trees leave fewer roots than the contextual budget."""
        num_frames, rows, cols = grid
        selected, context = frame_budgets(rows * cols, fraction, self.alpha)
        return num_frames * (selected + context)

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens, "put it (after dyseg) before any stage that drops tokens")
        attention = tokens.meta.get("vision_attention")
        if attention is None:
            raise BadInput(f"stage '{self.kind}' needs vision-encoder attention, which this model did not provide")
        segment = tokens.meta.get("segment")
        segments = [(0, num_frames)] if segment is None else segments_from_meta(segment.view(num_frames, per_frame)[:, 0])
        num_selected, num_context = frame_budgets(per_frame, self.ratio, self.alpha)
        features = tokens.features.view(num_frames, per_frame, -1)
        attention = attention.view(num_frames, per_frame)
        picks = adts_select(features, attention, num_selected, self.selection, segments)  # every frame in one batch
        rows_out, representatives, merged, selected, coefficients, offset = [], [], [], [], [], 0
        for start, end in segments:
            plan = compress_segment(features[start:end], attention[start:end], num_selected, num_context,
                                    self.temporal_threshold, self.selection, picks[start:end])
            rows_out.append(torch.where(plan.rows >= 0, plan.rows + offset, plan.rows))
            representatives.append(plan.representative + start * per_frame)
            merged.append(plan.features)
            selected.append(plan.selected)
            coefficients.append(plan.coefficients)
            offset += plan.features.shape[0]
        representative = torch.cat(representatives)
        # features: the released arithmetic; the coefficients give any DeepStack rows the same sums
        out = tokens.merge(torch.cat(rows_out), offset, features=torch.cat(merged),
                           coefficients=torch.cat(coefficients), representatives=representative)
        selected = torch.cat(selected)
        state.details["flashvid"] = {
            "segments": [[int(s), int(e)] for s, e in segments],
            "per_frame": {"selected": num_selected, "contextual": num_context},
            "selected": int(selected.sum()),
            "contextual": int((~selected).sum()),
        }
        return out
