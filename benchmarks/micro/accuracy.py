"""Accuracy of every pruning preset on the micro model's held-out set, per question type.

    python benchmarks/micro/accuracy.py                       # everything; ~6 min on 2 idle CPU cores
    python benchmarks/micro/accuracy.py --skip-run            # only re-read the results, redo tables + plot
    python benchmarks/micro/accuracy.py --world smol --clips 24   # the SmolLM2-135M model (microworld.smol):
                                            # 9 question types, its own held-out folder and doc block; ~1 h
                                            # on 2 cores (the in-LLM presets prefill the 135 M model per question)
    python benchmarks/micro/accuracy.py --world smol --first-clip 24 --clips 24 --heldout H --results R
                                            # the next 24 clips, in folders of their own
    python benchmarks/micro/accuracy.py --world dense --model DIR --clips 48 [--device cuda]
                                            # the dense world (microworld.dense): 32 frames x 64 tokens,
                                            # 11 types; --dense-frames 16 --dense-grid 6 for the CPU size

Steps (each resumable: rerunning skips the records already in the results files):
1. the held-out set (benchmarks/micro/heldout.py): --clips clips (from --first-clip) of seed --seed as mp4, 7
   questions each, questions.csv;
2. the preset sweep, by running the real CLI on it (a subprocess):
       vidqa batch questions.csv -o sweep.jsonl --model CHECKPOINT --frames 8 --max-new-tokens 3 \\
           --device cpu --prune none,fastv,prunevid,sparsevlm,adatp,evs,vidcom2,visionzip,fastvid,dycoke,flashvid,holitom,earlytom --keep 0.1,0.25,0.5
   `vidqa batch` ignores the CSV's `type` column, so records are joined to their question type by
   id (`c0042-square_start`). A keep a preset cannot reach on the 4-layer micro model (e.g. FastV
   drops after layer 1 of 4, so R >= 1/4) is an error in its records: shown as "unreachable".
3. reference selections, in process through `vidqa.engine.request.answer` with a small custom Pruner
   whose `before_llm` keeps a subset of the 128 frame tokens (`VisualTokens.select`; kept tokens
   keep their original positions; the image_newline token is never pruned):
   - sensitivity, all at 64 of 128 tokens: start-only (frames 0-3), end-only (frames 4-7),
     even frames (0, 2, 4, 6), per-frame checkerboard (8 of 16 per frame), per-frame random
     (8 per frame, seeded per clip), oracle (8 per frame, from the ground-truth object masks);
   - per sweep budget (keep R -> round(128 R) tokens before the LLM): `random` (uniform over
     all frame tokens), `per-frame-random` (spread evenly over the frames) and `oracle` (per frame, the cells the square / circle cover most, then
     the purest background cell, then by coverage; budgets spread evenly over frames). The
     oracle is a reference from privileged information, not a proven upper bound.
4. tables (markdown, stdout; --update-doc rewrites the generated block of docs/accuracy.md),
   summary.json and the accuracy-vs-FLOPs plot (--plot).

CPU threads: the micro model is tiny, so one thread per process is fastest (more threads only
fight over the cores); the batch subprocess gets OMP_NUM_THREADS=1 and this process
torch.set_num_threads(--threads).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from vidqa.pruning.core.runtime import Pruner  # noqa: E402

DEFAULT_MODEL = ROOT / "vidqa" / "micro" / "checkpoint"  # shipped in the package: --model micro
DEFAULT_PRESETS = ("none", "fastv", "prunevid", "sparsevlm", "adatp", "evs", "vidcom2", "visionzip", "fastvid", "dycoke", "flashvid", "holitom", "earlytom")
DEFAULT_KEEPS = (0.1, 0.25, 0.5)
FRAMES = 8
MAX_NEW_TOKENS = 3  # one answer word + <|im_end|>, as microworld.train.evaluate
SENSITIVITY_TOKENS = 64
SENSITIVITY = ("start-only", "end-only", "even-frames", "checkerboard", "per-frame-random", "oracle")
REFERENCES = ("random", "per-frame-random", "oracle")  # per sweep budget
DOC_BEGIN = "<!-- accuracy.py:begin -->"
DOC_END = "<!-- accuracy.py:end -->"
SMOL_DOC_BEGIN = "<!-- accuracy.py smol:begin -->"
SMOL_DOC_END = "<!-- accuracy.py smol:end -->"
SMOL_HELDOUT = HERE / "heldout-smol"
DENSE_DOC_BEGIN = "<!-- accuracy.py dense:begin -->"
DENSE_DOC_END = "<!-- accuracy.py dense:end -->"
UNREACHABLE = re.compile(r"below what '[^']+' can reach on this (?:[0-9]+-layer model|clip) \((?:a retention of )?at least ([0-9.]+)\)")


def _load_heldout():
    name = "vidqa_bench_micro_heldout"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "heldout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


heldout = _load_heldout()


# --- token selections ------------------------------------------------------------------------


def spread(total: int, parts: int) -> list[int]:
    """`total` items over `parts` frames as evenly as possible; the extra ones go to frames spread
    evenly over the clip (first and last included): spread(13, 8) -> [2, 1, 2, 1, 2, 2, 1, 2]."""
    base, extra = divmod(int(total), parts)
    counts = [base] * parts
    if extra:
        for frame in np.round(np.linspace(0, parts - 1, extra)).astype(int):
            counts[int(frame)] += 1
    return counts


def cell_coverage(truth: dict, grid: tuple[int, int, int], size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (square, circle): (frames, rows, cols) share of each pooled token's cell covered by the
    square / the circle, from a clip's ground truth (heldout manifest entry). In the SmolLM2
    model's world (extras) the flash and the corner block count with the circle (the small
    objects: oracle_order keeps the most covered one of a frame next to the square). In the dense
    world (truth["size"]: its frame side) the ball and the light (every frame) count with them."""
    size = int(size or truth.get("size", 112))
    frames, rows, cols = grid
    cell_h, cell_w = size / rows, size / cols
    square = np.zeros((frames, rows, cols))
    circle = np.zeros((frames, rows, cols))
    ys, xs = np.mgrid[0:size, 0:size]
    disc = None
    if truth.get("circle"):
        cx, cy, r = truth["circle"]
        disc = ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r).astype(float)
    for t in range(frames):
        x0, y0, x1, y1 = truth["square_boxes"][t]
        mask = np.zeros((size, size))
        mask[y0:y1, x0:x1] = 1.0
        square[t] = mask.reshape(rows, int(cell_h), cols, int(cell_w)).mean(axis=(1, 3))
        small = np.zeros((size, size))
        if disc is not None and t in truth.get("circle_frames", ()):
            small = np.maximum(small, disc)
        if truth.get("flash") and t in truth.get("flash_frames", ()):
            fx, fy, fr = truth["flash"]
            small = np.maximum(small, (np.abs(xs - fx) + np.abs(ys - fy) <= fr).astype(float))
        if truth.get("corner_box") and t == 0:
            x0, y0, x1, y1 = truth["corner_box"]
            small[y0:y1, x0:x1] = 1.0
        if truth.get("ball") and t in truth.get("ball_frames", ()):
            bx, by, br = truth["ball"]
            small = np.maximum(small, ((xs - bx) ** 2 + (ys - by) ** 2 <= br * br).astype(float))
        if truth.get("light_box"):
            x0, y0, x1, y1 = truth["light_box"]
            small[y0:y1, x0:x1] = 1.0
        circle[t] = small.reshape(rows, int(cell_h), cols, int(cell_w)).mean(axis=(1, 3))
    return square, circle


def oracle_order(square: np.ndarray, circle: np.ndarray) -> list[int]:
    """Cells of one frame (row-major indices) in oracle priority: the cell the square covers most,
    the cell the circle covers most (if it is in the frame), the purest background cell, then the
    rest by object coverage (most first; ties by index)."""
    flat_s, flat_c = square.ravel(), circle.ravel()
    objects = flat_s + flat_c
    order: list[int] = []
    for pick in (int(np.argmax(flat_s)), int(np.argmax(flat_c)) if flat_c.max() > 0 else None,
                 int(np.argmin(objects))):
        if pick is not None and pick not in order:
            order.append(pick)
    rest = sorted((i for i in range(len(objects)) if i not in order), key=lambda i: (-objects[i], i))
    return order + rest


def selection_index(name: str, tokens, budget: int, truth: dict | None = None, seed: int = 0):
    """Indices (into `tokens`, a VisualTokens of the unpruned video) that selection `name` keeps."""
    import torch

    frames, rows, cols = tokens.grid
    per_frame = rows * cols
    frame = tokens.frame.cpu().numpy()
    position = (tokens.row * cols + tokens.col).cpu().numpy()
    by_frame = [np.flatnonzero(frame == t) for t in range(frames)]
    by_frame = [ix[np.argsort(position[ix], kind="stable")] for ix in by_frame]
    half = frames // 2
    if name == "all":
        chosen = np.arange(len(frame))
    elif name in ("start-only", "end-only", "even-frames"):
        keep_frames = {"start-only": range(half), "end-only": range(frames - half, frames),
                       "even-frames": range(0, frames, 2)}[name]
        chosen = np.concatenate([by_frame[t] for t in keep_frames])
        if len(chosen) != budget:
            raise ValueError(f"{name} keeps {len(chosen)} tokens, not {budget}: it is defined for "
                             f"budget = half the tokens ({frames * per_frame // 2})")
    elif name == "checkerboard":
        if budget * 2 != frames * per_frame:
            raise ValueError(f"checkerboard keeps half the tokens ({frames * per_frame // 2}), not {budget}")
        rows_of, cols_of = position // cols, position % cols
        chosen = np.flatnonzero((rows_of + cols_of) % 2 == 0)
    elif name == "random":
        rng = np.random.default_rng([seed, budget, 1])
        chosen = rng.choice(len(frame), size=budget, replace=False)
    elif name == "per-frame-random":
        rng = np.random.default_rng([seed, budget, 2])
        chosen = np.concatenate([rng.choice(by_frame[t], size=k, replace=False)
                                 for t, k in enumerate(spread(budget, frames)) if k])
    elif name == "oracle":
        if truth is None:
            raise ValueError("the oracle selection needs the clip's ground truth")
        square, circle = cell_coverage(truth, tokens.grid)
        chosen = []
        for t, k in enumerate(spread(budget, frames)):
            cells = oracle_order(square[t], circle[t])[:k]
            chosen.extend(by_frame[t][cells])  # by_frame[t] is sorted by cell position
        chosen = np.array(chosen, dtype=int)
    else:
        raise ValueError(f"unknown selection '{name}'")
    return torch.as_tensor(np.sort(chosen), dtype=torch.long, device=tokens.features.device)


class SubsetPruner(Pruner):
    """A Pruner that keeps a fixed subset of the frame tokens before the LLM; kept tokens keep
    their original positions. Everything else is the base class's (no preset: nothing depends
    on the question, the video prefix is reusable)."""

    def __init__(self, name: str, budget: int, truth: dict | None = None, seed: int = 0):
        self.name, self.budget, self.truth, self.seed = name, int(budget), truth, int(seed)

    def before_llm(self, tokens, state):
        kept = tokens.select(selection_index(self.name, tokens, self.budget, self.truth, self.seed))
        state.record_stage(self.name, len(kept))
        return kept


# --- running ---------------------------------------------------------------------------------


def sweep_command(csv_path: Path, output: Path, model: str | Path, presets: Sequence[str], keeps: Sequence[float],
                  frames: int = FRAMES, quiet: bool = True, device: str = "cpu") -> list[str]:
    """The `vidqa batch` command line of the sweep."""
    command = [
        sys.executable, "-m", "vidqa", "batch", str(csv_path), "-o", str(output), "--model", str(model),
        "--frames", str(frames), "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", device,
        "--dtype", "float32", "--prune", ",".join(presets),
    ]
    if keeps:
        command += ["--keep", ",".join(f"{k:g}" for k in keeps)]
    command += ["-q"] if quiet else []
    return command


def start_sweep(command: Sequence[str]) -> subprocess.Popen:
    """Run the sweep in a subprocess with one CPU thread (see the module docstring)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(list(command), env=env)


def finish_sweep(process: subprocess.Popen, command: Sequence[str]) -> int:
    code = process.wait()
    if code not in (0, 1):  # 1 = some records have errors (unreachable keeps): expected here
        raise RuntimeError(f"vidqa batch exited with {code}: {' '.join(map(str, command))}")
    return code


def selection_tasks(keeps: Sequence[float], sensitivity: bool = True, references: bool = True,
                    num_tokens: int = 128) -> list[tuple[str, int, float]]:
    """(selection, tokens kept, keep label) to run per question."""
    tasks: list[tuple[str, int, float]] = []
    if sensitivity:
        half = num_tokens // 2  # SENSITIVITY_TOKENS (64) of the 8 x 16 world's 128
        tasks += [(name, half, half / num_tokens) for name in SENSITIVITY]
    if references:
        for keep in keeps:
            budget = max(1, round(keep * num_tokens))
            for name in REFERENCES:
                if (name, budget) not in {(n, b) for n, b, _ in tasks}:
                    tasks.append((name, budget, float(keep)))
    return tasks


def run_selections(adapter, rows: Sequence[dict], folder: Path, manifest: dict,
                   tasks: Sequence[tuple[str, int, float]], frames: int = FRAMES, done: Iterable = (),
                   write=None) -> list[dict]:
    """Answer every row under every (selection, budget) -> records shaped like `vidqa batch`'s
    (id, preset = selection, keep, answer, expected, correct, stats...).

    A selection acts before the LLM and never reads the question, so each (clip, selection) is
    one `VideoSession`: the pruned video prefix is prefilled once and its questions answered from
    that cache, as `vidqa batch` does for question-agnostic presets (on the SmolLM2 model that
    is most of the cost: about 230 of a question's 250 rows)."""
    from vidqa.batch.summary import normalize_keep, score
    from vidqa.engine import request as engine
    from vidqa.engine.session import VideoSession
    from vidqa.render.report import ask_record

    done = set(done)
    generation = engine.GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    records = []
    by_video: dict[str, list[dict]] = {}
    for row in rows:
        by_video.setdefault(row["video"], []).append(row)
    for video, questions in by_video.items():
        if all((row["id"], task[0], normalize_keep(task[2])) in done for row in questions for task in tasks):
            continue
        clip = engine.decode_video(str(folder / video), engine.FrameOptions(frames=frames))
        index = int(questions[0]["clip"])
        cache: dict = {}
        for name, budget, keep in tasks:
            todo = [row for row in questions if (row["id"], name, normalize_keep(keep)) not in done]
            if not todo:
                continue
            pruner = SubsetPruner(name, budget, manifest["clips"][index], seed=index)
            session = VideoSession(adapter, clip, pruner, generation, encoded_cache=cache)
            for row in todo:
                expected = row.get("expected", row.get("answer"))  # `answer`: a folder made before the rename
                record = {"schema": 2, "id": row["id"], "video": video, "question": row["question"], "options": None,
                          "expected": expected, "answer": None, "correct": None, "preset": name, "keep": keep,
                          "error": None, "model": None, "parameters": {"frames": frames, "tokens_kept": budget},
                          "stats": None, "pruning": {}, "notes": []}
                try:
                    result = session.ask(row["question"])
                except Exception as error:  # noqa: BLE001 - record it, as vidqa batch does
                    record["error"] = f"{type(error).__name__}: {error}"
                else:
                    built = ask_record(result, model="", preset=name, parameters={})
                    record.update(answer=result.text, correct=score(result.text, expected, []),
                                  stats=built["stats"])
                records.append(record)
                if write is not None:
                    write(record)
    return records


# --- tables ----------------------------------------------------------------------------------


def join_types(records: Iterable[dict]) -> list[dict]:
    """Records with a `type` (from the id) added; records whose id names no type are dropped."""
    out = []
    for record in records:
        kind = heldout.type_of_id(record.get("id"))
        if kind is not None:
            out.append(dict(record, type=kind))
    return out


def cell(records: Sequence[dict]) -> dict:
    """Accuracy over successful scored records; `unreachable` when every record failed because
    the keep is below what the preset can reach (the lowest reachable keep in `at_least`)."""
    ok = [r for r in records if not r.get("error")]
    scored = [r for r in ok if r.get("correct") is not None]
    errors = [r for r in records if r.get("error")]
    lows = [float(m.group(1)) for r in errors if (m := UNREACHABLE.search(str(r["error"])))]
    fractions = [r["stats"]["flops"]["paper_fraction"] for r in ok if r.get("stats")]
    tokens = [r["stats"]["tokens"]["visual_tokens_after"] for r in ok if r.get("stats")]
    retention = [r["stats"]["tokens"]["layer_avg_retention"] for r in ok if r.get("stats")]
    return {
        "n": len(records),
        "errors": len(errors),
        "unreachable": len(lows),
        "at_least": min(lows) if lows else None,
        "scored": len(scored),
        "correct": sum(1 for r in scored if r["correct"] is True),
        "accuracy": (sum(1 for r in scored if r["correct"] is True) / len(scored)) if scored else None,
        "flops_percent": 100 * float(np.mean(fractions)) if fractions else None,
        "tokens_after": float(np.mean(tokens)) if tokens else None,
        "retention": float(np.mean(retention)) if retention else None,
    }


def accuracy_table(records: Sequence[dict], types: Sequence[str] | None = None,
                   order: Sequence[str] | None = None) -> list[dict]:
    """One row per (preset, keep): cells per question type and overall."""
    from microworld import world
    from vidqa.batch.summary import normalize_keep

    typed = join_types(records)
    types = list(types or [t for t in world.QUESTION_TYPES if any(r["type"] == t for r in typed)])
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for record in typed:
        groups.setdefault((str(record["preset"]), normalize_keep(record.get("keep"))), []).append(record)
    rank = {name: i for i, name in enumerate(order or ())}
    keys = sorted(groups, key=lambda k: (rank.get(k[0], len(rank)), k[1] is not None, k[1] or 0))
    table = []
    for preset, keep in keys:
        members = groups[(preset, keep)]
        row = {"preset": preset, "keep": keep, "overall": cell(members)}
        for kind in types:
            row[kind] = cell([r for r in members if r["type"] == kind])
        table.append(row)
    return table


def _fmt(c: dict, detail: bool = False) -> str:
    if c["n"] == 0:
        return ""
    if c["accuracy"] is None:
        if c["unreachable"]:
            return f"unreachable (R ≥ {c['at_least']:.2f})" if detail and c["at_least"] is not None else "unreachable"
        return f"error ({c['errors']})"
    text = f"{c['accuracy']:.2f}"
    if c["errors"]:
        why = "unreachable" if c["unreachable"] == c["errors"] else "errors"
        text += f" ({c['errors']} {why})"
    return text


def markdown_table(table: Sequence[dict], types: Sequence[str], first: str = "preset",
                   show_keep: bool = True, show_cost: bool = True) -> str:
    head = [first] + (["keep"] if show_keep else []) + list(types) + ["overall"]
    if show_cost:
        head += ["retention", "FLOPs %", "tokens after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in table:
        cells = [row["preset"]]
        if show_keep:
            cells.append("-" if row["keep"] is None else f"{row['keep']:g}")
        cells += [_fmt(row[t]) for t in types] + [_fmt(row["overall"], detail=True)]
        if show_cost:
            o = row["overall"]
            cells += ["-" if o["retention"] is None else f"{o['retention']:.2f}","-" if o["flops_percent"] is None else f"{o['flops_percent']:.1f}",
                      "-" if o["tokens_after"] is None else f"{o['tokens_after']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(kind: str) -> str:
    return kind.replace("background", "bg").replace("square", "sq")


def world_types(world_name: str = "micro") -> list[str]:
    from microworld import world

    if world_name == "dense":
        from microworld import dense

        return list(dense.DENSE_QUESTION_TYPES)
    return list(world.QUESTION_TYPES) + (list(world.EXTRA_QUESTION_TYPES) if world_name == "smol" else [])


def render(sweep: Sequence[dict], refs: Sequence[dict], presets: Sequence[str],
           types: Sequence[str] | None = None, num_tokens: int = 128) -> tuple[str, dict]:
    """-> (markdown, summary dict) for the sweep records and the reference-selection records."""
    types = list(types or world_types())
    main = accuracy_table(list(sweep) + [r for r in refs if r["preset"] in REFERENCES],
                          types, order=list(presets) + list(REFERENCES))
    # the reference rows at the sweep budgets only (the sensitivity rows are their own table)
    sweep_keeps = {r["keep"] for r in main if r["preset"] in presets and r["keep"] is not None}
    main = [r for r in main if r["preset"] not in REFERENCES or r["keep"] in sweep_keeps]
    sens = accuracy_table([r for r in refs if r["preset"] in SENSITIVITY and
                           abs(float(r["keep"]) - 0.5) < 1e-6], types, order=SENSITIVITY)
    none = [r for r in main if r["preset"] == "none"]
    if none:
        sens = [dict(none[0], preset=f"all {num_tokens} (none)")] + sens
    clips = len({heldout.clip_of_id(r["id"]) for r in sweep} | {heldout.clip_of_id(r["id"]) for r in refs})
    header = [_short(t) for t in types]
    md = []
    md.append(f"Per question type accuracy ({clips} held-out clips; each cell is over the clips' questions of that type).\n")
    md.append("#### Presets (and reference selections) per keep\n")
    md.append(_rename(markdown_table(main, types), types, header))
    md.append(f"\n#### Sensitivity: which {num_tokens // 2} of the {num_tokens} frame tokens are kept (before the LLM)\n")
    md.append(_rename(markdown_table(sens, types, first="selection", show_keep=False), types, header))
    summary = {"clips": clips, "presets": main, "sensitivity": sens}
    return "\n".join(md) + "\n", summary


def _rename(table: str, types: Sequence[str], header: Sequence[str]) -> str:
    first, rest = table.split("\n", 1)
    for kind, short in zip(types, header):
        first = first.replace(f" {kind} ", f" {short} ")
    return first + "\n" + rest


def plot(summary: dict, path: str | Path, presets: Sequence[str], types: Sequence[str] | None = None,
         title: str = "micro model", frames: int = FRAMES, num_tokens: int = 128) -> Path:
    """Accuracy vs FLOPs %: overall and per question type; one line per preset (+ references)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = summary["presets"]
    panels = ["overall"] + list(types or world_types())
    figure, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(15 if len(panels) <= 8 else 18.5, 7.2),
                                dpi=110, sharex=True, sharey=True)
    names = list(dict.fromkeys([p for p in presets if p != "none"] + [r["preset"] for r in rows
                                                                        if r["preset"] not in presets]))
    palette = plt.get_cmap("tab20").colors  # more presets than the 10 default colours
    style = {name: (palette[i % len(palette)], "-" if name not in REFERENCES else ":") for i, name in enumerate(names)}
    markers = {0.1: "o", 0.25: "s", 0.5: "^"}
    none = next((r for r in rows if r["preset"] == "none"), None)
    for ax, panel in zip(axes.ravel(), panels):
        for name in names:
            mine = [r for r in rows if r["preset"] == name and r[panel]["accuracy"] is not None
                    and r[panel]["flops_percent"] is not None]
            mine.sort(key=lambda r: r[panel]["flops_percent"])
            if not mine:
                continue
            color, line = style[name]
            xs = [r[panel]["flops_percent"] for r in mine]
            ys = [100 * r[panel]["accuracy"] for r in mine]
            ax.plot(xs, ys, line, color=color, label=name, alpha=0.85)
            for r, x, y in zip(mine, xs, ys):
                ax.plot(x, y, markers.get(r["keep"], "D"), color=color, markersize=5)
        if none is not None and none[panel]["accuracy"] is not None:
            ax.plot(100, 100 * none[panel]["accuracy"], "*", color="black", markersize=10, label="none")
        ax.set_title(panel.replace("_", " "), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, 105)
        ax.set_ylim(-3, 103)
    for ax in axes[1]:
        ax.set_xlabel("FLOPs % (visual prefill)")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy %")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], color="grey", marker=m, linestyle="none", label=f"keep {k:g}") for k, m in markers.items()]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(f"{title}, {summary['clips']} held-out clips, {frames} frames ({num_tokens} frame tokens): "
                    "accuracy vs visual-prefill FLOPs", fontsize=11)
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def update_doc(doc: Path, markdown: str, begin: str = DOC_BEGIN, end: str = DOC_END) -> None:
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: no {begin} ... {end} block to replace")
    before, rest = text.split(begin, 1)
    _, after = rest.split(end, 1)
    doc.write_text(before + begin + "\n" + markdown + end + after)


# --- main ------------------------------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    from vidqa.batch.store import read_records
    from vidqa.batch.summary import record_key

    if not path.exists():
        return []
    seen, records = set(), []
    for record in read_records(path, repair=True).records:
        if record_key(record) not in seen:
            seen.add(record_key(record))
            records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/micro/accuracy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=("micro", "smol", "dense"), default="micro",
                        help="micro: the 1.3 M micro model, 7 types; smol: the SmolLM2-135M model (assembled on "
                             "first use, needs the [bench] extra), 9 types; dense: the SmolLM2 model trained on the "
                             "dense world (microworld.dense, give --model), 11 types")
    parser.add_argument("--dense-frames", type=int, default=32, help="dense world: frames per clip (CPU size: 16)")
    parser.add_argument("--dense-grid", type=int, default=8, help="dense world: tokens per frame side (CPU size: 6)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda for the dense world on a GPU)")
    parser.add_argument("--model", default=None, help=f"checkpoint (default: {DEFAULT_MODEL}, or the assembled smol one)")
    parser.add_argument("--heldout", type=Path, default=None,
                        help=f"held-out folder (default: {heldout.DEFAULT_OUT}, or {SMOL_HELDOUT} for smol)")
    parser.add_argument("--clips", type=int, default=heldout.DEFAULT_CLIPS)
    parser.add_argument("--first-clip", type=int, default=0,
                        help="held-out clip index to start at: --first-clip 24 --clips 24 runs clips 24-47, "
                             "so a sweep can be extended by more clips in another results folder")
    parser.add_argument("--seed", type=int, default=None, help="held-out seed (default 1000)")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--types", default=None,
                        help="ask only these question types, comma-separated (default: all of the world's)")
    parser.add_argument("--keeps", default=",".join(f"{k:g}" for k in DEFAULT_KEEPS))
    parser.add_argument("--results", type=Path, default=None, help="folder of sweep.jsonl/references.jsonl (default: --heldout)")
    parser.add_argument("--skip-run", action="store_true", help="only read the results files")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1)")
    parser.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-FLOPs PNG here")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="replace the generated block of this markdown file (docs/accuracy.md)")
    args = parser.parse_args(argv)
    if args.first_clip < 0 or args.clips < 1:
        parser.error(f"--first-clip {args.first_clip} --clips {args.clips}: clips are numbered from 0; "
                     "give --first-clip >= 0 and --clips >= 1")
    smol = args.world == "smol"
    dense_size = frames = None
    num_tokens = 128
    if args.world == "dense":
        from microworld.dense import DenseSize

        dense_size = DenseSize(args.dense_frames, args.dense_grid)
        frames, num_tokens = dense_size.frames, dense_size.visual_tokens
        if args.model is None and not args.skip_run:
            parser.error("--world dense needs --model: a folder assembled from train_dense weights "
                         "(python -m microworld.assemble --weights FILE)")
    frames = frames or FRAMES
    types = world_types(args.world)
    if args.types:
        asked = [t.strip() for t in args.types.split(",") if t.strip()]
        unknown = [t for t in asked if t not in types]
        if unknown or not asked:
            parser.error(f"--types {args.types}: unknown types {unknown}; the {args.world} world's: {', '.join(types)}")
        types = asked
    if args.heldout is None:
        args.heldout = (HERE / f"heldout-dense-{dense_size.frames}x{dense_size.tokens_per_frame}" if dense_size
                        else SMOL_HELDOUT if smol else heldout.DEFAULT_OUT)
    if args.model is None and not args.skip_run:
        if smol:
            from microworld.assemble import assemble

            args.model = str(assemble())
        else:
            args.model = str(DEFAULT_MODEL)

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    results = args.results or args.heldout
    results.mkdir(parents=True, exist_ok=True)
    sweep_path, refs_path = results / "sweep.jsonl", results / "references.jsonl"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if not args.skip_run:
        if not (Path(args.model) / "config.json").is_file():
            raise SystemExit(f"no micro checkpoint at {args.model} (config.json missing); train it first: "
                             "see benchmarks/micro/README.md")
        t0 = time.time()
        indices = range(args.first_clip, args.first_clip + args.clips)
        csv_path = heldout.generate(args.heldout, indices, args.seed, types=types, extras=smol, dense_size=dense_size)
        rows = heldout.read_questions(csv_path)
        print(f"held-out set: {len(rows)} questions, clips {indices.start}-{indices.stop - 1} "
              f"({time.time() - t0:.0f}s)", file=sys.stderr)
        process = command = None
        t0 = time.time()
        if not args.skip_sweep:  # in the background, while this process runs the reference selections
            command = sweep_command(csv_path, sweep_path, args.model, presets, keeps, frames=frames, device=args.device)
            print("sweep: " + " ".join(map(str, command)), file=sys.stderr)
            process = start_sweep(command)
        if not args.skip_references:
            import torch

            from vidqa.batch.summary import record_key
            from vidqa.models import load_model

            torch.set_num_threads(args.threads)
            adapter = load_model(args.model, device=args.device, dtype="float32")
            done = {record_key(r) for r in _read(refs_path)}
            manifest = heldout.read_manifest(args.heldout)
            with refs_path.open("a", encoding="utf-8") as handle:
                def write(record):
                    handle.write(json.dumps(record) + "\n")
                    handle.flush()

                run_selections(adapter, rows, args.heldout, manifest, selection_tasks(keeps, num_tokens=num_tokens),
                               frames=frames, done=done, write=write)
            print(f"reference selections: {refs_path} ({time.time() - t0:.0f}s)", file=sys.stderr)
        if process is not None:
            finish_sweep(process, command)
            print(f"sweep: {sweep_path} ({time.time() - t0:.0f}s)", file=sys.stderr)

    wanted = None
    if not args.skip_run:
        wanted = {r["id"] for r in heldout.read_questions(args.heldout / heldout.CSV_NAME)}
    sweep = [r for r in _read(sweep_path) if wanted is None or r["id"] in wanted]
    refs = [r for r in _read(refs_path) if wanted is None or r["id"] in wanted]
    if not sweep and not refs:
        raise SystemExit(f"no records in {sweep_path} or {refs_path}")
    markdown, summary = render(sweep, refs, presets, types, num_tokens=num_tokens)
    print(markdown)
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        title = "SmolLM2-135M model" + (", dense world" if dense_size else "") if smol or dense_size else "micro model"
        print(f"plot: {plot(summary, args.plot, presets, types, title, frames, num_tokens)}", file=sys.stderr)
    if args.update_doc:
        markers = ((DENSE_DOC_BEGIN, DENSE_DOC_END) if dense_size else (SMOL_DOC_BEGIN, SMOL_DOC_END) if smol
                   else (DOC_BEGIN, DOC_END))
        update_doc(args.update_doc, markdown, *markers)
        print(f"updated {args.update_doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
