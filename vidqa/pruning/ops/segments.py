"""Temporal segmentation of a video into scenes, and static-token detection within a scene.

A segmentation is a list of half-open frame ranges `[(start, end), ...]` that covers `0..T`
in order without gaps (`segments[0][0] == 0`, `segments[i][1] == segments[i + 1][0]`,
`segments[-1][1] == T`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from vidqa.pruning.ops.cluster import dpc_knn_padded

Segment = tuple[int, int]


def _runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal labels as `(start, end, label)`, half-open, in order."""
    runs = []
    start = 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            runs.append((start, t, labels[start]))
            start = t
    return runs


STRAY = -1  # a frame whose label is being repaired


def make_clusters_contiguous(labels: list[int], min_length: int = 2) -> list[int]:
    """Relabel frames so that clusters become contiguous runs in time (PruneVid's repair).

    The rule of PruneVid's released `refine_clusters`:
    1. For each cluster, its runs of consecutive frames. If its longest run is shorter than
       `min_length` (2: only single frames), every frame of the cluster is a stray. Otherwise
       every run as long as its longest one is kept (ALL tied longest runs, so a cluster can keep
       two separate runs) and its other runs are strays. All strays are blanked at once.
    2. The blanked stretches are filled left to right: a stretch takes the label of the longer
       of the runs right before and right after it, lengths read from the labels as they are at
       that moment (so a stretch filled earlier counts as part of its run); ties go left; a
       stretch with no neighbour on either side (every frame blank) becomes label 0.

    A filled stretch joins the neighbour whose label it takes, so every run at the end holds a
    kept run and has >= `min_length` frames, unless all frames were strays (then one run). A
    cluster may still own two runs (tied longest runs): each is its own segment.

    Args:
        labels: per-frame cluster labels (>= 0), length T.
        min_length: a cluster whose longest run is shorter than this is dissolved.

    Returns:
        per-frame labels, length T.
    """
    labels = list(labels)
    refined = list(labels)
    longest: dict[int, int] = {}
    runs = _runs(labels)
    for start, end, label in runs:
        longest[label] = max(longest.get(label, 0), end - start)
    for start, end, label in runs:
        if longest[label] < min_length or end - start < longest[label]:
            refined[start:end] = [STRAY] * (end - start)

    num_frames = len(refined)
    t = 0
    while t < num_frames:
        if refined[t] != STRAY:
            t += 1
            continue
        start = t
        while t < num_frames and refined[t] == STRAY:
            t += 1
        end = t  # blank stretch [start, end)
        left_label, left_length = _run_ending_at(refined, start - 1)
        right_label, right_length = _run_starting_at(refined, end)
        if left_length > right_length:
            new_label = left_label
        elif right_length > left_length:
            new_label = right_label
        else:
            new_label = left_label if left_label is not None else right_label
        refined[start:end] = [0 if new_label is None else new_label] * (end - start)
    return refined


def _run_ending_at(labels: list[int], last: int) -> tuple[int | None, int]:
    """(label, length) of the run of equal labels ending at index `last`; (None, 0) if none."""
    if last < 0:
        return None, 0
    first = last
    while first > 0 and labels[first - 1] == labels[last]:
        first -= 1
    return labels[last], last - first + 1


def _run_starting_at(labels: list[int], first: int) -> tuple[int | None, int]:
    """(label, length) of the run of equal labels starting at index `first`; (None, 0) if none."""
    if first >= len(labels):
        return None, 0
    end = first + 1
    while end < len(labels) and labels[end] == labels[first]:
        end += 1
    return labels[first], end - first


def labels_to_segments(labels: Tensor | list[int], min_length: int = 2) -> list[Segment]:
    """Turn per-frame cluster labels into contiguous scene segments (PruneVid post-processing).

    `make_clusters_contiguous`, then one segment per run of equal labels.

    Args:
        labels: `[T]` per-frame cluster labels (tensor or list of ints).
        min_length: minimum number of frames per segment.

    Returns:
        contiguous half-open frame ranges covering `0..T` in order, each of at least
        `min_length` frames unless there is only one; `[]` when T == 0.
    """
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    runs = _runs(make_clusters_contiguous(labels, min_length))
    return [(start, end) for start, end, _ in runs]


def prunevid_segments(
    frame_features: Tensor, cluster_ratio: float = 0.25, k: int = 7
) -> list[Segment]:
    """PruneVid temporal segmentation: DPC-KNN over frames, then contiguous segments.

    Frames are clustered with `dpc_knn(frame_features, max(1, int(T * cluster_ratio)), k)`,
    each frame counted among its own k nearest neighbours as in the released code; the clusters
    are then made contiguous in time by `make_clusters_contiguous` (see there for the rules).
    Guards where the released code has none: at least 1 cluster (it asks for 0 when T < 4 and
    fails), and k capped at T (it fails when T < k).

    Args:
        frame_features: `[T, C]` one feature per frame (typically the mean of its visual tokens).
        cluster_ratio: number of frame clusters per frame.
        k: neighbours for the DPC-KNN density.

    Returns:
        contiguous half-open frame ranges covering `0..T` in order, each of at least 2 frames
        unless T == 1; `[]` when T == 0.
    """
    if frame_features.dim() != 2:
        raise ValueError(f"expected [T, C] frame features, got shape {tuple(frame_features.shape)}")
    num_frames = frame_features.shape[0]
    if num_frames == 0:
        return []
    num_clusters = max(1, int(num_frames * cluster_ratio))
    device = frame_features.device
    # dpc_knn's clusters through the padded version (a fixed number of ops whatever T), numbered
    # by centre score: segments depend on which frames share a cluster, not on its number
    labels = dpc_knn_padded(
        frame_features[None], torch.full((1,), num_frames, device=device), torch.full((1,), num_clusters, device=device),
        k, count_self_as_neighbour=True, label_order="centre_score",
    )[0]
    return labels_to_segments(labels, min_length=2)


def cuts_to_segments(cuts: list[int], num_frames: int) -> list[Segment]:
    """Segments from sorted cut positions (a cut at t separates frames t - 1 and t).

    Args:
        cuts: sorted frame indices in `[1, num_frames)`.
        num_frames: T.

    Returns:
        contiguous half-open frame ranges covering `0..T`; `[]` when T == 0.
    """
    if num_frames == 0:
        return []
    bounds = [0, *cuts, num_frames]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def adjacent_frame_similarity(frame_features: Tensor) -> Tensor:
    """Cosine similarity of each frame's feature to the previous frame's.

    Args:
        frame_features: `[T, C]`.

    Returns:
        `[T - 1]` float32; entry `t - 1` compares frames `t - 1` and `t` (empty when T <= 1).
    """
    features = F.normalize(frame_features.float(), dim=-1)
    return (features[1:] * features[:-1]).sum(dim=-1)


def similarity_segments(
    frame_features: Tensor, tau: float = 0.9, max_segments: int = 8
) -> list[Segment]:
    """AdaTP temporal segmentation: cut wherever adjacent frames are dissimilar.

    A cut goes between frames t - 1 and t when their cosine similarity is below `tau`. If that
    gives more than `max_segments - 1` cuts, only the `max_segments - 1` cuts with the lowest
    similarity are kept (ties: the earlier cut).

    Args:
        frame_features: `[T, C]` one feature per frame.
        tau: similarity threshold.
        max_segments: maximum number of segments, >= 1.

    Returns:
        contiguous half-open frame ranges covering `0..T` in order; `[]` when T == 0.
    """
    if frame_features.dim() != 2:
        raise ValueError(f"expected [T, C] frame features, got shape {tuple(frame_features.shape)}")
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    num_frames = frame_features.shape[0]
    similarity = adjacent_frame_similarity(frame_features)  # [T - 1]
    candidates = torch.nonzero(similarity < tau).flatten()  # positions t - 1
    if candidates.numel() > max_segments - 1:
        order = torch.sort(similarity[candidates], stable=True).indices  # lowest first
        candidates = candidates[order[: max_segments - 1]]
    cuts = sorted((candidates + 1).tolist())
    return cuts_to_segments(cuts, num_frames)


def static_mask(segment_tokens: Tensor, tau: float) -> Tensor:
    """Spatial locations whose token barely changes over the frames of a segment (PruneVid).

    For each location p, the mean cosine similarity between that location's features in frames
    i and j over all pairs i < j; the location is static when this exceeds `tau`. One segment of
    `segment_static_masks`.

    Args:
        segment_tokens: `[W, P, C]` visual tokens of W frames with P locations each.
        tau: similarity threshold (strict).

    Returns:
        `[P]` bool, True for static locations; all False when W < 2.
    """
    return segment_static_masks(segment_tokens, [(0, segment_tokens.shape[0])], tau)[0]


def _segment_lengths(segments: list[Segment], device) -> Tensor:
    """`[S]` long frames per segment on `device`, copied without waiting for the device queue."""
    lengths = torch.tensor([end - start for start, end in segments], dtype=torch.long)
    return lengths.to(device, non_blocking=True)  # a blocking host-to-device copy would sync


def segment_static_masks(tokens: Tensor, segments: list[Segment], tau: float) -> Tensor:
    """`static_mask` of every segment of a video at once.

    The mean pairwise cosine of a location over a segment's W frames comes from sums, not from
    the W x W Gram matrix: with unit vectors f_1..f_W, sum over i != j of f_i . f_j is
    |sum_i f_i|^2 - sum_i |f_i|^2, so mean = that / (W (W - 1)). Per-segment sums run as one
    `segment_reduce` over the frames (sequential, deterministic on every device). Float32 like
    the pairwise mean, but summed in another order: the two agree to ~1e-7, so only a location
    whose similarity lies that close to `tau` can be classified differently by the two.

    Args:
        tokens: `[T, P, C]` visual tokens of T frames with P locations each.
        segments: contiguous half-open frame ranges covering `0..T` in order.
        tau: similarity threshold (strict).

    Returns:
        `[S, P]` bool, True for the static locations of each segment; all False in a segment of
        fewer than 2 frames.
    """
    lengths = _segment_lengths(segments, tokens.device)  # [S]
    unit = F.normalize(tokens.float(), dim=-1)  # [T, P, C]
    sums = torch.segment_reduce(unit, "sum", lengths=lengths, axis=0, unsafe=True)  # [S, P, C]
    norms = torch.segment_reduce(unit.square().sum(dim=-1), "sum", lengths=lengths, axis=0, unsafe=True)  # [S, P]
    pairs = (lengths * (lengths - 1)).clamp(min=1)[:, None]  # [S, 1] ordered pairs i != j
    mean_similarity = (sums.square().sum(dim=-1) - norms) / pairs  # [S, P]
    return (mean_similarity > tau) & (lengths >= 2)[:, None]
