"""Temporal segmentation of a video into scenes, and static-token detection within a scene.

A segmentation is a list of half-open frame ranges `[(start, end), ...]` that covers `0..T`
in order without gaps (`segments[0][0] == 0`, `segments[i][1] == segments[i + 1][0]`,
`segments[-1][1] == T`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vidqa.pruning.cluster import dpc_knn

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


def make_clusters_contiguous(labels: list[int], min_length: int = 2) -> list[int]:
    """Relabel frames so that every cluster occupies one contiguous run of >= `min_length` frames.

    Each cluster keeps its longest run of consecutive frames (ties: the earliest), provided it
    has at least `min_length` frames; every other run is a stray (so are all runs of a cluster
    whose longest run is shorter than `min_length`, as in PruneVid's `refine_clusters`). Strays
    are repaired one at a time, SHORTEST first (ties: the earliest), each relabelled to the
    label of the longer of its two neighbouring runs (ties: the earlier, left one), which merges
    it into that neighbour; runs, longest runs and strays are recomputed after every repair.
    Shortest-first lets a small fragment go first, so that the fragments around it can rejoin
    (in `A A A A B B A B B B`, the lone A becomes B and B is whole again; repairing the B B
    first would hand it to the 4 A frames on its left).

    Every repair removes at least one run, so this terminates; at the end each label forms one
    run of >= `min_length` frames (a video shorter than `min_length` stays one run). The rule
    only looks at run lengths, not features: a stray next to a scene boundary joins the
    neighbouring scene when that scene's run is longer.

    Args:
        labels: per-frame cluster labels, length T.
        min_length: minimum number of frames of a kept run.

    Returns:
        per-frame labels, length T, in which each label forms a single run.
    """
    labels = list(labels)
    while True:
        runs = _runs(labels)
        if len(runs) <= 1:
            return labels
        longest: dict[int, int] = {}  # label -> index into runs of its longest run
        for i, (start, end, label) in enumerate(runs):
            best = longest.get(label)
            if best is None or end - start > runs[best][1] - runs[best][0]:
                longest[label] = i
        kept = {i for i in longest.values() if runs[i][1] - runs[i][0] >= min_length}
        strays = [i for i in range(len(runs)) if i not in kept]
        if not strays:
            return labels
        stray = min(strays, key=lambda i: (runs[i][1] - runs[i][0], i))
        start, end, _ = runs[stray]
        left = runs[stray - 1] if stray > 0 else None
        right = runs[stray + 1] if stray + 1 < len(runs) else None
        if right is None or (left is not None and left[1] - left[0] >= right[1] - right[0]):
            new_label = left[2]
        else:
            new_label = right[2]
        labels[start:end] = [new_label] * (end - start)


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

    Frames are clustered with `dpc_knn(frame_features, max(1, int(T * cluster_ratio)), k)`; the
    clusters are then made contiguous in time, with runs shorter than 2 frames merged into a
    neighbour, by `make_clusters_contiguous` (see there for the exact rules).

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
    labels = dpc_knn(frame_features, num_clusters, k)
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
    i and j over all pairs i < j; the location is static when this exceeds `tau`.

    Args:
        segment_tokens: `[W, P, C]` visual tokens of W frames with P locations each.
        tau: similarity threshold (strict).

    Returns:
        `[P]` bool, True for static locations; all False when W < 2.
    """
    num_frames, num_locations, _ = segment_tokens.shape
    if num_frames < 2:
        return torch.zeros(num_locations, dtype=torch.bool, device=segment_tokens.device)
    features = F.normalize(segment_tokens.float(), dim=-1)  # [W, P, C]
    gram = torch.einsum("ipc,jpc->pij", features, features)  # [P, W, W]
    upper = torch.ones(num_frames, num_frames, dtype=torch.bool, device=gram.device).triu(1)
    mean_similarity = gram[:, upper].mean(dim=-1)  # [P]
    return mean_similarity > tau
