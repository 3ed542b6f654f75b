"""What makes a prompt fit the model's context: the exact flags to suggest when it does not.

What must fit is the range of positions the LLM reads (docs/design.md, "Positions"). For a 1-D
RoPE family the prompt spans (text rows) + (visual rows) positions; pruning before the LLM
shortens that only with compact positions, so the remedies are fewer frames, or a pre-LLM preset
at a keep that fits with `-P positions=compact`. Under Qwen's M-RoPE a visual token's position is a
(time, row, col) coordinate and pruning never shortens the range: only fewer frames do. Each
remedy is computed from the request's own counts, leaving room for the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SUGGESTED_PRESET = "evs"  # the cheapest pre-LLM preset; keeps the first frame whole (keep >= 1/frames)


@dataclass(frozen=True)
class PromptExtent:
    """The position range of one request's prompt, split into what pruning can and cannot shorten.

    fixed: positions taken by text and never-pruned visual rows; visual: positions taken by the
    prunable visual tokens (their count for 1-D RoPE, their coordinate span under M-RoPE);
    visual_tokens: how many prunable visual tokens; frames: frames sampled; multi_axis: M-RoPE.
    """

    fixed: int
    visual: int
    visual_tokens: int
    frames: int
    multi_axis: bool


def frames_that_fit(extent: PromptExtent, room: int, step: int = 1) -> int:
    """The most frames (a multiple of `step`) whose visual positions fit in `room`; 0 if none."""
    if extent.visual <= 0:
        return extent.frames
    frames = math.floor(extent.frames * room / extent.visual)
    return max(0, frames - frames % step)


def keep_that_fits(extent: PromptExtent, room: int) -> float | None:
    """The largest keep (2 decimals, rounded down) whose compact prompt fits in `room`, or None
    when no keep the suggested preset can reach does (it keeps at least the first frame)."""
    if extent.visual_tokens <= 0:
        return None
    keep = math.floor(100 * room / extent.visual_tokens) / 100
    lowest = 1 / max(extent.frames, 1)
    return keep if keep >= lowest and keep > 0 else None


def remedies(extent: PromptExtent, limit: int, answer_tokens: int, frame_step: int = 1) -> list[str]:
    """The flags that make this prompt fit a context of `limit` with room for `answer_tokens`."""
    room = limit - answer_tokens - extent.fixed
    if room <= 0:
        room = limit - extent.fixed  # no room for the answer: at least let the prompt fit
    if room <= 0:
        return ["a shorter question (the text alone fills the context)"]
    found = []
    frames = frames_that_fit(extent, room, frame_step)
    if 0 < frames < extent.frames:
        found.append(f"--frames {frames}")
    if not extent.multi_axis:
        keep = keep_that_fits(extent, room)
        if keep is not None and keep < 1:
            found.append(f"--prune {SUGGESTED_PRESET} --keep {keep:g} -P positions=compact")
    return found or ["a shorter question"]
