"""Token merging within a temporal segment: PruneVid spatio-temporal merging, AdaTP dedup."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from vidqa.pruning.ops.cluster import cluster_means, dpc_knn
from vidqa.pruning.ops.segments import Segment


@dataclass
class MergeResult:
    """Output of `prunevid_merge_segment` for one segment of W frames with P locations.

    Attributes:
        features: `[M, C]` merged tokens, input dtype: static rows first, then each frame's
            dynamic rows in frame order; within a group, rows in DPC-KNN label order (see
            `prunevid_merge_segment`).
        assignment: `[W, P]` long, the output row (in `[0, M)`) of every input token; each
            input token belongs to exactly one row. Members of row m:
            `(assignment.flatten() == m).nonzero()` as flat indices `w * P + p`. As the flat
            order is frame-major, the earliest member of every row is
            `cluster.first_member(assignment.flatten(), M)`.
        is_static: `[M]` bool, True for rows merged from static locations (their members are
            those locations in all W frames).
        frame: `[M]` long, frame within the segment that a row belongs to (0 for static rows).
    """

    features: Tensor
    assignment: Tensor
    is_static: Tensor
    frame: Tensor

    @property
    def num_rows(self) -> int:
        return self.features.shape[0]


def cluster_or_keep(
    x: Tensor,
    cluster_ratio: float,
    k: int,
    min_tokens_to_cluster: int,
    label_order: str = "centre_score",
) -> tuple[Tensor, Tensor, int]:
    """Cluster tokens with DPC-KNN into `int(N * cluster_ratio)` means, if there are enough.

    When `N > min_tokens_to_cluster`, `dpc_knn(x, max(1, int(N * cluster_ratio)), k,
    count_self_as_neighbour=True, label_order=label_order)` (PruneVid's density rule) and one
    mean per cluster, row i holding cluster i; otherwise every token is kept as its own cluster,
    in input order.

    Args:
        x: `[N, C]` tokens, or `[B, N, C]`: B sets of N tokens, each clustered on its own.
        cluster_ratio: clusters per token.
        k: DPC-KNN neighbours.
        min_tokens_to_cluster: cluster only when N is larger than this.
        label_order: `dpc_knn`'s numbering of the clusters, hence the order of the means.

    Returns:
        `(means [G, C] in x.dtype, labels [N] long in [0, G), G)`; with a batch,
        `([B, G, C], [B, N], G)`.
    """
    num_tokens = x.shape[-2]
    if num_tokens > min_tokens_to_cluster:
        num_clusters = min(max(1, int(num_tokens * cluster_ratio)), num_tokens)
        labels = dpc_knn(x, num_clusters, k, count_self_as_neighbour=True, label_order=label_order)
        return cluster_means(x, labels, num_clusters), labels, num_clusters
    labels = torch.arange(num_tokens, device=x.device).expand(x.shape[:-1])
    return x, labels, num_tokens


def prunevid_merge_segment(
    tokens: Tensor,
    static: Tensor,
    cluster_ratio: float = 0.5,
    k: int = 7,
    min_tokens_to_cluster: int = 14,
    row_order: str = "centre_score",
) -> MergeResult:
    """PruneVid stage 1 for one segment: merge static tokens over time, then cluster in space.

    Static locations are first averaged over the W frames (`[S, C]`) and then clustered with
    `cluster_or_keep`; every row is the plain mean of its members (all W frames of its
    locations, since each location contributes exactly W tokens). Each frame's dynamic
    (non-static) tokens `[D, C]` are clustered the same way. Within a group, rows come in
    `row_order`: "centre_score" (decreasing `delta * density` of the cluster centre, the order
    of the released code's `compute_cluster_vectors`) or "first_appearance" (by each cluster's
    first member, so row positions increase within the group). A group that is not clustered
    keeps its tokens in location order either way.

    Args:
        tokens: `[W, P, C]` visual tokens of the segment's W frames.
        static: `[P]` bool, static locations (see `segments.static_mask`).
        cluster_ratio: clusters per token, for both static and dynamic tokens.
        k: DPC-KNN neighbours.
        min_tokens_to_cluster: a group of at most this many tokens is kept unclustered.
        row_order: "centre_score" or "first_appearance" (above).

    Returns:
        `MergeResult` with `M = G_static + sum_w G_dynamic(w)` rows.
    """
    num_frames, num_locations, _ = tokens.shape
    device = tokens.device
    static_locations = torch.nonzero(static).flatten()  # [S]
    dynamic_locations = torch.nonzero(~static).flatten()  # [D]
    assignment = torch.empty(num_frames, num_locations, dtype=torch.long, device=device)

    static_features = tokens[:, static_locations].float().mean(dim=0)  # [S, C] float32
    static_rows, static_labels, num_static = cluster_or_keep(
        static_features, cluster_ratio, k, min_tokens_to_cluster, row_order
    )
    assignment[:, static_locations] = static_labels.unsqueeze(0)

    # Every frame has the same D dynamic locations, so all W frames cluster in one batched pass.
    dynamic_rows, dynamic_labels, num_dynamic = cluster_or_keep(
        tokens[:, dynamic_locations], cluster_ratio, k, min_tokens_to_cluster, row_order
    )  # [W, G, C], [W, D], G
    frame_offsets = num_static + num_dynamic * torch.arange(num_frames, device=device)  # [W]
    assignment[:, dynamic_locations] = dynamic_labels + frame_offsets[:, None]
    rows = [static_rows.to(tokens.dtype), dynamic_rows.reshape(-1, dynamic_rows.shape[-1])]
    frame_of_row = [
        torch.zeros(num_static, dtype=torch.long, device=device),
        torch.arange(num_frames, device=device).repeat_interleave(num_dynamic),
    ]
    offset = num_static + num_frames * num_dynamic

    is_static = torch.zeros(offset, dtype=torch.bool, device=device)
    is_static[:num_static] = True
    return MergeResult(
        features=torch.cat(rows, dim=0),
        assignment=assignment,
        is_static=is_static,
        frame=torch.cat(frame_of_row),
    )


@dataclass
class DedupResult:
    """Output of `local_dedup` for T frames with P locations.

    Attributes:
        keep: `[T, P]` bool, True for tokens that survive (the first token of each run).
        features: `[T, P, C]` input dtype; kept slots hold the mean of their run, dropped slots
            hold the original token.
        run_length: `[T, P]` long, number of tokens a kept token represents (>= 1); 0 where
            dropped.
        anchor: `[T, P]` long, flat index `t * P + p` of the kept token each token's run merged
            into (a kept token is its own anchor).
    """

    keep: Tensor
    features: Tensor
    run_length: Tensor
    anchor: Tensor


def _check_segments(segments: list[Segment], num_frames: int) -> None:
    """Raise ValueError unless `segments` are non-empty, contiguous and cover `0..T`."""
    end = 0
    for start, stop in segments:
        if start != end or stop <= start:
            raise ValueError(f"segments must be contiguous, non-empty and cover 0..T: {segments}")
        end = stop
    if end != num_frames:
        raise ValueError(f"segments must cover 0..{num_frames}, got {segments}")


def local_dedup(tokens: Tensor, segments: list[Segment], tau: float = 0.9) -> DedupResult:
    """AdaTP local debiasing: merge runs of near-identical tokens at the same location.

    Within a segment, the token at `(t, p)` (t > segment start) is a duplicate when its cosine
    similarity to the ORIGINAL token at `(t - 1, p)` is >= `tau`. A run is a maximal chain of
    duplicates following a non-duplicate (its anchor); the anchor is kept with the mean of the
    run's features and the duplicates are dropped. Runs never cross segment boundaries.

    Args:
        tokens: `[T, P, C]` visual tokens.
        segments: contiguous half-open frame ranges covering `0..T` in order.
        tau: similarity threshold.

    Returns:
        `DedupResult`.
    """
    num_frames, num_locations, channels = tokens.shape
    _check_segments(segments, num_frames)
    device = tokens.device

    normalized = F.normalize(tokens.float(), dim=-1)
    similarity = (normalized[1:] * normalized[:-1]).sum(dim=-1)  # [T - 1, P]
    duplicate = torch.zeros(num_frames, num_locations, dtype=torch.bool, device=device)
    duplicate[1:] = similarity >= tau
    segment_starts = torch.tensor([start for start, _ in segments], device=device)
    duplicate[segment_starts] = False
    keep = ~duplicate  # [T, P]

    # Anchor of every token = the latest kept frame at or before it (same location).
    frame_index = torch.arange(num_frames, device=device).unsqueeze(-1)  # [T, 1]
    anchor_frame = torch.where(keep, frame_index, -1).cummax(dim=0).values  # [T, P]
    location_index = torch.arange(num_locations, device=device)  # [P]
    anchor = (anchor_frame * num_locations + location_index).flatten()  # [T * P]

    flat_tokens = tokens.reshape(-1, channels)  # [T * P, C]
    sums = torch.zeros(num_frames * num_locations, channels, dtype=torch.float32, device=device)
    sums.index_add_(0, anchor, flat_tokens.float())
    counts = torch.bincount(anchor, minlength=num_frames * num_locations)  # [T * P]
    means = (sums / counts.clamp(min=1).unsqueeze(-1)).to(tokens.dtype)

    flat_keep = keep.flatten()
    features = torch.where(flat_keep.unsqueeze(-1), means, flat_tokens)
    return DedupResult(
        keep=keep,
        features=features.reshape(num_frames, num_locations, channels),
        run_length=counts.reshape(num_frames, num_locations),
        anchor=anchor.reshape(num_frames, num_locations),
    )
