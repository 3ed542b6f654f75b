"""Token merging within temporal segments: PruneVid spatio-temporal merging, AdaTP dedup."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from vidqa.pruning.ops.cluster import cluster_means, dpc_knn, dpc_knn_padded
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
    keeps its tokens in location order either way. One segment of `prunevid_merge_video`.

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
    merged = prunevid_merge_video(
        tokens, [(0, tokens.shape[0])], static[None], cluster_ratio, k, min_tokens_to_cluster, row_order
    )
    return MergeResult(
        features=merged.features, assignment=merged.assignment, is_static=merged.is_static, frame=merged.frame
    )


@dataclass
class VideoMergeResult:
    """Output of `prunevid_merge_video` for T frames with P locations in S segments.

    Attributes:
        features: `[M, C]` merged tokens, input dtype; segment after segment, each as
            `prunevid_merge_segment` lays one out (its static rows, then each frame's dynamic rows).
        assignment: `[T, P]` long, the output row (in `[0, M)`) of every input token.
        is_static: `[M]` bool, True for rows merged from static locations.
        segment: `[M]` long, the segment of each row.
        frame: `[M]` long, the frame of a dynamic row; for a static row, its segment's first frame.
        num_static_rows: how many rows are static (a Python int).
    """

    features: Tensor
    assignment: Tensor
    is_static: Tensor
    segment: Tensor
    frame: Tensor
    num_static_rows: int

    @property
    def num_rows(self) -> int:
        return self.features.shape[0]


def prunevid_merge_video(
    tokens: Tensor,
    segments: list[Segment],
    static: Tensor,
    cluster_ratio: float = 0.5,
    k: int = 7,
    min_tokens_to_cluster: int = 14,
    row_order: str = "centre_score",
) -> VideoMergeResult:
    """`prunevid_merge_segment` for every segment of a video, in one pass over whole tensors.

    Every group (a segment's static locations, or one frame's dynamic locations) is one set of
    a padded `dpc_knn_padded` batch; a group that is not clustered (at most
    `min_tokens_to_cluster` tokens, or as many clusters as tokens) asks for as many clusters as
    it has tokens and so keeps them, in location order. One `.tolist()` of the static counts is
    the only host sync: every group's size, and so the number of rows, must be a Python int.
    Results are those of the former segment-by-segment code: the same labels, and every row the
    float32 mean of its members added in the same order (bit for bit on CPU for hidden sizes
    that are multiples of 32; see `_static_means` for the one sum whose order depends on shapes).

    Args:
        tokens: `[T, P, C]` visual tokens of T frames with P locations.
        segments: contiguous half-open frame ranges covering `0..T` in order.
        static: `[S, P]` bool, each segment's static locations (`segment_static_masks`).
        cluster_ratio, k, min_tokens_to_cluster, row_order: as in `prunevid_merge_segment`.

    Returns:
        `VideoMergeResult`.
    """
    num_frames, num_locations, channels = tokens.shape
    device = tokens.device
    plan = _MergePlan(segments, static.sum(dim=1).tolist(), num_locations, cluster_ratio, min_tokens_to_cluster)
    table = plan.table(device)  # the plan's columns as device tensors
    frame_segment = torch.repeat_interleave(
        torch.arange(len(segments), device=device), table["frames"], output_size=num_frames
    )  # [T]
    static_token = static[frame_segment]  # [T, P]
    values = tokens.float()  # [T, P, C]
    static_means = _static_means(values, table)  # [S, P, C] float32
    static_label, dynamic_label = _group_labels(plan, table, static, static_means, values, frame_segment, k, row_order)

    num_rows = plan.num_rows
    static_row = table["offset"][:, None] + static_label  # [S, P]
    frame_index = torch.arange(num_frames, device=device)
    frame_row = table["dynamic_base"][frame_segment] + frame_index * table["dynamic_rows"][frame_segment]  # [T]
    dynamic_row = frame_row[:, None] + dynamic_label  # [T, P]; frame_row: the frame's first dynamic row
    assignment = torch.where(static_token, static_row[frame_segment], dynamic_row)  # [T, P]

    row = torch.arange(num_rows, device=device)
    row_segment = torch.searchsorted(table["end"], row, right=True)  # [M]
    static_end = table["static_end"][row_segment]
    is_static = row < static_end
    # A dynamic group too small to cluster keeps its tokens: its rows start from -0.0, which
    # x + -0.0 leaves bit for bit (a -0.0 token stays -0.0), the others from 0.0 as `cluster_means`.
    copies = ~is_static & table["dynamic_kept"][row_segment].bool()
    # Row means: static rows average their locations' means over time, dynamic rows their
    # tokens; the other entries go to a dropped row M.
    static_items = static_row.masked_fill_(~static, num_rows).flatten()  # [S * P]
    dynamic_items = dynamic_row.masked_fill_(static_token, num_rows).flatten()  # [T * P]
    sums = torch.zeros(num_rows + 1, channels, dtype=torch.float32, device=device)
    sums[:num_rows].masked_fill_(copies[:, None], -0.0)
    sums.index_add_(0, static_items, static_means.view(-1, channels))
    sums.index_add_(0, dynamic_items, values.view(-1, channels))
    items = torch.cat([static_items, dynamic_items])
    counts = torch.zeros(num_rows + 1, dtype=torch.float32, device=device)
    counts.index_add_(0, items, torch.ones(1, device=device).expand(len(items)))
    features = (sums[:num_rows] / counts[:num_rows].clamp_(min=1)[:, None]).to(tokens.dtype)

    dynamic_frame = (row - static_end).div_(table["dynamic_rows_or_1"][row_segment], rounding_mode="floor")
    frame = table["start"][row_segment] + dynamic_frame.masked_fill_(is_static, 0)
    return VideoMergeResult(
        features=features, assignment=assignment, is_static=is_static, segment=row_segment, frame=frame,
        num_static_rows=plan.num_static_rows,
    )


SUM_BLOCK = 16  # frames per partial sum: the blocks torch's CPU `sum` adds a leading dim in


class _MergePlan:
    """Host-side sizes of `prunevid_merge_video`: per segment, its groups and rows (Python ints)."""

    def __init__(self, segments: list[Segment], static_counts: list[int], num_locations: int,
                 cluster_ratio: float, min_tokens_to_cluster: int):
        def groups(n: int) -> int:  # rows a group of n tokens becomes (cluster_or_keep's rule)
            return n if n <= min_tokens_to_cluster else min(max(1, int(n * cluster_ratio)), n)

        self.start = [start for start, _ in segments]
        self.frames = [end - start for start, end in segments]
        self.static = static_counts
        self.dynamic = [num_locations - count for count in static_counts]
        self.static_rows = [groups(n) for n in self.static]
        self.dynamic_rows = [groups(n) for n in self.dynamic]
        rows = [s + w * d for s, w, d in zip(self.static_rows, self.frames, self.dynamic_rows)]
        self.end = list(itertools.accumulate(rows))  # one past each segment's last row
        self.offset = [end - count for end, count in zip(self.end, rows)]  # its first row
        self.static_end = [offset + count for offset, count in zip(self.offset, self.static_rows)]
        # first dynamic row of frame t of a segment: dynamic_base + t * dynamic_rows
        self.dynamic_base = [end - start * d for end, start, d in zip(self.static_end, self.start, self.dynamic_rows)]
        self.dynamic_rows_or_1 = [max(d, 1) for d in self.dynamic_rows]
        self.dynamic_kept = [int(n <= min_tokens_to_cluster) for n in self.dynamic]  # never clustered
        self.num_rows = sum(rows)
        self.num_static_rows = sum(self.static_rows)
        self.width = max(max(self.static, default=0), max(self.dynamic, default=0))  # largest group
        # each segment's frames are summed in blocks of SUM_BLOCK (see _static_means)
        self.blocks = [-(-w // SUM_BLOCK) for w in self.frames]
        self.block_frames = [min(SUM_BLOCK, w - b) for w in self.frames for b in range(0, w, SUM_BLOCK)]

    COLUMNS = ("start", "frames", "static", "dynamic", "static_rows", "dynamic_rows", "end", "offset", "static_end",
               "dynamic_base", "dynamic_rows_or_1", "dynamic_kept", "blocks", "block_frames")

    def table(self, device) -> dict[str, Tensor]:
        """Every column as a long tensor on `device`, in one copy that does not wait for the
        device queue: `[S]` per segment, and "block_frames", the frames of each block."""
        columns = [getattr(self, name) for name in self.COLUMNS]
        flat = torch.tensor([value for column in columns for value in column], dtype=torch.long)
        flat = flat.to(device, non_blocking=True)
        return dict(zip(self.COLUMNS, flat.split([len(column) for column in columns])))


def _static_means(values: Tensor, table: dict[str, Tensor]) -> Tensor:
    """`[S, P, C]` float32 mean over each segment's frames of `values` `[T, P, C]` float32.

    Each segment is summed in blocks of `SUM_BLOCK` frames, then the blocks in order, and
    divided by its frames: the order in which `Tensor.mean(dim=0)` adds up to 255 frames on CPU
    when the other dims hold a multiple of 32 values (cascade summation), so the means equal a
    per-segment `.mean(dim=0)` bit for bit there. `segment_reduce` is sequential and
    deterministic on every device, unlike `index_add_`.
    """
    blocks = torch.segment_reduce(values, "sum", lengths=table["block_frames"], axis=0, unsafe=True)
    sums = torch.segment_reduce(blocks, "sum", lengths=table["blocks"], axis=0, unsafe=True)
    return sums / table["frames"][:, None, None]


def _group_labels(
    plan: _MergePlan, table: dict[str, Tensor], static: Tensor, static_means: Tensor, values: Tensor,
    frame_segment: Tensor, k: int, row_order: str,
) -> tuple[Tensor, Tensor]:
    """Each token's row within its group, by location.

    One padded `dpc_knn_padded` batch: set s < S is segment s's static group (its locations'
    means over time), set S + t frame t's dynamic group; a set lists its group's locations in
    increasing order. A group that is not clustered asks for as many clusters as tokens, which
    keeps them: slot i is row i.

    Returns:
        `([S, P], [T, P])` long: the static row of every location of every segment (meaningful
        at its static locations), the dynamic row of every location of every frame (meaningful at
        its segment's dynamic locations).
    """
    num_segments, num_locations = static.shape
    num_frames, _, channels = values.shape
    width = plan.width
    # each segment's static locations first, then each frame's dynamic ones (stable: increasing)
    static_order = torch.argsort(static.byte(), dim=1, descending=True, stable=True)[:, :width]  # [S, width]
    dynamic_order = torch.argsort(static.byte(), dim=1, stable=True)[frame_segment, :width]  # [T, width]
    x = torch.cat([
        static_means.gather(1, static_order[..., None].expand(-1, -1, channels)),
        values.gather(1, dynamic_order[..., None].expand(-1, -1, channels)),
    ])  # [S + T, width, C]
    lengths = torch.cat([table["static"], table["dynamic"][frame_segment]])
    clusters = torch.cat([table["static_rows"], table["dynamic_rows"][frame_segment]])
    labels = dpc_knn_padded(x, lengths, clusters, k, count_self_as_neighbour=True, label_order=row_order)
    # back to location order; slots past a set's size (-1) land on locations outside its group
    order = torch.cat([static_order, dynamic_order])
    by_location = torch.empty(num_segments + num_frames, num_locations, dtype=torch.long, device=values.device)
    by_location.scatter_(1, order, labels)
    return by_location[:num_segments], by_location[num_segments:]


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
