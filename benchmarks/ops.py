"""How many operations and host syncs does each pruning stage launch? A CPU proxy for GPU cost.

On a GPU a pruning stage built from many small ops is launch-bound: each dispatched op costs a
few microseconds of launch whatever its size, and each host sync (`.item()`, `.tolist()`,
`nonzero`, a bool mask index: anything whose result Python must read) stalls the CPU until the
GPU queue drains. Both are visible on a CPU with `torch.profiler`, so this benchmark counts them,
per stage, through the real request path (`vidqa.api.Model.ask`) on the tiny random
LLaVA-OneVision of the tests (16 tokens a frame), at several frame counts. A stage whose counts
grow with the frames has a per-frame (or per-segment) Python loop.

Counted, per stage (the `vidqa.stage:<name>` profiler ranges the pruner and the decoder hooks
open around every stage):
- ops: every `aten::` event inside the range, nested ones included (a composite op's parts are
  kernels too);
- syncs: `aten::_local_scalar_dense` (item, int(), float(), bool(), `if tensor`), `aten::nonzero`
  (bool-mask indexing, `torch.where(mask)`), `aten::masked_select`, the unique ops, and
  `Tensor.tolist` calls (recorded as `vidqa.sync:tolist` while counting: the profiler sees no op).
Also the whole request minus `none`'s at the same frames (what the preset adds end to end, its
verification and bookkeeping included).

    python benchmarks/ops.py                      # every preset at 8, 32, 128 frames
    python benchmarks/ops.py --presets evs,fastvid --frames 8,32 --json out.json

Prints a markdown table (docs/benchmarks.md, "Operations and host syncs"). Counts, not times:
the same on any machine for the same torch and transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

STAGE_PREFIX = "vidqa.stage:"
TOLIST_EVENT = "vidqa.sync:tolist"
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
            "aten::unique_dim", "aten::unique_consecutive", "aten::unique_dim_consecutive"}
DEFAULT_PRESETS = ("evs", "vidcom2", "fastv", "dycoke", "visionzip", "sparsevlm", "adatp", "prunevid", "fastvid",
                   "holitom", "flashvid")
KEEP = {"dycoke": 0.6}  # DyCoke's merge cannot reach 0.25 on this clip
QUESTION = "what happens in this video ?"


@dataclass
class Counts:
    ops: int = 0
    syncs: int = 0
    sync_kinds: dict = field(default_factory=dict)


@contextlib.contextmanager
def tolist_marked():
    """While counting, every Tensor.tolist call opens a profiler range (it dispatches no op)."""
    original = torch.Tensor.tolist

    def marked(self, *args, **kwargs):
        with record_function(TOLIST_EVENT):
            return original(self, *args, **kwargs)

    torch.Tensor.tolist = marked
    try:
        yield
    finally:
        torch.Tensor.tolist = original


def _stage_of(event) -> str | None:
    """The innermost `vidqa.stage:` range around a profiler event, or None."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(STAGE_PREFIX):
            return parent.name[len(STAGE_PREFIX):]
        parent = parent.cpu_parent
    return None


def count_events(events) -> dict[str | None, Counts]:
    """Profiler events -> Counts per stage (None: outside every stage)."""
    counts: dict[str | None, Counts] = {}
    kinds: dict[str | None, Counter] = {}
    for event in events:
        is_op = event.name.startswith("aten::")
        is_sync = event.name in SYNC_OPS or event.name == TOLIST_EVENT
        if not (is_op or is_sync):
            continue
        stage = _stage_of(event)
        entry = counts.setdefault(stage, Counts())
        entry.ops += is_op
        if is_sync:
            entry.syncs += 1
            kinds.setdefault(stage, Counter())[event.name.removeprefix("aten::")] += 1
    for stage, kind in kinds.items():
        counts[stage].sync_kinds = dict(kind)
    return counts


def profiled(function) -> dict[str | None, Counts]:
    """Run `function()` under the CPU profiler -> Counts per stage."""
    with tolist_marked(), profile(activities=[ProfilerActivity.CPU]) as prof:
        function()
    return count_events(prof.events())


def total(counts: dict[str | None, Counts]) -> Counts:
    whole = Counts()
    for entry in counts.values():
        whole.ops += entry.ops
        whole.syncs += entry.syncs
    return whole


def build(workdir: Path, max_frames: int):
    """The tiny LLaVA-OneVision (cached in workdir) and a clip with a static half and moving shapes."""
    from vidqa.testing.builders import build_tiny_llava_onevision
    from vidqa.testing.videos import static_left_half_frames, write_video

    model_dir = workdir / "tiny-llava"
    if not (model_dir / "config.json").exists():
        build_tiny_llava_onevision(model_dir)
    video = workdir / f"clip{max_frames}.mp4"
    if not video.exists():
        frames = static_left_half_frames(num_frames=max_frames, size=(112, 112), right="shapes")
        write_video(video, frames, fps=8.0)
    return model_dir, video


def measure(presets, frame_counts, workdir: Path) -> list[dict]:
    from vidqa import api

    model_dir, video = build(workdir, max(frame_counts))
    model = api.open_model(api.Settings(model=str(model_dir), device="cpu", dtype="float32", max_new_tokens=2))
    rows = []
    torch.set_num_threads(1)
    for frames in frame_counts:
        clip = api.decode_video(video, model.settings.replace(frames=frames))
        model.ask(clip, QUESTION)  # warm-up: lazy initialisation is nobody's cost
        baseline = total(profiled(lambda: model.ask(clip, QUESTION)))
        for preset in presets:
            keep = KEEP.get(preset, 0.25)
            model.ask(clip, QUESTION, prune=preset, keep=keep)
            counts = profiled(lambda: model.ask(clip, QUESTION, prune=preset, keep=keep))
            whole = total(counts)
            stages = {name: asdict(entry) for name, entry in counts.items() if name is not None}
            rows.append({
                "preset": preset, "keep": keep, "frames": frames,
                "stage_ops": sum(s["ops"] for s in stages.values()),
                "stage_syncs": sum(s["syncs"] for s in stages.values()),
                "request_ops_over_none": whole.ops - baseline.ops,
                "request_syncs_over_none": whole.syncs - baseline.syncs,
                "stages": stages,
            })
    return rows


def table(rows: list[dict], frame_counts) -> str:
    lines = ["| preset | stage ops (" + " → ".join(f"{f} fr" for f in frame_counts) + ") | stage syncs | "
             "request ops over none | request syncs over none |", "|---|---:|---:|---:|---:|"]
    for preset in dict.fromkeys(row["preset"] for row in rows):
        mine = [next(r for r in rows if r["preset"] == preset and r["frames"] == f) for f in frame_counts]

        def series(key):
            return " → ".join(f"{r[key]:,}" for r in mine)

        lines.append(f"| {preset} | {series('stage_ops')} | {series('stage_syncs')} | "
                     f"{series('request_ops_over_none')} | {series('request_syncs_over_none')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--frames", default="8,32,128", help="frame counts, comma-separated")
    parser.add_argument("--workdir", type=Path, default=None, help="where the tiny model and clip are cached")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    frame_counts = [int(f) for f in args.frames.split(",")]
    presets = [p for p in args.presets.split(",") if p]
    with tempfile.TemporaryDirectory() as scratch:
        rows = measure(presets, frame_counts, args.workdir or Path(scratch))
    print(table(rows, frame_counts))
    if args.json is not None:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
