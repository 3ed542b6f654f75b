"""HoliTom's outer-LLM merging (Shao et al., NeurIPS 2025; code: cokeshao/HoliTom).

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

import torch
import torch.nn.functional as F
from torch import Tensor

from .cluster import density_rank, knn_log_density, pairwise_distances
from .segments import Segment


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
