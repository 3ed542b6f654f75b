"""HoliTom (Shao et al., NeurIPS 2025; code: cokeshao/HoliTom): holistic token merging, as two
stages.

- `HoliTomMergeStage` (`type: holitom_merge`, before the LLM): global redundancy-aware temporal
  windows, static tokens merged over each window and clustered, each frame's dynamic tokens
  reduced to the vision-attended ones (pruning/methods/holitom.py). `ratio` is the clip's retention.
- `SimilarityMerge` (`type: similarity_merge`, inside the LLM): at layer K keep the visual tokens
  the last prompt token attends to most at layer K-1 (FastV's score) and average every other
  visual token into the kept one whose hidden state is most cosine-similar. It keeps its own
  ratio: the outer stage takes --keep/--flops (`budget_with_inner_stages`, as FlashVID's).

The algorithm:
HoliTom's outer-LLM merging (Shao et al., NeurIPS 2025; code: cokeshao/HoliTom).

1. Global redundancy-aware segmentation: with s[t, p] the cosine of location p in frames t and
   t + 1, a window [a, b] of frames makes the locations whose similarity stays above tau across
   the whole window static, and merging them over time removes (b - a) tokens per static
   location. A dynamic programme over the clip picks the partition into windows (at most
   `max_window` frames) that removes the most tokens (`static_windows`).
2. Retention: with R removed by step 1 out of N, every window keeps `ratio / ((N - R) / N)`
   (at most 1) of what is left, so the clip keeps about `ratio * N` tokens.
3. Per window: static locations are averaged over the window's frames and clustered (DPC-KNN
   centres, each token merged into its nearest centre); each frame's dynamic tokens keep the
   ones the vision encoder attends to most, and (with `context_share` d > 0) cluster the rest
   the same way. A merged token is `beta * centre + (1 - beta) * mean(its other members)`.

Everything is returned as a row assignment with per-token weights (a weighted mean of members),
which `VisualTokens.merge` applies to every per-token feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from vidqa.errors import BadInput
from vidqa.pruning.core.decoder import Selection
from vidqa.pruning.core.stage import BeforeLLM, InsideLLM, param, top_k_sorted
from vidqa.pruning.ops.cluster import density_rank, knn_log_density, pairwise_distances
from vidqa.pruning.ops.segments import Segment


def location_similarity(features: Tensor) -> Tensor:
    """(T - 1, P) float32 cosine of every location in frame t and frame t + 1; features: (T, P, C)."""
    normed = F.normalize(features.float(), dim=-1)
    return (normed[:-1] * normed[1:]).sum(dim=-1)


def removable_counts(similarity: Tensor, tau: float) -> Tensor:
    """(T, T) float32: entry [a, b] (a <= b) is the tokens merged away by making frames a..b one
    window, (b - a) x the locations whose similarity stays above tau from a to b; 0 below the
    diagonal. similarity: (T - 1, P)."""
    num_frames = similarity.shape[0] + 1
    above = (similarity > tau).to(torch.int64)  # (T - 1, P)
    counts = torch.zeros(num_frames, num_frames, dtype=torch.float32)
    for start in range(num_frames - 1):
        still_static = torch.cumprod(above[start:], dim=0).sum(dim=-1).float().cpu()  # (T - 1 - start,)
        lengths = torch.arange(1, num_frames - start, dtype=torch.float32)  # b - a for b = a+1 .. T-1
        counts[start, start + 1:] = still_static * lengths
    return counts


def static_windows(similarity: Tensor, tau: float, max_window: int) -> tuple[list[Segment], int]:
    """The partition of the clip into windows of at most `max_window` frames that merges away the
    most static tokens, as half-open frame ranges, and that number of tokens.

    best[i] = max(best[i - 1], max over w in 2..min(i + 1, max_window) of
    best[i - w] + removable[i - w + 1, i]); a longer window must do strictly better than every
    shorter choice (ties: the single frame, then the shorter window), as the released code.
    """
    num_frames = similarity.shape[0] + 1
    counts = removable_counts(similarity, tau).tolist()
    best = [0.0] * num_frames
    first = [0] * num_frames  # the window ending at frame i starts at first[i]
    for i in range(num_frames):
        value, start = (best[i - 1] if i > 0 else 0.0), i
        for width in range(2, min(i + 1, max_window) + 1):
            before = i - width
            candidate = (best[before] if before >= 0 else 0.0) + counts[before + 1][i]
            if candidate > value:
                value, start = candidate, before + 1
        best[i], first[i] = value, start
    windows, end = [], num_frames - 1
    while end >= 0:
        windows.append((first[end], end + 1))
        end = first[end] - 1
    return windows[::-1], int(best[-1]) if num_frames else 0


def density_peaks(x: Tensor, num_centres: int, k: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN centres of x (n, C): the `num_centres` tokens with the largest
    (distance to the nearest denser token) x exp(-mean squared distance to the k nearest, self
    included). Returns (centres (num_centres,) increasing, distances (n, n) float32).
    Equal densities: the lower index counts as denser (the released code adds random noise)."""
    distances = pairwise_distances(x)  # (n, n)
    log_density = knn_log_density(distances, k, count_self_as_neighbour=True)
    rank = density_rank(log_density)
    denser = rank[None, :] < rank[:, None]  # [i, j]: j denser than i
    delta = torch.where(denser, distances, distances.max()).min(dim=-1).values
    log_score = torch.log(delta) + log_density  # -inf where delta == 0
    centres = torch.sort(log_score, descending=True, stable=True).indices[:num_centres]
    return centres.sort().values, distances



def cluster_weights(distances: Tensor, centres: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Each non-centre joins its nearest centre (first on ties); a centre with m > 0 members is
    beta * itself + (1 - beta) * mean(members), else itself.

    distances: (n, n); centres: (k,) increasing. Returns (cluster (n,) in [0, k), weight (n,)
    float32) such that every cluster is the weighted mean of its tokens."""
    num_tokens = distances.shape[0]
    device = distances.device
    cluster = distances[:, centres].argmin(dim=1)  # (n,)
    is_centre = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    is_centre[centres] = True
    cluster[centres] = torch.arange(len(centres), device=device)
    members = torch.bincount(cluster[~is_centre], minlength=len(centres)).float()  # (k,)
    centre_weight = torch.where(members > 0, torch.full_like(members, beta), torch.ones_like(members))
    weight = torch.where(
        is_centre,
        centre_weight[cluster],
        (1 - beta) / members[cluster].clamp(min=1),
    )
    return cluster, weight


@dataclass(frozen=True)
class HoliTomMerge:
    """The outer-LLM result for a (T, P) token grid, flat token index t * P + p.

    rows: (T * P,) long, the output row of every token, -1 if dropped; weight: (T * P,) float32,
    its weight in its row's weighted mean; anchor: (M,) the token whose grid cell (and position)
    each row takes (the centre; a static row sits in its window's first frame); static: (M,) bool.
    windows: the segmentation; removed: tokens step 1 merges away; retention: the per-window ratio.
    """

    rows: Tensor
    weight: Tensor
    anchor: Tensor
    static: Tensor
    windows: list[Segment]
    removed: int
    retention: float

    @property
    def num_rows(self) -> int:
        return int(self.anchor.shape[0])


class MissingAttention(ValueError):
    """The merge had to rank dynamic tokens but was given no vision-encoder attention."""


def holitom_merge(features: Tensor, attention: Tensor | None, ratio: float = 0.1, tau: float = 0.8,
                  beta: float = 0.6, context_share: float = 0.0, k: int = 7,
                  max_window: int = 1024) -> HoliTomMerge:
    """HoliTom's outer-LLM token merging (see the module docstring).

    features: (T, P, C) tokens as the LLM receives them; attention: (T, P) attention each token
    receives in the vision encoder (None is accepted while every dynamic token is kept, e.g. at
    ratio 1; otherwise MissingAttention). Rows come in the released code's order: per window, the
    static clusters (by centre location), then every frame's dynamic tokens by location.
    """
    num_frames, per_frame, _ = features.shape
    device = features.device
    similarity = location_similarity(features)  # (T - 1, P)
    windows, removed = static_windows(similarity, tau, max_window)
    total = num_frames * per_frame
    retention = min(ratio / ((total - removed) / total), 1.0)
    rows = torch.full((total,), -1, dtype=torch.long, device=device)
    weight = torch.zeros(total, dtype=torch.float32, device=device)
    anchors, static_flags = [], []
    locations = torch.arange(per_frame, device=device)

    def add_rows(tokens: Tensor, row_ids: Tensor, token_weight: Tensor, row_anchor: Tensor, static: bool):
        offset = sum(len(a) for a in anchors)
        rows[tokens] = row_ids + offset
        weight[tokens] = token_weight
        anchors.append(row_anchor)
        static_flags.append(torch.full((len(row_anchor),), static, dtype=torch.bool, device=device))

    for start, end in windows:
        width = end - start
        if width > 1:
            static = (similarity[start:end - 1] > tau).all(dim=0)  # (P,)
        else:
            static = torch.zeros(per_frame, dtype=torch.bool, device=device)
        static_at = locations[static]
        count = round(len(static_at) * retention)
        if count > 0:
            averaged = features[start:end, static_at].mean(dim=0)  # (S, C), as the released code
            centres, distances = density_peaks(averaged, count, min(k, count))
            cluster, location_weight = cluster_weights(distances, centres, beta)
            frames = torch.arange(start, end, device=device)
            tokens = (frames[:, None] * per_frame + static_at[None, :]).flatten()  # (width * S,)
            add_rows(tokens, cluster.repeat(width), (location_weight / width).repeat(width),
                     start * per_frame + static_at[centres], True)
        dynamic_at = locations[~static]
        budget = math.ceil(len(dynamic_at) * retention)
        dominant = round(budget * (1 - context_share))
        contextual = budget - dominant
        if attention is None and 0 < dominant < len(dynamic_at):
            raise MissingAttention("vision-encoder attention is needed to choose among a frame's dynamic tokens")
        for frame in range(start, end):
            flat = frame * per_frame + dynamic_at  # (D,)
            if attention is None:  # all or none of them are dominant: no ranking needed
                order = torch.arange(len(dynamic_at), device=device)
            else:
                order = torch.argsort(attention[frame, dynamic_at].float(), descending=True, stable=True)
            chosen = torch.zeros(len(dynamic_at), dtype=torch.bool, device=device)
            chosen[order[:dominant]] = True
            kept = flat[chosen]
            frame_rows = [(kept, torch.arange(len(kept), device=device), torch.ones(len(kept), device=device), kept)]
            if contextual > 0:
                rest = flat[~chosen]
                centres, distances = density_peaks(features.reshape(total, -1)[rest], contextual, min(k, contextual))
                cluster, rest_weight = cluster_weights(distances, centres, beta)
                frame_rows.append((rest, cluster + len(kept), rest_weight, rest[centres]))
            tokens = torch.cat([r[0] for r in frame_rows])
            row_ids = torch.cat([r[1] for r in frame_rows])
            anchor = torch.cat([r[3] for r in frame_rows])
            by_location = torch.argsort(anchor)  # a frame's rows by location (a no-op at d = 0), as the released grid mode
            relabel = torch.empty_like(by_location)
            relabel[by_location] = torch.arange(len(anchor), device=device)
            add_rows(tokens, relabel[row_ids], torch.cat([r[2] for r in frame_rows]), anchor[by_location], False)
    return HoliTomMerge(
        rows=rows, weight=weight, anchor=torch.cat(anchors) if anchors else rows.new_zeros(0),
        static=torch.cat(static_flags) if static_flags else torch.zeros(0, dtype=torch.bool),
        windows=windows, removed=removed, retention=retention,
    )


DETAILS_KEY = "holitom"


@dataclass(frozen=True)
class HoliTomMergeStage(BeforeLLM):
    """Outer-LLM HoliTom on the full token grid: DP windows of static locations (cosine > tau
    across the window), then per window static clusters and per frame attention-ranked dynamic
    tokens, keeping about `ratio` of the clip. Reads meta "vision_attention"."""

    kind: ClassVar[str] = "holitom_merge"
    budget_param: ClassVar[str] = "ratio"  # --keep/--flops set the retention of the clip
    budget_with_inner_stages: ClassVar[bool] = True  # the inner merge keeps its own ratio
    ratio: float = param(0.10, 0.0, 1.0, "retained fraction of the clip's tokens (RETAIN_RATIO; --keep sets it)")
    tau: float = param(0.8, 0.0, 1.01, "T: a location is static in a window when its adjacent-frame cosine stays above tau")
    beta: float = param(0.6, 0.0, 1.0, "BETA: weight of a cluster centre in its merged token (the rest: mean of its members)")
    context_share: float = param(0.0, 0.0, 1.0, "D: share of each frame's dynamic budget that is clustered instead of attention-selected")
    neighbours: int = param(7, 1, 1024, "K: DPC-KNN neighbours (at most the number of clusters)")
    max_window: int = param(1024, 1, 1 << 20, "MAX_WINDOW_SIZE: the longest window, in frames")
    vision_layer: int = param(-1, -64, 63, "vision-encoder layer whose attention ranks tokens (-1: the layer the projector reads)")

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens)
        attention = tokens.meta.get("vision_attention")
        # ratio 0 would keep nothing at all; keep at least one token of the clip
        ratio = max(self.ratio, 1.0 / len(tokens)) if len(tokens) else self.ratio
        try:
            result = holitom_merge(
                tokens.features.view(num_frames, per_frame, -1),
                None if attention is None else attention.view(num_frames, per_frame),
                ratio=ratio, tau=self.tau, beta=self.beta, context_share=self.context_share,
                k=self.neighbours, max_window=self.max_window,
            )
        except MissingAttention:
            raise BadInput(f"stage '{self.kind}' needs vision-encoder attention, which this model did not provide") from None
        if result.retention >= 1.0 and ratio * len(tokens) > result.num_rows:
            state.notes.append(
                f"holitom: the clip's static windows already merge it to {result.num_rows / len(tokens):.3f} "
                f"of its tokens, below the asked retention {ratio:.3f}; nothing else is dropped before the LLM"
            )
        merged = tokens.merge(result.rows, result.num_rows, weights=result.weight)
        anchor = result.anchor.to(tokens.frame.device)
        out = merged.replace(  # a row sits where the released code puts it: its centre (static: window's first frame)
            frame=tokens.frame[anchor], row=tokens.row[anchor], col=tokens.col[anchor],
            seq_index=tokens.seq_index[anchor],
        )
        state.details.setdefault(DETAILS_KEY, {})["outer"] = {
            "windows": [[int(s), int(e)] for s, e in result.windows],
            "static_removed": result.removed,
            "window_retention": round(result.retention, 6),
            "static_rows": int(result.static.sum()),
            "dynamic_rows": int((~result.static).sum()),
        }
        return out


def sequential_average(kept: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average every pruned state into its target, one at a time in pruned order:
    kept[t] <- (kept[t] + pruned[i]) / 2, in the states' own dtype (the released code's loop).

    kept: (k, C); pruned: (m, C); target: (m,) long in [0, k). Returns the new (k, C).
    Vectorised by rounds: round r applies every target's r-th member at once."""
    out = kept.clone()
    if len(target) == 0:
        return out
    order = torch.argsort(target, stable=True)  # grouped by target, pruned order within a group
    grouped = target[order]
    first_of_group = torch.searchsorted(grouped, grouped)  # index of each group's first member
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - first_of_group
    for round_index in range(int(rank.max()) + 1):
        now = rank == round_index
        rows = target[now]
        out[rows] = (out[rows] + pruned[now]) / 2
    return out


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, k) cosine similarity of a (m, C) and b (k, C), computed in their own dtype as the
    released code does (a.b / (|a| |b|)): in bfloat16 the rounding decides close calls."""
    return (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).T)


@dataclass(frozen=True)
class SimilarityMerge(InsideLLM):
    """HoliTom's inner-LLM merge: at layer K keep round(ratio * n) visual tokens by the attention
    the last prompt token pays them at layer K-1 (mean over heads); every other visual token is
    averaged into its most cosine-similar kept token (hidden states entering layer K)."""

    kind: ClassVar[str] = "similarity_merge"
    layer: int = param(21, 1, 31, "K in a 32-layer model (scaled: round(K*L/32); 21 -> the authors' 18 on 28 layers)")
    ratio: float = param(0.5, 0.0, 1.0, "fraction of the visual tokens kept from layer K on (1 - HOLITOM_r)")

    def kept_at_ratio(self, num_in, num_original, meta, ratio):
        return round(num_in * ratio)

    def select(self, context):
        visual = context.visual_rows
        scores = context.attention(context.last_row()).mean(dim=0)[0, visual]  # (v,)
        keep = top_k_sorted(scores, context.budget)
        dropped = torch.ones(len(visual), dtype=torch.bool, device=keep.device)
        dropped[keep] = False
        pruned = dropped.nonzero().flatten()  # (m,) in sequence order
        states = context.hidden[0, visual]  # (v, C)
        kept_states = states[keep]
        target = torch.zeros(0, dtype=torch.long, device=keep.device)
        if len(pruned) and len(keep):
            # candidates in decreasing score, as the released top-k lists them: equal similarities
            # (frequent in bfloat16) go to the most attended kept token
            by_score = torch.argsort(scores[keep], descending=True, stable=True)
            similarity = cosine_matrix(states[pruned], kept_states[by_score])  # (m, k)
            target = by_score[similarity.argmax(dim=1)]  # (m,) into keep
            kept_states = sequential_average(kept_states, states[pruned], target)
        elif len(pruned):  # nothing kept: the dropped tokens have nowhere to go
            pruned = pruned[:0]
        source = context.row_source[visual]
        context.state.record_merge(context.layer, source[pruned].cpu(), source[keep[target]].cpu())  # drawn by --show-kept
        context.state.details.setdefault(DETAILS_KEY, {})["inner"] = {
            "layer": context.layer,
            "kept": len(keep),
            "merged": len(pruned),
            # LLM-input rows: each merged token and the kept token it went into (for drawing)
            "merged_rows": source[pruned].tolist(),
            "into_rows": source[keep[target]].tolist(),
        }
        return Selection(keep=keep, kept_hidden=kept_states)
