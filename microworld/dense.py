"""The dense world: long, token-dense clips for the SmolLM2 benchmark model, with questions whose
evidence is spread the way long-video questions' is.

Why: the 8-frame x 16-token world (world.py, 128 visual tokens) is far from the 32 x 196 tokens
the pruning methods were made for, where most tokens repeat their neighbours in space and time.
Here a visual token covers a CELL x CELL px cell (SigLIP patch 14 x pixel-shuffle scale 2), the
frame is `grid` cells wide, and the objects stay about one cell big, so a bigger grid means more
redundant background per object, as in real video. DenseSize(frames, grid) sets the scale:
FULL (32 frames x 64 tokens = 2,048 visual tokens, 224 px) is the benchmark; REDUCED (16 x 36 =
576, 168 px) is what a CPU can train; tests use smaller ones. The same code draws every size.

A clip shows (every object drawn whole: no object ever covers another, nor the square):
- the world's background (may change colour once in the middle part) and moving square (left /
  right / up / down from edge to edge, may change colour once in the middle part);
- the corner block: a CORNER_SIDE px block in one corner of frame 0 only;
- the flash: a diamond in 1-2 consecutive frames inside the middle half of the clip
  (frames [T//4, T - T//4)), in one of FLASH_COLOURS;
- the ball: a BALL_COLOUR disc in a few consecutive frames (2 .. max(2, T//8)), near the middle
  of one edge: within a quarter of the frame from that edge and at least a third from the two
  edges beside it, so the edge it is near is unambiguous;
- the light: a LIGHT_SIDE px square in one place for the whole clip, grey when off and white when on;
  it is on in 1-4 single frames, never two in a row, so each blink is its own event.

Question types (DENSE_QUESTIONS) and where their evidence is:
  square_start / square_end      the square in frame 0 / T-1               4 colours
  direction                      the square over all frames                 left / right / up / down
  background_change              background in the first vs last frames     yes / no
  background_start / _end        background in frame 0 / T-1                4 colours
  corner_start                   one corner cell of frame 0                 4 colours
  flash                          1-2 frames in the middle, one region       4 colours
  ball                           a few frames, one region near an edge      left / right / top / bottom
  blinks                         1-4 single frames anywhere in the clip     one / two / three / four
  order                          the flash's and the ball's frames          flash / ball
Every answer is uniform by construction (the order too: which one comes first is drawn first).
LIGHT_STONES are training-only questions about the light (the count's stepping stones; their
answers are in `aux_answers`, with the world's "where is the square" ones), never evaluated.

Randomness: a clip is drawn from a numpy Generator in a fixed order. Held-out clip i of seed s
is `np.random.default_rng([s, i])`; training draws from SeedSequence streams of its own
(microworld.train_dense), so held-out clips are never trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from microworld import world

CELL = 28  # px per visual token side: SigLIP patch 14 x pixel-shuffle scale 2
MIN_FRAMES = 8  # the flash, the ball and four blinks need this many frames to be placed apart
HELDOUT_SEED = world.HELDOUT_SEED

BALL_COLOUR = (150, 255, 50)  # lime: no square, flash or background colour is near it
BALL_RADIUS = (10, 12)  # inclusive range, px
# px: most of a token's 28 px cell, as the other objects. At 14 px (a quarter of a cell) a linear
# probe on the small SigLIP's light-cell token told on from off at 0.82 (answering "off": 0.87),
# 0.93 against the clip's other frames, and no run learned to count the blinks; the same weights
# read a 24 px light at 0.88 / 0.98 (benchmarks/micro/light_probe.py)
LIGHT_SIDE = 24
LIGHT_OFF = (140, 140, 140)
LIGHT_ON = (255, 255, 255)
MAX_BLINKS = 4
COUNT_WORDS = ("one", "two", "three", "four")
GAP = 2  # px kept clear around every object


@dataclass(frozen=True)
class DenseSize:
    """The scale of a dense clip: `frames` frames of grid x grid visual tokens."""

    frames: int
    grid: int

    def __post_init__(self):
        if self.frames < MIN_FRAMES:
            raise ValueError(f"a dense clip needs >= {MIN_FRAMES} frames, got {self.frames}")
        if self.grid < 4:
            raise ValueError(f"a dense clip needs a grid of >= 4 tokens a side, got {self.grid}")

    @property
    def size(self) -> int:
        """Frame side in px."""
        return self.grid * CELL

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    @property
    def visual_tokens(self) -> int:
        return self.frames * self.tokens_per_frame


FULL = DenseSize(32, 8)  # 2,048 visual tokens: the benchmark (trained on a GPU)
REDUCED = DenseSize(16, 6)  # 576 visual tokens: the size a CPU can train


DENSE_QUESTIONS: dict[str, str] = {
    **world.QUESTIONS,
    "corner_start": world.EXTRA_QUESTIONS["corner_start"],
    "flash": world.EXTRA_QUESTIONS["flash"],
    "ball": "where is the ball ?",
    "blinks": "how many times does the light blink ?",
    "order": "which comes first , the flash or the ball ?",
}
del DENSE_QUESTIONS["circle"]  # no circle here: the ball and the light take its place
DENSE_QUESTION_TYPES = tuple(DENSE_QUESTIONS)
DENSE_ANSWERS: dict[str, tuple[str, ...]] = {
    **{kind: world.ANSWERS[kind] for kind in world.QUESTION_TYPES if kind in DENSE_QUESTIONS},
    "corner_start": tuple(world.FLASH_COLOURS),
    "flash": tuple(world.FLASH_COLOURS),
    "ball": world.EDGES,
    "blinks": COUNT_WORDS,
    "order": ("flash", "ball"),
}
# Training-only stepping stones for the blinks (train_dense --light-stones; not evaluated). Counting
# needs the answer to gather the light's state from every frame, and no run that asked only the
# count learned to (a probe at the answer position reads it at chance after every layer). These ask
# where the light is (attend to it, lit or not, in any frame), its state in one frame (read it), and
# whether the count passes a threshold (the same gathering, each a yes / no readout; together they
# give the count, so they share a group).
LIGHT_STONES: dict[str, str] = {
    "light_where": "where is the light ?",
    "light_start": "what colour is the light at the start ?",
    "light_end": "what colour is the light at the end ?",
    "light_more_than_1": "does the light blink more than once ?",
    "light_more_than_2": "does the light blink more than twice ?",
    "light_more_than_3": "does the light blink more than three times ?",
}
LIGHT_STATE_WORDS = {False: "grey", True: "white"}
# every question a training chat may ask (the world's "where is the square" stepping stones too)
TRAINING_QUESTIONS: dict[str, str] = {**DENSE_QUESTIONS, **world.AUX_QUESTIONS, **LIGHT_STONES}
DENSE_GROUPS: tuple[tuple[str, ...], ...] = tuple(g for g in world.GROUPS if g != ("circle",)) + (
    ("corner_start",), ("flash",), ("ball",), ("blinks",), ("order",))
# the light's stepping stones: one group reads it, the other gathers it over the clip
LIGHT_STONE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("light_where", "light_start", "light_end"), ("light_more_than_1", "light_more_than_2", "light_more_than_3"))


@dataclass
class DenseClip:
    """One dense clip and the ground truth behind every answer. Boxes are (x0, y0, x1, y1) px,
    x1 / y1 exclusive; *_frames are frame indices."""

    frames: np.ndarray  # uint8 (T, size, size, 3)
    answers: dict[str, str]
    aux_answers: dict[str, str]
    square_boxes: np.ndarray  # (T, 4)
    square_change: int | None
    background_change: int | None
    corner_box: tuple[int, int, int, int]
    flash: tuple[int, int, int]  # (cx, cy, L1 radius)
    flash_frames: tuple[int, ...]
    ball: tuple[int, int, int]  # (cx, cy, r)
    ball_frames: tuple[int, ...]
    light_box: tuple[int, int, int, int]
    blink_frames: tuple[int, ...]
    dense_size: DenseSize = field(default=FULL)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


class _NoRoom(Exception):
    """The drawn layout leaves no place for an object: the clip is drawn again."""


def _boxes_meet(a, b, gap: int = GAP) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _place(rng, half: int, xs: tuple[int, int], ys: tuple[int, int], blocked, tries: int = 200):
    """A centre (cx, cy) in the inclusive ranges whose (2 half + 1) px box meets no blocked box."""
    if xs[0] > xs[1] or ys[0] > ys[1]:
        raise _NoRoom
    for _ in range(tries):
        cx, cy = int(rng.integers(xs[0], xs[1] + 1)), int(rng.integers(ys[0], ys[1] + 1))
        box = (cx - half, cy - half, cx + half + 1, cy + half + 1)
        if not any(_boxes_meet(box, b) for b in blocked):
            return cx, cy
    raise _NoRoom


def _middle_run(rng, num_frames: int, length: int) -> tuple[int, ...]:
    margin = num_frames // 4
    begin = int(rng.integers(margin, num_frames - margin - length + 1))
    return tuple(range(begin, begin + length))


def _ball_run(rng, num_frames: int, flash_frames: tuple[int, ...], first: str) -> tuple[int, ...]:
    """2 .. max(2, T//8) consecutive frames entirely before (first == 'ball') or after the flash."""
    length = int(rng.integers(2, max(2, num_frames // 8) + 1))
    if first == "ball":
        begin = int(rng.integers(0, flash_frames[0] - length + 1))
    else:
        begin = int(rng.integers(flash_frames[-1] + 1, num_frames - length + 1))
    return tuple(range(begin, begin + length))


def _blink_frames(rng, num_frames: int) -> tuple[int, ...]:
    """1-4 frames, no two adjacent, uniform over such sets of the drawn size."""
    count = int(rng.integers(1, MAX_BLINKS + 1))
    slots = np.sort(rng.choice(num_frames - count + 1, size=count, replace=False))
    return tuple(int(s) + i for i, s in enumerate(slots))


def _ball_region(edge: str, size: int, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Centre ranges (xs, ys) of a ball near the middle of `edge`."""
    near = (r + GAP, size // 4)
    along = (math.ceil(size / 3), size - math.ceil(size / 3))
    far = (size - 1 - size // 4, size - 1 - r - GAP)
    return {"left": (near, along), "right": (far, along), "top": (along, near), "bottom": (along, far)}[edge]


def _square_boxes(rng, direction: str, num_frames: int, size: int) -> np.ndarray:
    """The world's square path, edge to edge: (T, 4) boxes."""
    side = int(rng.integers(world.SQUARE_SIDE[0], world.SQUARE_SIDE[1] + 1))
    across = int(rng.integers(world.ACROSS_MARGIN, size - side - world.ACROSS_MARGIN + 1))
    first = int(rng.integers(0, world.EDGE_MARGIN + 1))
    last = size - side - int(rng.integers(0, world.EDGE_MARGIN + 1))
    along = np.round(np.linspace(first, last, num_frames)).astype(int)
    if direction in ("left", "up"):
        along = (size - side) - along
    boxes = np.zeros((num_frames, 4), int)
    for t in range(num_frames):
        x0, y0 = (along[t], across) if direction in ("left", "right") else (across, along[t])
        boxes[t] = (x0, y0, x0 + side, y0 + side)
    return boxes


@dataclass(frozen=True)
class _Story:
    """What a clip's answers depend on: drawn once, before any place (so a layout drawn again
    never changes an answer, and the answers stay uniform)."""

    backgrounds: tuple  # (start, end, change frame)
    squares: tuple
    direction: str
    corner_colour: str
    flash_colour: str
    flash_frames: tuple[int, ...]
    first: str
    ball_frames: tuple[int, ...]
    ball_edge: str
    blink_frames: tuple[int, ...]


def _story(rng, T: int) -> _Story:
    colours = tuple(world.FLASH_COLOURS)
    backgrounds = world.pick_change(rng, tuple(world.BACKGROUND_COLOURS), T)
    squares = world.pick_change(rng, tuple(world.SQUARE_COLOURS), T)
    direction = world.DIRECTIONS[int(rng.integers(len(world.DIRECTIONS)))]
    corner_colour = colours[int(rng.integers(len(colours)))]
    flash_colour = colours[int(rng.integers(len(colours)))]
    flash_frames = _middle_run(rng, T, int(rng.integers(1, 3)))
    first = ("flash", "ball")[int(rng.integers(2))]
    ball_frames = _ball_run(rng, T, flash_frames, first)
    ball_edge = world.EDGES[int(rng.integers(4))]
    return _Story(backgrounds, squares, direction, corner_colour, flash_colour, flash_frames, first, ball_frames,
                  ball_edge, _blink_frames(rng, T))


def _layout(rng, story: _Story, T: int, size: int):
    """-> (square boxes, corner box, light box, ball (cx, cy, r), flash (cx, cy, r)). The light
    (every frame: off the square's whole path) first, then the ball, then the flash, each clear of
    the four corner cells, of what is placed before it and of the square in its own frames."""
    boxes = _square_boxes(rng, story.direction, T, size)
    corners = world.corner_boxes(size)
    corner_box = corners[int(rng.integers(4))]
    placed = list(corners)
    lh = LIGHT_SIDE // 2
    lx, ly = _place(rng, lh, (lh, size - lh - 1), (lh, size - lh - 1), placed + [tuple(b) for b in boxes])
    light_box = (lx - lh, ly - lh, lx - lh + LIGHT_SIDE, ly - lh + LIGHT_SIDE)
    placed.append(light_box)
    r = int(rng.integers(BALL_RADIUS[0], BALL_RADIUS[1] + 1))
    xs, ys = _ball_region(story.ball_edge, size, r)
    bx, by = _place(rng, r, xs, ys, placed + [tuple(boxes[t]) for t in story.ball_frames])
    placed.append((bx - r, by - r, bx + r + 1, by + r + 1))
    fr = world.FLASH_RADIUS
    fx, fy = _place(rng, fr, (fr, size - fr - 1), (fr, size - fr - 1),
                    placed + [tuple(boxes[t]) for t in story.flash_frames])
    return boxes, corner_box, light_box, (bx, by, r), (fx, fy, fr)


def _render(story: _Story, T: int, size: int, boxes, corner_box, light_box, ball, flash) -> np.ndarray:
    bg_start, bg_end, bg_change = story.backgrounds
    sq_start, sq_end, sq_change = story.squares
    frames = np.empty((T, size, size, 3), np.uint8)
    ys, xs = np.mgrid[0:size, 0:size]
    diamond = np.abs(xs - flash[0]) + np.abs(ys - flash[1]) <= flash[2]
    disc = (xs - ball[0]) ** 2 + (ys - ball[1]) ** 2 <= ball[2] ** 2
    for t in range(T):
        frames[t] = world.BACKGROUND_COLOURS[bg_end if bg_change is not None and t >= bg_change else bg_start]
        x0, y0, x1, y1 = boxes[t]
        frames[t, y0:y1, x0:x1] = world.SQUARE_COLOURS[sq_end if sq_change is not None and t >= sq_change else sq_start]
        x0, y0, x1, y1 = light_box
        frames[t, y0:y1, x0:x1] = LIGHT_ON if t in story.blink_frames else LIGHT_OFF
        if t in story.ball_frames:
            frames[t][disc] = BALL_COLOUR
        if t in story.flash_frames:
            frames[t][diamond] = world.FLASH_COLOURS[story.flash_colour]
    x0, y0, x1, y1 = corner_box
    frames[0, y0:y1, x0:x1] = world.FLASH_COLOURS[story.corner_colour]
    return frames


def make_clip(rng: np.random.Generator, dense: DenseSize = FULL) -> DenseClip:
    """Draw one dense clip from `rng` (the same generator state gives the same clip). The story
    (every answer) is drawn first; a layout that leaves an object no room (rare, on small grids)
    is drawn again from the same stream, the story kept."""
    T, size = dense.frames, dense.size
    story = _story(rng, T)
    for _ in range(1000):
        try:
            layout = _layout(rng, story, T, size)
            break
        except _NoRoom:
            continue
    else:  # pragma: no cover - the ball's region always has room in some square position
        raise RuntimeError(f"no room for the dense world's objects on a {size} px frame")
    boxes, corner_box, light_box, ball, flash = layout
    (bg_start, bg_end, bg_change), (sq_start, sq_end, sq_change) = story.backgrounds, story.squares
    answers = {
        "square_start": sq_start, "square_end": sq_end, "direction": story.direction,
        "background_change": "yes" if bg_change is not None else "no",
        "background_start": bg_start, "background_end": bg_end,
        "corner_start": story.corner_colour, "flash": story.flash_colour, "ball": story.ball_edge,
        "blinks": COUNT_WORDS[len(story.blink_frames) - 1], "order": story.first,
    }
    return DenseClip(
        frames=_render(story, T, size, *layout), answers=answers,
        aux_answers={"square_where_start": world.START_EDGE[story.direction],
                     "square_where_end": world.END_EDGE[story.direction],
                     **light_stone_answers(light_box, story.blink_frames, T, size)},
        square_boxes=boxes, square_change=sq_change, background_change=bg_change, corner_box=corner_box,
        flash=flash, flash_frames=story.flash_frames, ball=ball, ball_frames=story.ball_frames,
        light_box=light_box, blink_frames=story.blink_frames, dense_size=dense,
    )


def heldout_clip(index: int, dense: DenseSize = FULL, seed: int = HELDOUT_SEED) -> DenseClip:
    """Clip `index` of the held-out set `seed` (independent of every other clip)."""
    return make_clip(np.random.default_rng([seed, index]), dense)


def heldout_clips(n: int, dense: DenseSize = FULL, seed: int = HELDOUT_SEED) -> list[DenseClip]:
    return [heldout_clip(i, dense, seed) for i in range(n)]


def light_stone_answers(light_box, blink_frames, num_frames: int, size: int) -> dict[str, str]:
    """The LIGHT_STONES' answers. "where": the frame edge nearest the light's centre (ties, rare,
    go to the first of left / right / top / bottom)."""
    x0, y0, x1, y1 = light_box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    distance = {"left": cx, "right": size - cx, "top": cy, "bottom": size - cy}
    yes_no = {True: "yes", False: "no"}
    return {
        "light_where": min(world.EDGES, key=distance.__getitem__),
        "light_start": LIGHT_STATE_WORDS[0 in blink_frames],
        "light_end": LIGHT_STATE_WORDS[num_frames - 1 in blink_frames],
        **{f"light_more_than_{n}": yes_no[len(blink_frames) > n] for n in (1, 2, 3)},
    }


def training_chat(clip: DenseClip, rng: np.random.Generator,
                  groups: tuple[tuple[str, ...], ...] = DENSE_GROUPS) -> list[tuple[str, str]]:
    """(question, answer) turns for one training chat: one question per group (the questions of
    a group give each other's answers away), in random order."""
    answers = {**clip.answers, **clip.aux_answers}
    turns = []
    for group in groups:
        kind = group[int(rng.integers(len(group)))]
        turns.append((TRAINING_QUESTIONS[kind], answers[kind]))
    return [turns[i] for i in rng.permutation(len(turns))]


def truth(clip: DenseClip) -> dict:
    """The ground truth in JSON-able form (what the held-out manifest and the oracle selection read)."""
    return {
        "answers": dict(clip.answers),
        "square_boxes": clip.square_boxes.tolist(),
        "square_change": clip.square_change,
        "background_change": clip.background_change,
        "corner_box": list(clip.corner_box),
        "flash": list(clip.flash),
        "flash_frames": list(clip.flash_frames),
        "ball": list(clip.ball),
        "ball_frames": list(clip.ball_frames),
        "light_box": list(clip.light_box),
        "blink_frames": list(clip.blink_frames),
    }
