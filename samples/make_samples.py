"""Regenerate the sample clips and questions in samples/ (deterministic).

Usage: python samples/make_samples.py
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from vidqa.synthetic import (  # noqa: E402
    BLUE,
    RED,
    moving_square_frames,
    static_left_half_frames,
    three_scene_frames,
    write_video,
)

SIZE = (192, 256)  # H, W

QUESTIONS = [
    # id, video, question, answer, options ("|"-separated; empty for free-form)
    ("square-direction", "square.mp4", "Which way does the square move?", "B",
     "A. left|B. right|C. up|D. down"),
    ("square-start-colour", "square.mp4", "What colour is the square at the start of the video?",
     "red", ""),
    ("square-end-colour", "square.mp4", "What colour is the square at the end of the video?", "C",
     "A. red|B. green|C. blue|D. yellow"),
    ("scenes-count", "scenes.mp4", "How many different scenes does the video show?", "C",
     "A. 1|B. 2|C. 3|D. 4"),
    ("scenes-order", "scenes.mp4", "In what order do the background colours appear?",
     "red, green, blue", ""),
    ("static-half", "static.mp4", "Which half of the picture never changes?", "A",
     "A. left|B. right|C. top|D. bottom"),
]


def main() -> None:
    clips = {
        # 80 frames at 10 fps: a square crossing left to right, turning from red to blue.
        "square.mp4": (
            moving_square_frames(80, size=SIZE, square=40, color=RED, end_color=BLUE), 10),
        # 3 x 24 frames at 8 fps: red stripes, green checkerboard, blue diagonal stripes.
        "scenes.mp4": (three_scene_frames((24, 24, 24), size=SIZE), 8),
        # 64 frames at 8 fps: fixed checkerboard on the left, moving shapes on the right.
        "static.mp4": (static_left_half_frames(64, size=SIZE, right="shapes"), 8),
    }
    total = 0
    for name, (frames, fps) in clips.items():
        path = write_video(HERE / name, frames, fps=fps)
        total += path.stat().st_size
        print(f"{path.relative_to(HERE.parent)}: {len(frames)} frames at {fps} fps, "
              f"{path.stat().st_size / 1024:.0f} KiB")
    with open(HERE / "questions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video", "question", "answer", "options"])
        writer.writerows(QUESTIONS)
    print(f"samples/questions.csv: {len(QUESTIONS)} questions; clips total {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
