"""Where PruneVid loses the ball: does its static test merge the ball's cells away?

    python benchmarks/micro/prunevid_static.py --model DIR --heldout FOLDER --records SWEEP.jsonl[.gz] \
        [--clips 48] [--tau 0.8]

PruneVid's first stage (vidqa/pruning/methods/prunevid.py) splits the clip into temporal
segments and averages over the segment every token location whose mean pairwise cosine across
the segment's frames is above tau. A ball that shows in 2 of a segment's frames changes its cell
in only those frames, so over a long segment the cell can still pass as static and be averaged
with the frames without it. For every held-out dense clip this runs the model's vision encoder on
the clip (through vidqa, as a request does), computes the same segments and static masks, and
checks the cells the ball covers in its first frame; then counts the preset's answers to "where
is the ball ?" (from a sweep's records) by whether every ball cell was judged static.
Prints one line per clip and the 2 x 2 count; CPU, about a minute for 48 clips at 16 x 36.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from event_halves import read  # noqa: E402  (the sibling script's record reader)

from microworld import dense  # noqa: E402


def disc_cells(centre_x: int, centre_y: int, radius: int, cell: int, cols: int) -> set[int]:
    """Token indices (row-major, `cols` a row) of the `cell` px cells a disc's centre and the
    ends of its two diameters (the 3 x 3 points of its bounding box) fall in."""
    return {(y // cell) * cols + (x // cell)
            for x in (centre_x - radius, centre_x, centre_x + radius)
            for y in (centre_y - radius, centre_y, centre_y + radius)}


def read_records(path: Path, preset: str) -> dict[str, dict]:
    return {row["id"]: row for row in read([path]) if row["preset"] == preset}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the assembled dense checkpoint")
    parser.add_argument("--heldout", required=True, type=Path, help="held-out folder (benchmarks/micro/heldout.py)")
    parser.add_argument("--records", required=True, type=Path, help="a sweep's records with PruneVid's ball answers")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--frames", type=int, default=dense.REDUCED.frames)
    parser.add_argument("--grid", type=int, default=dense.REDUCED.grid)
    parser.add_argument("--tau", type=float, default=0.8, help="PruneVid's static threshold (its default)")
    args = parser.parse_args(argv)

    import torch

    from vidqa.engine import request as engine
    from vidqa.models import load_model
    from vidqa.pruning.methods.prunevid import SpatioTemporalMerge
    from vidqa.pruning.ops.segments import prunevid_segments, segment_static_masks

    torch.set_num_threads(1)
    size = dense.DenseSize(args.frames, args.grid)
    adapter = load_model(args.model, device="cpu", dtype="float32")
    answers = read_records(args.records, "prunevid")
    merge = SpatioTemporalMerge(tau=args.tau)  # the preset's stage 1, its other parameters at their defaults
    counts = collections.Counter()
    for index in range(args.clips):
        truth = dense.heldout_clip(index, size)
        clip = engine.decode_video(str(args.heldout / "clips" / f"c{index:04d}.mp4"), engine.FrameOptions(frames=size.frames))
        with torch.no_grad():
            tokens = adapter.encode_video(adapter.prompt_for_clip(clip, dense.DENSE_QUESTIONS["ball"]))
        frames, rows, cols = tokens.grid
        grid = tokens.features.view(frames, rows * cols, -1)
        segments = prunevid_segments(grid.float().mean(dim=1), cluster_ratio=merge.temporal_ratio, k=merge.k)
        static = segment_static_masks(grid, segments, merge.tau)
        first = truth.ball_frames[0]
        segment = next(s for s, (start, end) in enumerate(segments) if start <= first < end)
        cells = sorted(disc_cells(*truth.ball, dense.CELL, cols))
        all_static = all(bool(static[segment, cell]) for cell in cells)
        correct = answers[f"c{index:04d}-ball"]["correct"]
        counts[(all_static, correct)] += 1
        print(f"clip {index}: ball frames {list(truth.ball_frames)}, segment {list(segments[segment])}, "
              f"ball cells static {[bool(static[segment, c]) for c in cells]}, answered right: {correct}", flush=True)
    for judged in (True, False):
        right, wrong = counts[(judged, True)], counts[(judged, False)]
        label = "every ball cell static" if judged else "a ball cell dynamic   "
        print(f"{label}: {right + wrong} clips, PruneVid right on {right}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
