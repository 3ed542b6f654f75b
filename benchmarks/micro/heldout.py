"""The micro model's held-out set as files: generated clips (mp4) + a questions CSV for `vidqa batch`.

    python benchmarks/micro/heldout.py                      # 300 clips, seed 1000 -> benchmarks/micro/heldout/
    python benchmarks/micro/heldout.py --clips 40 --out /tmp/heldout

Clip i is `microworld.world.heldout_clip(i, seed)` (8 frames, 112 px), written with
`world.write_clip` (mp4, 4 fps; lossy, so the model sees what `vidqa` decodes, as a user's file
would be). Every clip is asked every question type of `world.QUESTIONS` (7 per clip), so the
set is regenerable from (seed, clips) and nothing here needs to be committed.

questions.csv columns: id, video, question, expected (the ground truth), type, clip.
- id = `c{clip:04d}-{type}`, e.g. `c0042-square_start`: the type can be read back from the id
  (`type_of_id`), because `vidqa batch` ignores columns it does not know (`type`, `clip`) and
  its records carry only id/video/question/expected.
- video is relative to the CSV's folder (`clips/c0042.mp4`), as `vidqa batch` resolves it.

`manifest.json` records the seed, clip count, frames, fps and, per clip, the ground truth that
`benchmarks/micro/accuracy.py` needs besides the answers (square boxes, circle, change frames)
for its oracle selection. Existing files are reused when the manifest matches (same seed,
frames, fps, and at least the clips asked); otherwise the folder is regenerated. A dense folder
also records a digest of held-out clip 0's pixels, so a change to how the dense world draws (the
light's size, say) rewrites the clips instead of reusing ones the manifest no longer describes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "heldout"
DEFAULT_CLIPS = 300
FPS = 4.0
CSV_NAME = "questions.csv"
MANIFEST_NAME = "manifest.json"
COLUMNS = ("id", "video", "question", "expected", "type", "clip")


def clip_id(index: int, kind: str) -> str:
    return f"c{index:04d}-{kind}"


def type_of_id(record_id: str) -> str | None:
    """`c0042-square_start` -> `square_start` (None for an id not made here)."""
    head, sep, kind = str(record_id).partition("-")
    return kind if sep and head.startswith("c") and head[1:].isdigit() else None


def clip_of_id(record_id: str) -> int | None:
    head, sep, _ = str(record_id).partition("-")
    return int(head[1:]) if sep and head.startswith("c") and head[1:].isdigit() else None


def _truth(clip) -> dict:
    """The ground truth of a WorldClip in JSON-able form (what the oracle selection needs)."""
    return {
        "answers": dict(clip.answers),
        "square_boxes": clip.square_boxes.tolist(),
        "circle": None if clip.circle is None else list(clip.circle),
        "circle_frames": list(clip.circle_frames),
        "square_change": clip.square_change,
        "background_change": clip.background_change,
        "flash": None if clip.flash is None else list(clip.flash),
        "flash_frames": list(clip.flash_frames),
        "corner_box": None if clip.corner_box is None else list(clip.corner_box),
    }


def dense_world_digest(dense_size, seed: int) -> str:
    """SHA-256 (16 hex digits) of held-out clip 0's pixels: changes whenever the dense world draws differently."""
    import hashlib

    from microworld import dense

    return hashlib.sha256(dense.heldout_clip(0, dense_size, seed).frames.tobytes()).hexdigest()[:16]


def generate(
    out: str | Path = DEFAULT_OUT,
    clips: int | Sequence[int] = DEFAULT_CLIPS,
    seed: int | None = None,
    num_frames: int | None = None,
    types: Sequence[str] | None = None,
    force: bool = False,
    extras: bool = False,
    dense_size=None,
) -> Path:
    """Write clips/cNNNN.mp4, questions.csv and manifest.json under `out` -> the CSV's path.

    clips: a count n (clips 0..n-1) or explicit clip indices (e.g. a test's subset).
    types: question types to ask (default: all of world.QUESTION_TYPES, in that order, plus
    world.EXTRA_QUESTION_TYPES with `extras`).
    extras: clips with the flash and the corner block (the SmolLM2 benchmark model's world).
    dense_size: a microworld.dense.DenseSize: the dense world's clips and questions instead
    (num_frames and extras are ignored; its frame count and size are the DenseSize's).
    """
    from microworld import dense, world

    seed = world.HELDOUT_SEED if seed is None else int(seed)
    num_frames = world.NUM_FRAMES if num_frames is None else int(num_frames)
    if dense_size is not None:
        num_frames, extras = dense_size.frames, False
    indices = list(range(clips)) if isinstance(clips, int) else [int(i) for i in clips]
    known_types = world.QUESTION_TYPES + (world.EXTRA_QUESTION_TYPES if extras else ())
    questions = world.SMOL_QUESTIONS
    if dense_size is not None:
        known_types, questions = dense.DENSE_QUESTION_TYPES, dense.DENSE_QUESTIONS
    types = tuple(types) if types else known_types
    unknown = [t for t in types if t not in known_types]
    if unknown:
        raise ValueError(f"unknown question types {unknown}; known: {', '.join(known_types)}")
    out = Path(out)
    manifest_path = out / MANIFEST_NAME
    settings = {"seed": seed, "frames": num_frames, "fps": FPS, "size": world.SIZE}
    if extras:
        settings["extras"] = True
    if dense_size is not None:
        settings.update(size=dense_size.size, world="dense", grid=dense_size.grid,
                        world_digest=dense_world_digest(dense_size, seed))
    old = None
    if manifest_path.exists() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = None
    reuse = (old is not None and all(old.get(k) == v for k, v in settings.items())
             and bool(old.get("extras")) == extras and old.get("world") == settings.get("world"))
    known = {int(k): v for k, v in (old or {}).get("clips", {}).items()} if reuse else {}

    (out / "clips").mkdir(parents=True, exist_ok=True)
    truth: dict[int, dict] = {}
    rows = []
    for index in indices:
        video = out / "clips" / f"c{index:04d}.mp4"
        if index in known and video.exists() and video.stat().st_size > 0:
            truth[index] = known[index]
        else:
            if dense_size is not None:
                clip = dense.heldout_clip(index, dense_size, seed)
                world.write_clip(video, clip, fps=FPS)
                truth[index] = dict(dense.truth(clip), size=dense_size.size)
            else:
                clip = world.heldout_clip(index, seed, num_frames, extras=extras)
                world.write_clip(video, clip, fps=FPS)
                truth[index] = _truth(clip)
        for kind in types:
            answer = truth[index]["answers"].get(kind)
            if answer is None:  # a type this clip length cannot answer (1-frame clips)
                continue
            rows.append({
                "id": clip_id(index, kind), "video": f"clips/c{index:04d}.mp4", "question": questions[kind],
                "expected": answer, "type": kind, "clip": index,
            })
    manifest = dict(settings, clips={str(i): truth[i] for i in indices}, types=list(types), questions=len(rows))
    manifest_path.write_text(json.dumps(manifest) + "\n")
    csv_path = out / CSV_NAME
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def read_questions(csv_path: str | Path) -> list[dict]:
    """The rows of a questions.csv written by `generate` (dicts with the COLUMNS)."""
    with Path(csv_path).open(newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def read_manifest(folder: str | Path) -> dict:
    manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    manifest["clips"] = {int(k): v for k, v in manifest["clips"].items()}
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/micro/heldout.py",
                                     description="Generate the micro model's held-out clips + questions CSV.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    parser.add_argument("--clips", type=int, default=DEFAULT_CLIPS, help="clips 0..N-1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="held-out seed (default: world.HELDOUT_SEED = 1000)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: 8)")
    parser.add_argument("--force", action="store_true", help="rewrite every clip even if the manifest matches")
    parser.add_argument("--extras", action="store_true",
                        help="the SmolLM2 model's world: add the flash and the corner block (9 questions per clip)")
    args = parser.parse_args(argv)
    path = generate(args.out, args.clips, args.seed, args.frames, force=args.force, extras=args.extras)
    print(f"{len(read_questions(path))} questions about {args.clips} clips: {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing
    sys.exit(main())
