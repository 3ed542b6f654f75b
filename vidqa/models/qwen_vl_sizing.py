"""Qwen2.5-VL's video pixel budget, as its reference pipeline (qwen-vl-utils) sets it.

The model card's pipeline is two steps: qwen-vl-utils' `fetch_video` resizes the sampled frames
(`smart_resize` to multiples of 28 px inside a per-frame pixel range that a total budget across
all frames can lower), then the checkpoint's processor applies its own `smart_resize` to what it
receives (a no-op unless its own range is narrower). vidqa does the first step here, with the
same torchvision call, and hands the frames to the processor for the second.

Constants: QwenLM/Qwen2.5-VL@f0af2996 (qwen-vl-utils 0.0.10),
qwen-vl-utils/src/qwen_vl_utils/vision_process.py. Our own code; tests/test_model_defaults.py
checks it against numbers that file's functions produce (tests/fixtures/qwen_vl_utils/).
"""

from __future__ import annotations

import math

import numpy as np
import torch

IMAGE_FACTOR = 28  # 14 px patches merged 2x2
FRAME_FACTOR = 2  # two frames per temporal patch
VIDEO_MIN_PIXELS = 128 * 28 * 28  # 100,352 per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28  # 602,112 per frame
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90,316,800 across the video (its env default)
# qwen-vl-utils reads the total budget from this environment variable (VIDEO_TOTAL_PIXELS =
# int(float(os.environ.get('VIDEO_MAX_PIXELS', 128000 * 28 * 28 * 0.9)))): vidqa honours it the same way
TOTAL_PIXELS_ENV = "VIDEO_MAX_PIXELS"


def video_total_pixels() -> int:
    """The total pixel budget of a video: $VIDEO_MAX_PIXELS when set (as qwen-vl-utils), else 90,316,800."""
    import os

    value = os.environ.get(TOTAL_PIXELS_ENV)
    if value is None:
        return VIDEO_TOTAL_PIXELS
    try:
        return int(float(value))
    except ValueError:
        from vidqa.errors import BadInput

        raise BadInput(f"{TOTAL_PIXELS_ENV} must be a number of pixels (qwen-vl-utils' total video budget), "
                       f"got '{value}'") from None
MAX_RATIO = 200


def frame_pixel_limit(num_frames: int, max_pixels: int | None = None) -> tuple[int, float]:
    """(min_pixels, max_pixels) per frame for a video of `num_frames` frames.

    The per-frame cap (VIDEO_MAX_PIXELS; `--max-pixels` replaces it, up or down) is lowered to an
    even share of VIDEO_TOTAL_PIXELS (2 frames per temporal patch), floored at 1.05 x the minimum
    and never above the cap. The minimum is VIDEO_MIN_PIXELS, or the cap when that is smaller.
    (qwen-vl-utils lets a given max_pixels only lower its 602,112; vidqa's explicit flag may raise it.)
    """
    cap = VIDEO_MAX_PIXELS if max_pixels is None else max_pixels
    min_pixels = min(VIDEO_MIN_PIXELS, cap)
    share = video_total_pixels() / max(num_frames, 1) * FRAME_FACTOR
    return min_pixels, min(max(min(cap, share), int(min_pixels * 1.05)), cap)


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: float, factor: int = IMAGE_FACTOR):
    """(height, width) rounded to multiples of `factor`, area scaled into [min_pixels, max_pixels],
    aspect ratio kept as closely as the rounding allows (qwen-vl-utils' rule)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio above {MAX_RATIO}: {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def reference_size(num_frames: int, height: int, width: int, max_pixels: int | None = None) -> tuple[int, int]:
    """The frame size qwen-vl-utils resizes a `num_frames`-frame video of height x width to."""
    min_pixels, limit = frame_pixel_limit(num_frames, max_pixels)
    return smart_resize(height, width, min_pixels, limit)


def resize_frames(frames: np.ndarray, max_pixels: int | None = None, budget_frames: int | None = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, h, w] at `reference_size`, as fetch_video does it
    (bicubic, antialiased, values left in 0..255 unrounded for the processor to rescale).
    budget_frames: the frames the total budget is shared by (default T; a streamed chunk's
    frames share the whole clip's)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    height, width = video.shape[-2:]
    size = reference_size(budget_frames or video.shape[0], int(height), int(width), max_pixels)
    return resize(video, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True).float()
