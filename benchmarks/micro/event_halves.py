"""Which half of the clip do a preset's missed events fall in? An end bias, read from records.

    python benchmarks/micro/event_halves.py RECORDS.jsonl[.gz] [MORE ...] [--frames 16] [--grid 6] \
        [--presets fastv,sparsevlm,random]

A preset that scores tokens by attention at an early LLM layer keeps what the model attends to,
and a model that tilts its attention towards the end of the clip then loses events early in it.
For the dense world's flash and ball questions (each event in a few consecutive frames) this
splits a sweep's answers by where the event is: all its frames in the first half of the clip,
all in the second, or across the middle, and prints each preset's right answers per split. The
truth comes from the held-out clips themselves (microworld.dense), so only the records are read.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from microworld import dense  # noqa: E402

EVENTS = ("flash", "ball")
HALVES = ("first half", "second half", "across")


def clip_half(frames: tuple[int, ...], num_frames: int) -> str:
    """'first half' / 'second half' when every frame is in it, else 'across'."""
    middle = num_frames // 2
    if max(frames) < middle:
        return "first half"
    if min(frames) >= middle:
        return "second half"
    return "across"


def read(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


def tally(rows: list[dict], size: dense.DenseSize) -> dict:
    """{(preset, keep): {(event, half): [right, asked]}} over the answered flash / ball records."""
    truth: dict[int, dense.DenseClip] = {}
    counts: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    for row in rows:
        clip_id, _, kind = row["id"].partition("-")
        if kind not in EVENTS or row.get("error"):
            continue
        index = int(clip_id[1:])
        if index not in truth:
            truth[index] = dense.heldout_clip(index, size)
        frames = truth[index].ball_frames if kind == "ball" else truth[index].flash_frames
        cell = counts[(row["preset"], row["keep"])][(kind, clip_half(frames, size.frames))]
        cell[0] += bool(row["correct"])
        cell[1] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", type=Path)
    parser.add_argument("--frames", type=int, default=dense.REDUCED.frames)
    parser.add_argument("--grid", type=int, default=dense.REDUCED.grid)
    parser.add_argument("--presets", default=None, help="comma-separated (default: every one in the records)")
    args = parser.parse_args(argv)
    wanted = set(args.presets.split(",")) if args.presets else None
    counts = tally(read(args.records), dense.DenseSize(args.frames, args.grid))
    for (preset, keep), cells in counts.items():
        if wanted is not None and preset not in wanted:
            continue
        parts = [f"{kind} {half} {cells[(kind, half)][0]}/{cells[(kind, half)][1]}"
                 for kind in EVENTS for half in HALVES if cells[(kind, half)][1]]
        print(f"{preset} (keep {keep}): " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
