"""The micro model's synthetic world: seeded clips with questions whose evidence sits in known
frames and places.

A clip (default 8 frames of 112 x 112 px) shows
- a plain background, one of BACKGROUND_COLOURS, that may change once to another background
  colour at a frame in the middle part of the clip;
- a coloured square (28-36 px side), one of SQUARE_COLOURS, moving in a straight line from one
  edge to the opposite one (left / right / up / down), that may change colour once (also in the
  middle part, independently of the background). It starts and ends within EDGE_MARGIN px of the
  edges on its line of motion and stays >= ACROSS_MARGIN px from the other two edges, so in any
  frame the edge it is nearest is unambiguous;
- a white circle (radius 11-13 px) that, in half the clips, is visible in a contiguous run of
  1 .. ceil(T/2) frames, placed clear of the square's path (never occluded); else absent.

Background and square colours are disjoint sets: squares bright and saturated, backgrounds dark
(R+G+B >= 310 vs <= 210, so "is this patch part of the square" is linear in its colour); the
circle is the only white object. Every question has exactly one right one-word answer.

Question types (QUESTIONS) and where their evidence is:
  square_start       colour of the square in frame 0              red / green / blue / yellow
  square_end         colour of the square in frame T-1            red / green / blue / yellow
  direction          square position over all frames              left / right / up / down
  background_change  background in the first vs last frames       yes / no
  background_start   background in frame 0                        black / grey / purple / brown
  background_end     background in frame T-1                      black / grey / purple / brown
  circle             the frames the circle is in (maybe only one) yes / no

Every answer is balanced by construction: start colours and directions are uniform; a change
happens with probability 1/2 and then goes to a uniformly chosen *other* colour, so the end
colour is uniform too; the circle is present with probability 1/2.

Auxiliary training questions (AUX_QUESTIONS, answers in `WorldClip.aux_answers`; not part of
the evaluated set): "where is the square at the start ?" / "... at the end ?" -> left / right /
top / bottom. They are the stepping stone to "which way does the square move ?": a first run
without them learned every other type to 100% while direction stayed at chance (nothing else
needs *where* the square is, and colour questions can be answered by averaging all tokens).
They need the model's SigLIP position embeddings initialised large enough (model.py).

Question groups (GROUPS): questions in one group constrain each other's answers, so a training
chat asks at most one question per group. "square at the start" + "square at the end" would let
the model copy its first answer (they agree in half the clips); "background at the start", "at
the end" and "does the background change" are tied by change == (start != end); direction and
where the square is at the start / at the end determine each other. The circle is independent
of everything else. A training chat therefore asks 4 questions (one per group, in random order);
over a single frame (a clip's first frame: the square sits at its start edge) it asks no
direction and no background change, which one frame cannot show.

Extras (`make_clip(..., extras=True)`, the SmolLM2 benchmark model's world, smol.py): two more
objects whose evidence sits in a small part of the clip, so a pruner that keeps the wrong tokens
is caught. Their draws come after every other draw, so a clip's other content is the same with
or without them (the micro model's held-out set is unchanged).
  flash              colour of a diamond (|dx|+|dy| <= 13 px) visible in 1 or 2 consecutive
                     frames anywhere in the clip, off the square's band, clear of the circle
                     and the corners                              cyan / magenta / orange / pink
  corner_start       colour of a 16 x 16 px block in one of the four corners of frame 0 only
                                                                  cyan / magenta / orange / pink
The flash and the corner block draw their colours independently and uniformly; every clip has
both (so "what colour is the flash ?" always has an answer).

Randomness: every clip is drawn from a numpy Generator. `heldout_clip(i, seed)` is clip i of a
held-out set: `np.random.default_rng([seed, i])`, so any clip can be regenerated on its own.
Training draws from `np.random.default_rng(SeedSequence(train_seed, spawn_key=(1,)))`, a
different stream.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIZE = 112
NUM_FRAMES = 8
HELDOUT_SEED = 1000  # default seed of the held-out set; training uses other streams

# Squares are bright and saturated, backgrounds dark: R+G+B >= 310 vs <= 210, so "is this patch
# part of the square?" is a linear function of its colour.
SQUARE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (240, 40, 40),
    "green": (40, 210, 60),
    "blue": (50, 90, 250),
    "yellow": (240, 220, 40),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "grey": (70, 70, 70),
    "purple": (70, 20, 90),
    "brown": (90, 50, 15),
}
CIRCLE_COLOUR = (255, 255, 255)
DIRECTIONS = ("left", "right", "up", "down")
SQUARE_SIDE = (28, 36)  # inclusive range, px
CIRCLE_RADIUS = (11, 13)  # inclusive range, px
EDGE_MARGIN = 6  # the square starts/ends within this many px of the edges
ACROSS_MARGIN = 18  # ... and keeps at least this many px from the edges across its motion

QUESTIONS: dict[str, str] = {
    "square_start": "what colour is the square at the start ?",
    "square_end": "what colour is the square at the end ?",
    "direction": "which way does the square move ?",
    "background_change": "does the background change ?",
    "background_start": "what colour is the background at the start ?",
    "background_end": "what colour is the background at the end ?",
    "circle": "is there a circle ?",
}
QUESTION_TYPES = tuple(QUESTIONS)

# The extras (module docstring): asked of the SmolLM2 benchmark model only.
EXTRA_QUESTIONS: dict[str, str] = {
    "flash": "what colour is the flash ?",
    "corner_start": "what colour is the corner at the start ?",
}
EXTRA_QUESTION_TYPES = tuple(EXTRA_QUESTIONS)
FLASH_COLOURS: dict[str, tuple[int, int, int]] = {
    "cyan": (20, 225, 230),
    "magenta": (225, 30, 225),
    "orange": (255, 140, 0),
    "pink": (255, 170, 200),
}
FLASH_RADIUS = 13  # L1 radius of the diamond, px
CORNER_SIDE = 16  # px; the square keeps >= ACROSS_MARGIN (18) px from the edges across its motion

# Training-only stepping stones for "direction" (see the module docstring).
AUX_QUESTIONS: dict[str, str] = {
    "square_where_start": "where is the square at the start ?",
    "square_where_end": "where is the square at the end ?",
}
EDGES = ("left", "right", "top", "bottom")
START_EDGE = {"right": "left", "left": "right", "down": "top", "up": "bottom"}
END_EDGE = {"right": "right", "left": "left", "down": "bottom", "up": "top"}

GROUPS: tuple[tuple[str, ...], ...] = (
    ("square_start", "square_end"),
    ("direction", "square_where_start", "square_where_end"),
    ("background_change", "background_start", "background_end"),
    ("circle",),
)
EXTRA_GROUPS: tuple[tuple[str, ...], ...] = (("flash",), ("corner_start",))

ANSWERS: dict[str, tuple[str, ...]] = {
    "square_start": tuple(SQUARE_COLOURS),
    "square_end": tuple(SQUARE_COLOURS),
    "direction": DIRECTIONS,
    "background_change": ("yes", "no"),
    "background_start": tuple(BACKGROUND_COLOURS),
    "background_end": tuple(BACKGROUND_COLOURS),
    "circle": ("yes", "no"),
}
EXTRA_ANSWERS: dict[str, tuple[str, ...]] = {kind: tuple(FLASH_COLOURS) for kind in EXTRA_QUESTIONS}
AUX_ANSWERS: dict[str, tuple[str, ...]] = {"square_where_start": EDGES, "square_where_end": EDGES}

# Every word the micro model's tokenizer knows (besides the chat specials). Questions and answers
# must tokenize without <unk>: tests check it.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        "user assistant system what colour is the square at start end which way does move where "
        "background change there a circle in this video of frame first last and it ? . , ".split()
        + list(SQUARE_COLOURS)
        + list(BACKGROUND_COLOURS)
        + ["white"]
        + list(DIRECTIONS)
        + ["top", "bottom"]
        + ["yes", "no"]
    )
)


@dataclass
class WorldClip:
    """One generated clip: frames plus the ground truth behind every answer.

    frames: uint8 [T, SIZE, SIZE, 3]. answers: question type -> one-word answer (types a clip of
    this length cannot answer are missing: direction and background_change for T == 1).
    aux_answers: the training-only AUX_QUESTIONS' answers.
    square_boxes: (T, 4) int (x0, y0, x1, y1) of the square per frame (x1, y1 exclusive).
    circle_frames: frame indices where the circle is drawn; circle: (cx, cy, r) or None.
    square_change / background_change: frame index of the change (first frame with the new
    colour), or None.
    """

    frames: np.ndarray
    answers: dict[str, str]
    square_boxes: np.ndarray
    square_colours: tuple[str, str]
    background_colours: tuple[str, str]
    square_change: int | None
    background_change: int | None
    direction: str
    circle: tuple[int, int, int] | None
    circle_frames: tuple[int, ...] = field(default_factory=tuple)
    aux_answers: dict[str, str] = field(default_factory=dict)
    flash: tuple[int, int, int] | None = None  # (cx, cy, L1 radius) of the diamond (extras only)
    flash_frames: tuple[int, ...] = field(default_factory=tuple)
    corner_box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) in frame 0 (extras only)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def question_types(self) -> tuple[str, ...]:
        return tuple(t for t in QUESTION_TYPES + EXTRA_QUESTION_TYPES if t in self.answers)


def _change_frame(rng: np.random.Generator, num_frames: int) -> int:
    """A frame in the middle part: at least a quarter of the clip (>= 1 frame) on each side."""
    margin = max(1, round(num_frames / 4))
    return int(rng.integers(margin, num_frames - margin + 1))


def pick_change(rng, names: tuple[str, ...], num_frames: int):
    start = names[int(rng.integers(len(names)))]
    if num_frames > 1 and rng.random() < 0.5:
        others = [n for n in names if n != start]
        return start, others[int(rng.integers(len(others)))], _change_frame(rng, num_frames)
    return start, start, None


def corner_boxes(size: int) -> tuple[tuple[int, int, int, int], ...]:
    c = CORNER_SIDE
    return ((0, 0, c, c), (size - c, 0, size, c), (0, size - c, c, size), (size - c, size - c, size, size))


def _draw_extras(rng, num_frames, size, across, side, direction, circle):
    """-> (flash colour, (cx, cy, r), flash frames, corner colour, corner box). Rejection-samples
    the flash centre: off the square's band, clear of the circle and of every corner block."""
    flash_colour = tuple(FLASH_COLOURS)[int(rng.integers(len(FLASH_COLOURS)))]
    length = int(rng.integers(1, 3)) if num_frames > 1 else 1
    begin = int(rng.integers(0, num_frames - length + 1))
    r = FLASH_RADIUS
    for _ in range(1000):
        on_band, off_band = (int(v) for v in rng.integers(r, size - r, size=2))
        if not (off_band + r + 2 <= across or off_band - r - 2 >= across + side):
            continue
        cx, cy = (on_band, off_band) if direction in ("left", "right") else (off_band, on_band)
        if circle is not None and abs(cx - circle[0]) + abs(cy - circle[1]) < r + 2 * circle[2] + 4:
            continue
        if any(cx + r > x0 and cx - r < x1 and cy + r > y0 and cy - r < y1 for x0, y0, x1, y1 in corner_boxes(size)):
            continue
        break
    else:  # pragma: no cover - the free strip beside the band always fits a diamond
        raise RuntimeError("no room for the flash")
    corner_colour = tuple(FLASH_COLOURS)[int(rng.integers(len(FLASH_COLOURS)))]
    corner_box = corner_boxes(size)[int(rng.integers(4))]
    return flash_colour, (cx, cy, r), tuple(range(begin, begin + length)), corner_colour, corner_box


def make_clip(
    rng: np.random.Generator, num_frames: int = NUM_FRAMES, size: int = SIZE, extras: bool = False
) -> WorldClip:
    """Draw one clip from `rng` (consumed in a fixed order, so the same state gives the same clip).
    extras: also draw the flash and the corner block (their draws come last)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    bg_start, bg_end, bg_change = pick_change(rng, tuple(BACKGROUND_COLOURS), num_frames)
    sq_start, sq_end, sq_change = pick_change(rng, tuple(SQUARE_COLOURS), num_frames)
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    side = int(rng.integers(SQUARE_SIDE[0], SQUARE_SIDE[1] + 1))
    across = int(rng.integers(ACROSS_MARGIN, size - side - ACROSS_MARGIN + 1))  # fixed across the motion
    first = int(rng.integers(0, EDGE_MARGIN + 1))
    last = size - side - int(rng.integers(0, EDGE_MARGIN + 1))
    # one frame = a clip's first frame (the square at its start edge)
    along = np.round(np.linspace(first, last, num_frames)).astype(int) if num_frames > 1 else np.array([first])
    if direction in ("left", "up"):
        along = (size - side) - along
    boxes = np.zeros((num_frames, 4), int)
    for t in range(num_frames):
        x0, y0 = (along[t], across) if direction in ("left", "right") else (across, along[t])
        boxes[t] = (x0, y0, x0 + side, y0 + side)

    circle, circle_frames = None, ()
    if rng.random() < 0.5:
        radius = int(rng.integers(CIRCLE_RADIUS[0], CIRCLE_RADIUS[1] + 1))
        length = int(rng.integers(1, math.ceil(num_frames / 2) + 1))
        begin = int(rng.integers(0, num_frames - length + 1))
        circle_frames = tuple(range(begin, begin + length))
        # Off the square's band (the strip it sweeps), so it is never occluded.
        free = [c for c in range(radius, size - radius) if c + radius + 2 <= across or c - radius - 2 >= across + side]
        off_band = free[int(rng.integers(len(free)))]
        on_band = int(rng.integers(radius, size - radius))
        cx, cy = (on_band, off_band) if direction in ("left", "right") else (off_band, on_band)
        circle = (cx, cy, radius)

    flash_colour = flash = corner_colour = corner_box = None
    flash_frames: tuple[int, ...] = ()
    if extras:
        flash_colour, flash, flash_frames, corner_colour, corner_box = _draw_extras(
            rng, num_frames, size, across, side, direction, circle)

    frames = np.empty((num_frames, size, size, 3), np.uint8)
    ys, xs = np.mgrid[0:size, 0:size]
    for t in range(num_frames):
        bg = bg_end if bg_change is not None and t >= bg_change else bg_start
        sq = sq_end if sq_change is not None and t >= sq_change else sq_start
        frames[t] = BACKGROUND_COLOURS[bg]
        if circle is not None and t in circle_frames:
            cx, cy, r = circle
            frames[t][(xs - cx) ** 2 + (ys - cy) ** 2 <= r * r] = CIRCLE_COLOUR
        x0, y0, x1, y1 = boxes[t]
        frames[t, y0:y1, x0:x1] = SQUARE_COLOURS[sq]
        if flash is not None and t in flash_frames:
            fx, fy, fr = flash
            frames[t][np.abs(xs - fx) + np.abs(ys - fy) <= fr] = FLASH_COLOURS[flash_colour]
        if corner_box is not None and t == 0:
            x0, y0, x1, y1 = corner_box
            frames[t, y0:y1, x0:x1] = FLASH_COLOURS[corner_colour]

    answers = {
        "square_start": sq_start,
        "square_end": sq_end,
        "background_start": bg_start,
        "background_end": bg_end,
        "circle": "yes" if circle is not None else "no",
    }
    if num_frames > 1:
        answers["direction"] = direction
        answers["background_change"] = "yes" if bg_change is not None else "no"
    if extras:
        answers["flash"] = flash_colour
        answers["corner_start"] = corner_colour
    aux_answers = {
        "square_where_start": START_EDGE[direction],
        "square_where_end": END_EDGE[direction] if num_frames > 1 else START_EDGE[direction],
    }
    return WorldClip(
        frames=frames,
        answers=answers,
        square_boxes=boxes,
        square_colours=(sq_start, sq_end),
        background_colours=(bg_start, bg_end),
        square_change=sq_change,
        background_change=bg_change,
        direction=direction,
        circle=circle,
        circle_frames=circle_frames,
        aux_answers=aux_answers,
        flash=flash,
        flash_frames=flash_frames,
        corner_box=corner_box,
    )


ALL_QUESTIONS: dict[str, str] = {**QUESTIONS, **AUX_QUESTIONS}
# Every question of the SmolLM2 model's world (the micro model's vocabulary lacks the extras' words).
SMOL_QUESTIONS: dict[str, str] = {**ALL_QUESTIONS, **EXTRA_QUESTIONS}


def heldout_clip(index: int, seed: int = HELDOUT_SEED, num_frames: int = NUM_FRAMES, extras: bool = False) -> WorldClip:
    """Clip `index` of the held-out set `seed` (independent of every other clip)."""
    return make_clip(np.random.default_rng([seed, index]), num_frames, extras=extras)


def heldout_clips(n: int, seed: int = HELDOUT_SEED, num_frames: int = NUM_FRAMES, extras: bool = False) -> list[WorldClip]:
    return [heldout_clip(i, seed, num_frames, extras) for i in range(n)]


def write_clip(path: str | os.PathLike, clip: WorldClip, fps: float = 4.0) -> Path:
    """Write the clip as an mp4 (lossy: decoded pixels differ by a few levels)."""
    from vidqa.testing.videos import write_video

    return write_video(path, clip.frames, fps=fps)


def training_chat(clip: WorldClip, rng: np.random.Generator,
                  emphasis: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """(question, answer) turns for one training chat: one question per group, random order
    (the extras' groups too when the clip has them). `emphasis` weights a question type's
    chance of being its group's pick (default weight 1; None draws exactly as before, so old
    runs reproduce)."""
    answers = {**clip.answers, **clip.aux_answers}
    turns = []
    groups = GROUPS + (EXTRA_GROUPS if "flash" in answers else ())
    for group in groups:
        options = [t for t in group if t in answers]  # a single frame has no change/direction
        if not options:
            continue
        if emphasis is None:
            kind = options[int(rng.integers(len(options)))]
        else:
            weights = np.array([float(emphasis.get(t, 1.0)) for t in options])
            kind = options[int(rng.choice(len(options), p=weights / weights.sum()))]
        turns.append((SMOL_QUESTIONS[kind], answers[kind]))
    order = rng.permutation(len(turns))
    return [turns[i] for i in order]
