"""What a preset did with the few-frame events' own tokens: kept alone, merged, or dropped.

    python benchmarks/micro/event_fates.py --model CHECKPOINT --heldout FOLDER --presets visionzip \
        --keeps 0.25,0.5 [--events ball,flash] [--clips 48] [--frames 16] [--grid 6]

frame_budget.py reads kept-token counts from records, which says nothing for a merging preset (a
merged token counts as kept). This asks the dense world's flash / ball questions again through
the Python API (float32, the sweep's settings) and reads each request's token fates
(pruning/core/provenance.py): for every token whose 28 px cell the event covers in its own
frames, whether it reached the LLM's last layer alone, as the token that carries a merge group
(a merge's representative), merged into another token's group (its content averaged in), or
dropped. A clip is labelled by the best fate among its event tokens, in that order, and the
answers are split by that label. The truth (where and when the event is) comes from
microworld.dense, the same seeded clips the held-out folder's mp4s were written from.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))

import torch  # noqa: E402

from microworld import dense  # noqa: E402
from vidqa.batch.summary import score  # noqa: E402
from vidqa.pruning.core.provenance import KEPT  # noqa: E402

FATES = ("alone", "carries a merge", "merged into another", "dropped")
QUESTIONS = {"flash": "what colour is the flash ?", "ball": "where is the ball ?"}
CELL = 28  # px a visual token covers: SigLIP patch 14 x pixel shuffle 2 (microworld.dense)


def event_cells(clip: dense.DenseClip, event: str, grid: int) -> list[int]:
    """Flat token indices (frame-major, then row, col) of the cells the event covers in its frames."""
    cx, cy, radius = clip.flash if event == "flash" else clip.ball
    frames = clip.flash_frames if event == "flash" else clip.ball_frames
    cols = range(max(0, (cx - radius) // CELL), min(grid - 1, (cx + radius) // CELL) + 1)
    rows = range(max(0, (cy - radius) // CELL), min(grid - 1, (cy + radius) // CELL) + 1)
    return [(t * grid + r) * grid + c for t in frames for r in rows for c in cols]


def token_fate(fates, index: int, outcome: torch.Tensor | None = None) -> str:
    """The fate of one token of the unpruned video (outcome: fates.outcome(), when already made)."""
    if int((fates.outcome() if outcome is None else outcome)[index]) != KEPT:
        return "dropped"
    if int(fates.group[index]) < 0:
        return "alone"
    carries = fates.representative is not None and bool(fates.representative[index])
    return "carries a merge" if carries else "merged into another"


def clip_fate(fates, cells: list[int]) -> str:
    """The best fate among the event's tokens (FATES order)."""
    outcome = fates.outcome()
    return min((token_fate(fates, i, outcome) for i in cells), key=FATES.index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--heldout", required=True, type=Path, help="folder with clips/cNNNN.mp4")
    parser.add_argument("--presets", default="visionzip")
    parser.add_argument("--keeps", default="0.25,0.5")
    parser.add_argument("--events", default="ball,flash")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--grid", type=int, default=6)
    parser.add_argument("--params", default="", help="-P overrides for every preset, comma-separated k=v")
    args = parser.parse_args()

    from vidqa.api import Settings, open_model

    torch.set_num_threads(1)
    size = dense.DenseSize(args.frames, args.grid)
    params = tuple(p for p in args.params.split(",") if p)
    model = open_model(Settings(model=args.model, device="cpu", dtype="float32", frames=args.frames,
                                max_new_tokens=3))
    tally: dict = collections.defaultdict(lambda: [0, 0])  # (preset, keep, event, fate) -> [right, asked]
    for index in range(args.clips):
        clip = dense.heldout_clip(index, size)
        video = args.heldout / "clips" / f"c{index:04d}.mp4"
        for preset in args.presets.split(","):
            for keep in (float(k) for k in args.keeps.split(",")):
                for event in args.events.split(","):
                    result = model.ask(video, QUESTIONS[event], prune=preset, keep=keep, params=params)
                    fate = clip_fate(result.answer.kept, event_cells(clip, event, args.grid))
                    cell = tally[(preset, keep, event, fate)]
                    cell[0] += bool(score(result.text, clip.answers[event], ()))
                    cell[1] += 1
        print(f"clip {index + 1}/{args.clips}", file=sys.stderr, flush=True)
    print("| preset | keep | event | " + " | ".join(FATES) + " |")
    print("|---|---:|---|" + "---:|" * len(FATES))
    for preset, keep, event in sorted({key[:3] for key in tally}):
        cells = [tally.get((preset, keep, event, fate), [0, 0]) for fate in FATES]
        print(f"| {preset} | {keep:g} | {event} | " + " | ".join(f"{r} of {n}" if n else "-" for r, n in cells) + " |")


if __name__ == "__main__":
    main()
