"""Which frames of a video each model family's own reference pipeline feeds its model.

A rule sees the frames of the chosen window (`total` of them at `video_fps`) and returns which to
decode, as offsets 0..total-1 from the window's first frame, plus the sampling rate its pipeline
reports for them (None when the family has no such notion). `vidqa.video.decode.load_clip(sampling=rule)`
applies one when neither `--frames` nor `--fps` is given. Each rule cites the code it follows;
docs/models.md lists where vidqa differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FramePlan:
    offsets: np.ndarray  # int [T], increasing, unique, in 0..total-1
    sample_fps: float | None = None
    note: str | None = None


@dataclass(frozen=True)
class UniformFrames:
    """`frames` frames spread evenly over the window (LLaVA-OneVision was evaluated with 32)."""

    frames: int = 32

    def describe(self) -> str:
        return f"{self.frames} frames, uniform"

    def plan(self, total: int, video_fps: float) -> FramePlan:
        wanted, note = self.frames, None
        if wanted > total:
            note = f"the video has {total} frames in the window, fewer than the default {wanted}; using {total}"
            wanted = total
        return FramePlan(np.linspace(0, total - 1, wanted).round().astype(int), note=note)


@dataclass(frozen=True)
class QwenVLFrames:
    """qwen-vl-utils' `smart_nframes` + `_read_video_decord` (QwenLM/Qwen2.5-VL@f0af299,
    qwen-vl-utils/src/qwen_vl_utils/vision_process.py): fps 2, at least FPS_MIN_FRAMES = 4 and
    at most FPS_MAX_FRAMES = 768 frames, a multiple of FRAME_FACTOR = 2 (two frames make one
    temporal patch), spread by torch.linspace(0, total - 1, n).round(); the reported sampling rate
    is n / total * video_fps (it sets second_per_grid_ts = 2 / rate, hence the M-RoPE time axis).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    factor: int = 2

    def describe(self) -> str:
        return f"{self.fps:g} fps, {self.min_frames}-{self.max_frames} frames (qwen-vl-utils)"

    def frame_count(self, total: int, video_fps: float) -> int:
        """smart_nframes for a video of `total` frames at `video_fps`; 0 when it has too few."""
        low = math.ceil(self.min_frames / self.factor) * self.factor
        high = math.floor(min(self.max_frames, total) / self.factor) * self.factor
        wanted = total / video_fps * self.fps
        wanted = min(min(max(wanted, low), high), total)
        return math.floor(wanted / self.factor) * self.factor

    def plan(self, total: int, video_fps: float) -> FramePlan:
        import torch

        count = self.frame_count(total, video_fps)
        note = None
        if count < self.factor:  # qwen-vl-utils raises here; we use what there is
            count = total
            note = f"the window has {total} frame(s), fewer than the {self.factor} Qwen2.5-VL's reference needs; using {total}"
        offsets = torch.linspace(0, total - 1, count).round().long().numpy()
        return FramePlan(offsets, sample_fps=count / max(total, 1e-6) * video_fps, note=note)


@dataclass(frozen=True)
class SmolVLMFrames:
    """transformers' `SmolVLMVideoProcessor.sample_frames` with the SmolVLM2 checkpoints'
    `video_sampling` (fps 1, max_frames 64): round(fps * duration) frames, at most `max_frames`;
    a video longer than 2 * skip_secs + max_frames / fps loses `skip_secs` at both ends; indices
    np.linspace(start, end, n, dtype=int) (truncated, not rounded), duplicates dropped.
    """

    fps: float = 1.0
    max_frames: int = 64
    skip_secs: float = 1.0

    def describe(self) -> str:
        return f"{self.fps:g} fps, at most {self.max_frames} frames (SmolVLM2 processor)"

    def plan(self, total: int, video_fps: float) -> FramePlan:
        duration = total / video_fps
        count = max(1, min(int(round(self.fps * duration)), self.max_frames))
        start, end = 0, total - 1
        if self.skip_secs > 0 and duration - 2 * self.skip_secs > self.max_frames * self.fps:
            start = int(self.skip_secs * video_fps)
            end = int(total - self.skip_secs * video_fps)
        start, end = max(0, start), min(end, total - 1)
        if start >= end:
            start, end = 0, total - 1
        return FramePlan(np.unique(np.linspace(start, end, count, dtype=int)))


FrameRule = UniformFrames | QwenVLFrames | SmolVLMFrames
