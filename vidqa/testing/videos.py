"""Small generated videos for tests and samples.

Every generator returns uint8 RGB frames shaped [T, H, W, 3] and is deterministic: the only
randomness is optional pixel noise (`noise > 0`, or `right="noise"`), drawn from
`np.random.default_rng(seed)`, so the same arguments always give the same frames.
`write_video` stores frames as an .mp4 (OpenCV, "mp4v") that decord and OpenCV can both read.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 60), (40, 60, 220)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write uint8 RGB frames [T, H, W, 3] to an .mp4 at `fps` -> the path written.

    H and W should be even (MPEG-4 part 2); the codec is lossy, so decoded pixels differ by a few
    levels from `frames`.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3]; got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
    writer = cv2.VideoWriter(str(path), fourcc, float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an mp4v video to {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def moving_square_frames(
    num_frames: int = 16,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    square: int = 24,
    color: tuple[int, int, int] = RED,
    end_color: tuple[int, int, int] | None = None,
    background: tuple[int, int, int] = (24, 24, 24),
    noise: float = 0.0,
) -> np.ndarray:
    """A `square`-pixel square moving left to right, vertically centred, over a plain background.

    Its colour goes linearly from `color` (first frame) to `end_color` (last frame; default: no
    change). `noise` > 0 adds Gaussian pixel noise of that std (seeded). -> uint8 [T, H, W, 3].
    """
    height, width = size
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = background
    end_color = color if end_color is None else end_color
    top = (height - square) // 2
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1)
        left = round(progress * (width - square))
        rgb = np.round((1 - progress) * np.array(color) + progress * np.array(end_color))
        frames[t, top : top + square, left : left + square] = rgb.astype(np.uint8)
    return _add_noise(frames, noise, seed)


def static_left_half_frames(
    num_frames: int = 16,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    right: str = "noise",
) -> np.ndarray:
    """Left half identical in every frame (a coloured checkerboard); right half changes per frame.

    right="noise": uniform random pixels, new every frame (seeded). right="shapes": a dark
    background with a bright disc bouncing up and down and a bar sliding sideways (compresses far
    better, for sample clips). -> uint8 [T, H, W, 3].
    """
    height, width = size
    half = width // 2
    rows, cols = np.mgrid[0:height, 0:half]
    cells = ((rows // 8) + (cols // 8)) % 2 == 0
    yellow, blue = np.array((230, 200, 40)), np.array((40, 90, 160))
    left = np.where(cells[..., None], yellow, blue).astype(np.uint8)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:, :, :half] = left
    right_width = width - half
    if right == "noise":
        rng = np.random.default_rng(seed)
        shape = (num_frames, height, right_width, 3)
        frames[:, :, half:] = rng.integers(0, 256, shape, dtype=np.uint8)
    elif right == "shapes":
        ys, xs = np.mgrid[0:height, 0:right_width]
        radius = min(height, right_width) // 6
        for t in range(num_frames):
            phase = 2 * np.pi * t / 16
            cy = height / 2 + (height / 2 - radius - 2) * np.sin(phase)
            panel = np.full((height, right_width, 3), 20, np.uint8)
            panel[(ys - cy) ** 2 + (xs - right_width / 2) ** 2 <= radius**2] = (250, 250, 250)
            bar_left = (t * 4) % right_width
            panel[height - 12 : height - 4, bar_left : bar_left + 10] = (250, 80, 200)
            frames[t, :, half:] = panel
    else:
        raise ValueError(f"right must be 'noise' or 'shapes', got {right!r}")
    return frames


def three_scene_frames(
    frames_per_scene: tuple[int, int, int] = (6, 6, 6),
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    noise: float = 0.0,
) -> np.ndarray:
    """Three very different scenes back to back: red horizontal stripes, green checkerboard, blue
    diagonal stripes. Each texture drifts 1 pixel per frame, so frames within a scene differ a
    little and frames across a cut differ a lot. -> uint8 [sum(frames_per_scene), H, W, 3].
    """
    height, width = size
    rows, cols = np.mgrid[0:height, 0:width]
    scenes = [
        (RED, lambda shift: ((rows + shift) // 6) % 2 == 0),
        (GREEN, lambda shift: (((rows // 10) + ((cols + shift) // 10)) % 2) == 0),
        (BLUE, lambda shift: ((rows + cols + shift) // 8) % 2 == 0),
    ]
    frames = []
    for (rgb, pattern), count in zip(scenes, frames_per_scene):
        base = np.array(rgb, dtype=np.float32)
        for t in range(count):
            light = pattern(t)[..., None]
            frames.append(np.where(light, base, base * 0.45).astype(np.uint8))
    return _add_noise(np.stack(frames), noise, seed)


def _add_noise(frames: np.ndarray, noise: float, seed: int) -> np.ndarray:
    if noise <= 0:
        return frames
    rng = np.random.default_rng(seed)
    noisy = frames.astype(np.float32) + rng.normal(0.0, noise, frames.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
