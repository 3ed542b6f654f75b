"""Regenerate the sample clips and questions in samples/ from the micro model's synthetic world.

Usage: python samples/make_samples.py

Each clip is drawn from `microworld.world` (8 frames of 112 x 112 px, written at 4 fps, the
format `--model micro` was trained on), so the bundled micro model can answer its questions
offline. A clip is the first draw of the stream `default_rng([SEED, i])` that matches a short
description (what the README's examples talk about); questions.csv asks every question type of
the world about every clip, with the world's ground truth in the `expected` column.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from microworld import world  # noqa: E402

SEED = 2026
FPS = 4.0

# clip name -> what it must show (answers of world.QUESTIONS); the first matching draw is used.
WANTED = {
    # the README's first command: a square crossing to the right, red at the start, blue at the end
    "square.mp4": {"direction": "right", "square_start": "red", "square_end": "blue",
                   "background_change": "no", "circle": "no"},
    # the background changes half-way, a circle shows up for a few frames, the square goes up
    "background.mp4": {"direction": "up", "background_change": "yes", "circle": "yes",
                       "square_start": "yellow"},
    # nothing changes but the square's place: a green square moving left on black
    "left.mp4": {"direction": "left", "square_start": "green", "square_end": "green",
                 "background_start": "black", "background_change": "no"},
}


def find_clip(wanted: dict[str, str], limit: int = 100_000) -> tuple[int, world.WorldClip]:
    for index in range(limit):
        clip = world.make_clip(np.random.default_rng([SEED, index]))
        if all(clip.answers.get(kind) == answer for kind, answer in wanted.items()):
            return index, clip
    raise SystemExit(f"no clip matching {wanted} in {limit} draws")


def main() -> None:
    rows = []
    for name, wanted in WANTED.items():
        index, clip = find_clip(wanted)
        path = world.write_clip(HERE / name, clip, fps=FPS)
        print(f"{path.relative_to(HERE.parent)}: draw {index}, {clip.num_frames} frames at {FPS:g} fps, "
              f"{path.stat().st_size / 1024:.1f} KiB")
        stem = Path(name).stem
        for kind in clip.question_types():
            rows.append((f"{stem}-{kind}", name, world.QUESTIONS[kind], clip.answers[kind]))
    with open(HERE / "questions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", "video", "question", "expected"])
        writer.writerows(rows)
    print(f"samples/questions.csv: {len(rows)} questions")


if __name__ == "__main__":
    main()
