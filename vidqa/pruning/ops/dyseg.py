"""DySeg, FastVID's dynamic temporal segmentation (Shen et al., NeurIPS 2025), shared by the
presets that build on it (FastVID; FlashVID and HoliTom reuse it).

Adjacent frames are compared by the cosine similarity of one global feature per frame. A cut
goes between frames t - 1 and t when (a) their similarity is below `tau`, or (b) it is among the
`min_segments - 1` lowest similarities of the clip. (b) guarantees at least `min_segments`
segments (when the clip has that many frames); (a) adds as many more as there are scene changes.
Compare AdaTP's `segments.similarity_segments`, where the count is a MAXIMUM instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vidqa.pruning.ops.segments import Segment, adjacent_frame_similarity, cuts_to_segments


def dyseg_cuts(frame_features: Tensor, min_segments: int = 8, tau: float = 0.9) -> list[int]:
    """Sorted cut positions (a cut at t separates frames t - 1 and t).

    Args:
        frame_features: (T, C) one global feature per frame.
        min_segments: c; the c - 1 lowest-similarity cuts are always taken (all T - 1 when the
            clip is shorter). Ties among equal similarities: the earlier cut.
        tau: every adjacent pair with cosine similarity below tau is also cut.

    Returns:
        cut positions in [1, T), increasing; [] when T <= 1.
    """
    if frame_features.dim() != 2:
        raise ValueError(f"expected (T, C) frame features, got shape {tuple(frame_features.shape)}")
    if min_segments < 1:
        raise ValueError(f"min_segments must be >= 1, got {min_segments}")
    similarity = adjacent_frame_similarity(frame_features)  # (T - 1,)
    cut = similarity < tau  # (T - 1,) over pair indices t - 1
    cut[torch.argsort(similarity, stable=True)[: min_segments - 1]] = True
    return [pair + 1 for pair, is_cut in enumerate(cut.tolist()) if is_cut]  # the one read-back


def dyseg_segments(frame_features: Tensor, min_segments: int = 8, tau: float = 0.9) -> list[Segment]:
    """DySeg as half-open frame ranges [(start, end), ...] covering 0..T in order."""
    return cuts_to_segments(dyseg_cuts(frame_features, min_segments, tau), frame_features.shape[0])


def segment_of_frames(segments: list[Segment], device=None) -> Tensor:
    """(T,) segment index of every frame (built on the host: no device op reads sizes back)."""
    ids = [index for index, (start, end) in enumerate(segments) for _ in range(start, end)]
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)
