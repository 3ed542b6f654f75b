"""Where does a frame selector's budget go? Kept tokens per kind of frame, read from records.

    python benchmarks/micro/frame_budget.py RECORDS.jsonl[.gz] [MORE ...] [--frames 16] [--grid 6] \
        [--presets evs] [--keeps 0.1]

For the dense world's flash / ball / order records of presets that drop whole tokens before the
LLM (EVS; a merging preset's record counts merged tokens as kept, so its figures say nothing
here, and the reference selections' records carry no kept tokens), this sorts each later frame (1..T-1) by what changes in it, in this
order: "event" (the flash or the ball appears, shows or disappears: shown at t or at t-1),
"light" (the light turns on or off: lit at t or at t-1), "background" (the background changes
colour), "square colour" (the square changes colour), else "motion" (only the square moves); and
prints the mean kept tokens a clip in frame 0 and in each kind, and the flash / ball answers right
split by whether any token of the event's own frames was kept. The truth comes from the held-out
clips themselves (microworld.dense); only the records are read.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))
sys.path.insert(0, str(ROOT))

from event_halves import read  # noqa: E402  (the sibling script's record reader)

from microworld import dense  # noqa: E402

KINDS = ("event", "light", "background", "square colour", "motion")
EVENTS = ("flash", "ball")


def frame_kinds(clip: dense.DenseClip) -> list[str]:
    """The kind of each frame 1..T-1 (index 0 is frame 1), by the first rule that holds."""
    shown = set(clip.flash_frames) | set(clip.ball_frames)
    lit = set(clip.blink_frames)
    kinds = []
    for t in range(1, clip.frames.shape[0]):
        if t in shown or t - 1 in shown:
            kinds.append("event")
        elif t in lit or t - 1 in lit:
            kinds.append("light")
        elif t == clip.background_change:
            kinds.append("background")
        elif t == clip.square_change:
            kinds.append("square colour")
        else:
            kinds.append("motion")
    return kinds


def tally(rows: list[dict], size: dense.DenseSize, presets: set[str] | None = None,
          keeps: set[float] | None = None) -> dict:
    """{(preset, keep): {"clips": n, "frame 0": tokens, kind: tokens ..., (event, seen): [right, asked]}}
    over one record a clip for the token sums (each question of a clip keeps the same tokens
    before the LLM) and every flash / ball record for the answers."""
    truth: dict[int, dense.DenseClip] = {}
    out: dict = collections.defaultdict(lambda: collections.defaultdict(float))
    counted: set = set()
    for row in rows:
        clip_id, _, question = row["id"].partition("-")
        if (row.get("error") or not row.get("kept") or (presets and row["preset"] not in presets)
                or (keeps and row["keep"] not in keeps)):
            continue
        index = int(clip_id[1:])
        if index not in truth:
            truth[index] = dense.heldout_clip(index, size)
        clip, kept = truth[index], row["kept"]["kept_per_frame"]
        cell = out[(row["preset"], row["keep"])]
        if (row["preset"], row["keep"], index) not in counted:
            counted.add((row["preset"], row["keep"], index))
            cell["clips"] += 1
            cell["frame 0"] += kept[0]
            for t, kind in enumerate(frame_kinds(clip), start=1):
                cell[kind] += kept[t]
        if question in EVENTS:
            frames = clip.flash_frames if question == "flash" else clip.ball_frames
            seen = any(kept[t] for t in frames)
            right_asked = cell.setdefault((question, seen), [0, 0])
            right_asked[0] += bool(row["correct"])
            right_asked[1] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", type=Path)
    parser.add_argument("--frames", type=int, default=dense.REDUCED.frames)
    parser.add_argument("--grid", type=int, default=dense.REDUCED.grid)
    parser.add_argument("--presets", default="evs", help="comma-separated (default: evs)")
    parser.add_argument("--keeps", default=None, help="comma-separated (default: every one in the records)")
    args = parser.parse_args(argv)
    keeps = {float(k) for k in args.keeps.split(",")} if args.keeps else None
    counts = tally(read(args.records), dense.DenseSize(args.frames, args.grid), set(args.presets.split(",")), keeps)
    for (preset, keep), cell in sorted(counts.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        n = cell["clips"]
        tokens = ", ".join(f"{kind} {cell[kind] / n:.1f}" for kind in ("frame 0",) + KINDS)
        answers = ", ".join(f"{event} {'seen' if seen else 'unseen'} {cell[(event, seen)][0]}/{cell[(event, seen)][1]}"
                            for event in EVENTS for seen in (True, False) if (event, seen) in cell)
        print(f"{preset} (keep {keep}, {n} clips): mean kept tokens a clip: {tokens}; right: {answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
