"""Frame dedup: drop near-duplicate frames before the vision encoder, so a static shot costs one
frame (vidqa's own stage, issue #35; no paper, no model).

Each frame is shrunk to a `thumbnail` x `thumbnail` grayscale picture (area average: noise and
compression artefacts average out, a moving object does not). A unit (one frame, or a Qwen
temporal patch of two frames, whose thumbnail is its frames' mean) is compared with the LAST
KEPT unit, not the previous one, so a slow drift adds up until it counts: when the mean absolute
difference of the two thumbnails, in gray levels 0-255, is below `threshold` the unit is dropped,
else it is kept and becomes the reference. The first unit of a clip is always kept; threshold 0
keeps every unit.

The carry between chunks is the last kept unit's thumbnail, (thumbnail, thumbnail) float32, so
the selection runs the same over a clip in chunks as over the whole clip at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from vidqa.pruning.core.frame_selection import ChunkSelection
from vidqa.pruning.core.stage import BeforeEncoder, param

GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma, as cv2's RGB2GRAY


def gray_thumbnails(frames: np.ndarray, side: int) -> np.ndarray:
    """(F, side, side) float32 gray levels in [0, 255]: each RGB frame of uint8 (F, H, W, 3)
    area-averaged to side x side, then weighted to luma (in float: no rounding to 8 bits)."""
    thumbnails = np.empty((len(frames), side, side), dtype=np.float32)
    for index, frame in enumerate(frames):
        small = cv2.resize(np.ascontiguousarray(frame), (side, side), interpolation=cv2.INTER_AREA)
        thumbnails[index] = small.astype(np.float32) @ GRAY
    return thumbnails


def unit_thumbnails(thumbnails: np.ndarray, unit: int) -> np.ndarray:
    """(ceil(F / unit), side, side): the mean thumbnail of each `unit` consecutive frames (the
    last unit may hold fewer)."""
    starts = range(0, len(thumbnails), unit)
    if not len(thumbnails):
        return thumbnails
    return np.stack([thumbnails[start:start + unit].mean(axis=0) for start in starts])


def dedup_units(thumbnails: np.ndarray, threshold: float, last_kept: np.ndarray | None) -> ChunkSelection:
    """Keep a unit whose thumbnail differs from the last kept one's by at least `threshold`
    (mean absolute difference); the first unit when there is no last kept one.

    thumbnails: (U, side, side) of the chunk's units; last_kept: the carry, (side, side) or None."""
    keep, scores = [], []
    for thumbnail in thumbnails:
        if last_kept is None:
            keep.append(True)
            scores.append(None)
            last_kept = thumbnail
            continue
        difference = float(np.abs(thumbnail - last_kept).mean())
        kept = difference >= threshold
        keep.append(kept)
        scores.append(difference)
        if kept:
            last_kept = thumbnail
    return ChunkSelection(keep=keep, scores=scores, carry=last_kept)


@dataclass(frozen=True)
class FrameDedup(BeforeEncoder):
    """Drops the frames (units) whose gray thumbnail is within `threshold` of the last kept one's."""

    kind: ClassVar[str] = "frame_dedup"
    threshold: float = param(2.0, 0.0, 255.0, "a frame is dropped when its thumbnail differs from the last kept "
                                              "frame's by less than this mean absolute gray level (0-255); 0 keeps all")
    thumbnail: int = param(32, 2, 1024, "side in pixels of the square grayscale thumbnail the frames are compared on")

    def select(self, frames, unit, carry):
        return dedup_units(unit_thumbnails(gray_thumbnails(frames, self.thumbnail), unit), self.threshold, carry)
