"""`vidqa batch`: many questions about many videos, under a sweep of pruning presets.

questions CSV -> rows -> tasks (row x (preset, keep)) -> one record per task, appended to the
output as soon as it is done (vidqa/batch/store.py), summarised by vidqa/batch/summary.py.
The model loads once; each video is decoded once per frame setting and encoded once, and both are
reused across its questions and presets (ClipCache). Per-task failures become the record's
`error`; the batch goes on.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vidqa.batch.store import RECORD_SCHEMA
from vidqa.batch.summary import build_prompt, format_options, normalize_keep, parse_options, score
from vidqa.errors import BadInput, RuntimeFailure, VidqaError

REQUIRED_COLUMNS = ("video", "question")
OPTIONAL_COLUMNS = ("id", "expected", "options", "prune", "keep")
LEGACY_EXPECTED = "answer"  # the ground-truth column's old name, still read as `expected`
# parameters that change the answers: a resumed run must use the same ones as the records it joins
SETTINGS_THAT_MATTER = ("frames", "fps", "start", "end", "sampling", "max_new_tokens", "temperature", "seed", "overrides")


# --- input -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One question of the input CSV."""

    number: int  # 1 = the first data row
    line: int  # line of the CSV file where the row starts
    id: str  # the `id` cell, or the row number when there is none
    video: str  # the cell as written
    video_path: Path | None  # resolved against the CSV's folder
    question: str
    expected: str | None = None  # the ground truth
    options: list[tuple[str, str]] = field(default_factory=list)
    presets: list[str] | None = None  # the row's own `prune` cell, replacing --prune
    keeps: list[float] | None = None  # the row's own `keep` cell, replacing --keep
    error: str | None = None  # a problem with this row only (empty cell): recorded, not fatal


def parse_keep_list(text: str | None, what: str = "--keep") -> list[float]:
    """'0.1,0.3' -> [0.1, 0.3]; each in (0, 1]. Empty items are ignored."""
    if text is None:
        return []
    keeps = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise BadInput(f"{what}: '{item}' is not a number; give fractions of visual tokens to keep, "
                           f"e.g. 0.1,0.3") from None
        if not (math.isfinite(value) and 0 < value <= 1):
            raise BadInput(f"{what}: {item} is not in (0, 1]; it is the fraction of visual tokens kept")
        if value not in keeps:
            keeps.append(value)
    return keeps


def parse_prune_list(text: str | None, what: str = "--prune") -> list[str]:
    names = [part.strip() for part in str(text or "").split(",") if part.strip()]
    if not names:
        raise BadInput(f"{what}: no preset named; e.g. --prune none,fastv")
    return list(dict.fromkeys(names))


def parse_overrides(items: Sequence[str] | None) -> list[str]:
    overrides = []
    for item in items or ():
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"-P '{item}': expected key=value, e.g. -P layer=2")
        overrides.append(item)
    return overrides


def read_questions(path: Path, notes: list[str] | None = None) -> list[Row]:
    """Parse the questions CSV. BadInput (one line, with the line number) when the file as a whole
    is unusable: missing, not UTF-8, empty, no header columns video/question, duplicate ids, a bad
    prune/keep cell. An empty video or question cell is that row's `error` instead. `notes` gets
    a line when the ground truth is in the old `answer` column."""
    name = str(path)
    if not path.exists():
        raise BadInput(f"{name}: file not found")
    if path.is_dir():
        raise BadInput(f"{name}: is a directory; give the questions CSV file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise BadInput(f"{name}: not UTF-8 text (line {line}); save the CSV as UTF-8") from None
    if not text.strip():
        raise BadInput(f"{name}: empty file; expected a header line with the columns video,question")
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    header: list[str] | None = None
    header_line = 1
    rows: list[Row] = []
    seen: dict[str, int] = {}
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header, header_line = _check_header(name, line, cells), line
                if LEGACY_EXPECTED in header and notes is not None:
                    notes.append(f"{name}: reading the column '{LEGACY_EXPECTED}' as the ground truth; its name "
                                 f"is now 'expected' ('answer' in the results is the model's answer)")
                continue
            row = _parse_row(path, line, len(rows) + 1, dict(zip(header, (c.strip() for c in cells))))
            if row.id in seen:
                raise BadInput(f"{name}: line {line}: duplicate id '{row.id}' (also on line {seen[row.id]}); "
                               f"ids name the records, so each must be unique")
            seen[row.id] = line
            rows.append(row)
    except csv.Error as error:
        raise BadInput(f"{name}: line {start}: not valid CSV ({error})") from None
    if not rows:
        raise BadInput(f"{name}: no rows (only a header, on line {header_line})")
    return rows


def _check_header(name: str, line: int, cells: list[str]) -> list[str]:
    header = [cell.strip().lower() for cell in cells]
    found = ", ".join(cell.strip() for cell in cells)
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        which = " and ".join(f"'{column}'" for column in missing)
        plural = "s" if len(missing) > 1 else ""
        raise BadInput(f"{name}: line {line}: missing required column{plural} {which} (found: {found})")
    for column in header:
        if column and header.count(column) > 1:
            raise BadInput(f"{name}: line {line}: column '{column}' appears twice (found: {found})")
    if "expected" in header and LEGACY_EXPECTED in header:
        raise BadInput(f"{name}: line {line}: both 'expected' and '{LEGACY_EXPECTED}' columns; '{LEGACY_EXPECTED}' is "
                       f"the old name of 'expected' (the ground truth): keep one")
    return header


def _parse_row(path: Path, line: int, number: int, cells: dict[str, str]) -> Row:
    where = f"{path}: line {line}"
    video = cells.get("video") or ""
    question = cells.get("question") or ""
    video_path = None
    if video:
        video_path = Path(video).expanduser()
        if not video_path.is_absolute():
            video_path = path.parent / video_path
    row = Row(
        number=number, line=line, id=cells.get("id") or str(number), video=video, video_path=video_path,
        question=question, expected=cells.get("expected") or cells.get(LEGACY_EXPECTED) or None,
        options=parse_options(cells.get("options")),
    )
    if cells.get("prune"):
        row.presets = parse_prune_list(cells["prune"], f"{where}: prune")
    if cells.get("keep"):
        row.keeps = parse_keep_list(cells["keep"], f"{where}: keep")
    if not video:
        row.error = f"the video cell is empty (line {line})"
    elif not question:
        row.error = f"the question cell is empty (line {line})"
    return row


# --- the sweep -------------------------------------------------------------------------------


def expand_sweep(presets: Sequence[str], keeps: Sequence[float]) -> list[tuple[str, float | None]]:
    """Every (preset, keep): `none` once with keep None; a preset with no keeps at its default."""
    combos: list[tuple[str, float | None]] = []
    for preset in presets:
        if preset == "none":
            candidates = [("none", None)]
        elif keeps:
            candidates = [(preset, keep) for keep in keeps]
        else:
            candidates = [(preset, None)]
        for combo in candidates:
            if combo not in combos:
                combos.append(combo)
    return combos


@dataclass(frozen=True)
class Task:
    row: Row
    preset: str
    keep: float | None

    @property
    def key(self) -> tuple[str, str, float | None]:
        return (self.row.id, self.preset, normalize_keep(self.keep))


def plan(rows: Sequence[Row], presets: Sequence[str], keeps: Sequence[float]) -> list[Task]:
    """Tasks in run order: grouped by video (in the order videos first appear), then by row, then
    by (preset, keep); a row's own prune/keep cells replace the sweep's for that row."""
    order: dict[str, int] = {}
    tasks = []
    for row in rows:
        combos = expand_sweep(row.presets if row.presets is not None else presets,
                              row.keeps if row.keeps is not None else keeps)
        tasks.extend(Task(row, preset, keep) for preset, keep in combos)
        order.setdefault(str(row.video_path), len(order))
    return sorted(tasks, key=lambda task: order[str(task.row.video_path)])  # stable


def overrides_for(preset: str, overrides: Sequence[str]) -> list[str]:
    """-P overrides go to every preset that prunes; `none` has nothing to override."""
    return [] if preset == "none" else list(overrides)


def check_presets(rows: Sequence[Row], presets: Sequence[str], overrides: Sequence[str], questions: Path) -> None:
    """Load every preset named (by --prune or a row's prune cell) with the -P overrides, before
    the model loads: an unknown name or a bad override is bad input to the batch (exit 2), not
    an error in every record. (A preset that fails on a particular model or clip still becomes
    the record's error.)"""
    from vidqa.pruning.core.presets import load_preset

    where: dict[str, str] = {name: "--prune" for name in presets}
    for row in rows:
        for name in row.presets or ():
            where.setdefault(name, f"{questions}: line {row.line}: prune")
    for name, origin in where.items():
        try:
            load_preset(name, overrides_for(name, overrides))
        except BadInput as error:
            raise BadInput(f"{origin}: {error}") from None


# --- decoded and encoded videos --------------------------------------------------------------


class ClipCache:
    """LRU of decoded clips, bounded by their frames' bytes; `encoded` is the mapping handed to
    engine.answer (vision-encoder output under id(clip)). A clip and its encoding are evicted
    together, and the clip object stays alive while its encoding is cached (ids are reused).
    The newest clip is always kept, even when it alone exceeds the bound. Decode failures are
    remembered (they are small), so a missing video fails once, not once per question."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.clips: OrderedDict[tuple, object] = OrderedDict()
        self.encoded: dict[int, object] = {}
        self.failures: dict[tuple, BadInput] = {}
        self.bytes = 0
        self.decodes = 0

    def get(self, path: Path, frame_options) -> object:
        from vidqa.engine import request as engine

        key = (str(path), frame_options.frames, frame_options.fps, frame_options.start, frame_options.end,
               frame_options.sampling)
        if key in self.failures:
            raise self.failures[key]
        if key in self.clips:
            self.clips.move_to_end(key)
            return self.clips[key]
        try:
            clip = engine.decode_video(str(path), frame_options)
        except BadInput as error:
            self.failures[key] = error
            raise
        self.decodes += 1
        self.clips[key] = clip
        self.bytes += clip.pixel_bytes
        while self.bytes > self.max_bytes and len(self.clips) > 1:
            _, old = self.clips.popitem(last=False)
            self.bytes -= old.pixel_bytes
            self.encoded.pop(id(old), None)
        return clip

    def drop_encoded(self) -> None:
        """Free the cached encoder outputs (device memory), e.g. after running out of memory."""
        self.encoded.clear()


# --- running ---------------------------------------------------------------------------------


@dataclass
class Settings:
    model: str
    frame_options: object  # engine.FrameOptions
    generation: object  # engine.GenerationOptions
    overrides: list[str]
    attn: str
    show_kept: Path | None = None  # --show-kept DIR: one kept-token image per record (vidqa/render/show_kept.py)

    def parameters(self, adapter=None) -> dict:
        frames = self.frame_options
        device = dtype = None
        if adapter is not None:
            device = str(adapter.model.device)
            dtype = str(adapter.model.dtype).removeprefix("torch.")
        return {
            "frames": frames.frames, "fps": frames.fps, "start": frames.start, "end": frames.end,
            "sampling": frames.sampling.describe() if frames.sampling is not None else None,
            "device": device, "dtype": dtype, "attn": self.attn,
            "max_new_tokens": self.generation.max_new_tokens, "temperature": self.generation.temperature,
            "seed": self.generation.seed, "overrides": list(self.overrides),
        }


def check_same_settings(records: Iterable[dict], settings: Settings, output: Path) -> None:
    """Refuse to mix records made with another model or other answer-changing options."""
    current = settings.parameters()
    for record in records:
        if record.get("model") is not None and record["model"] != settings.model:
            raise BadInput(f"{output} holds records made with --model {record['model']} (now {settings.model}); "
                           f"use the same options, --overwrite, or another --output")
        old = record.get("parameters")
        if not isinstance(old, dict):
            continue
        for name in SETTINGS_THAT_MATTER:
            if name in old and old[name] != current[name]:
                flag = "-P" if name == "overrides" else "--" + name.replace("_", "-")
                raise BadInput(f"{output} holds records made with {flag} {old[name]} (now {current[name]}); "
                               f"use the same options, --overwrite, or another --output")


def new_record(task: Task, settings: Settings, adapter=None) -> dict:
    row = task.row
    return {
        "schema": RECORD_SCHEMA,
        "id": row.id,
        "video": row.video,
        "question": row.question,
        "options": format_options(row.options) or None,
        "expected": row.expected,
        "answer": None,
        "correct": None,
        "preset": task.preset,
        "keep": task.keep,
        "error": None,
        "model": settings.model,
        "parameters": settings.parameters(adapter),
        "stats": None,
        "pruning": {},
        "kept": None,
        "kept_image": None,
        "notes": [],
    }


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class Runner:
    """Runs tasks one at a time with one loaded model (`vidqa.api.Model`) and a clip cache."""

    def __init__(self, model, settings: Settings, cache: ClipCache):
        self.model, self.settings, self.cache = model, settings, cache
        self._sessions: dict[tuple, object] = {}  # the current clip's, per (preset, keep)

    @property
    def adapter(self):
        return self.model.adapter

    def request_settings(self, task: Task):
        """The `vidqa.api.Settings` of one task: the batch's options with the task's preset and keep."""
        frames, generation = self.settings.frame_options, self.settings.generation
        return self.model.settings.replace(
            frames=frames.frames, fps=frames.fps, start=frames.start, end=frames.end, prune=task.preset,
            keep=task.keep, params=tuple(overrides_for(task.preset, self.settings.overrides)),
            max_new_tokens=generation.max_new_tokens, temperature=generation.temperature, seed=generation.seed,
            decode=generation.decode,
        )

    def _session(self, clip, task: Task):
        """The current clip's session for this configuration: rows sharing a video and a
        question-agnostic configuration reuse its prefilled prefix (vidqa/engine/session.py); other
        presets answer in full, the clip still encoded once. Tasks come grouped by video, so
        only the current clip's sessions (and their KV caches) are kept."""
        key = (id(clip), task.preset, normalize_keep(task.keep))
        if any(old[0] != key[0] for old in self._sessions):
            self._sessions.clear()
        if key not in self._sessions:
            self._sessions[key] = self.model.session(clip, self.request_settings(task),
                                                     encoded_cache=self.cache.encoded)
        return self._sessions[key]

    def run(self, task: Task) -> dict:
        """One task -> its record. Per-task failures are caught into `error`; KeyboardInterrupt is not."""
        import torch

        from vidqa.engine.stats import Stats, timed

        record = new_record(task, self.settings, self.adapter)
        row = task.row
        stats = Stats()
        try:
            if row.error:
                raise BadInput(row.error)
            self.model.pruner(self.request_settings(task))  # a preset that cannot run here fails before decoding
            with timed(stats.time, "video_decode_s"):
                clip = self.cache.get(row.video_path, self.settings.frame_options)
            result = self._session(clip, task).ask(build_prompt(row.question, row.options), stats=stats)
        except VidqaError as error:
            record["error"] = _one_line(error)
            if isinstance(error, RuntimeFailure):  # out of memory, in practice
                self._after_oom()
            return record
        except torch.OutOfMemoryError:
            record["error"] = "out of memory; try fewer --frames, a smaller --model, or a lower --cache-mb"
            self._after_oom()
            return record
        except Exception as error:  # a bug: record it and go on (VIDQA_DEBUG=1 raises it)
            if os.environ.get("VIDQA_DEBUG"):
                raise
            record["error"] = f"internal error: {type(error).__name__}: {_one_line(error)}"
            return record
        built = result.record()
        record.update(
            answer=result.text,
            correct=score(result.text, row.expected, row.options),
            stats=built["stats"],
            pruning=built["pruning"],
            kept=built["kept"],
            notes=built["notes"],
        )
        if self.settings.show_kept is not None:
            self._draw_kept(task, result, record)
        return record

    def _draw_kept(self, task: Task, result, record: dict) -> None:
        """--show-kept DIR: the record's kept-token image; a failure becomes a note, the answer stands."""
        from vidqa.render.show_kept import image_name

        path = self.settings.show_kept / image_name(task.row.id, task.preset, task.keep)
        try:
            result.draw_kept(path, task.row.question)
        except (VidqaError, OSError) as error:
            record["notes"] = [*record["notes"], f"--show-kept: no image: {_one_line(error)}"]
            return
        record["kept_image"] = str(path)

    def _after_oom(self) -> None:
        import torch

        self.cache.drop_encoded()
        self._sessions.clear()  # their KV caches
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_batch(
    tasks: Sequence[Task],
    runner: Runner,
    write: Callable[[dict], None],
    on_start: Callable[[Task], None] | None = None,
    on_done: Callable[[Task, dict], None] | None = None,
) -> list[dict]:
    """Run `tasks` in order; each record is handed to `write` as soon as it is done."""
    records = []
    for task in tasks:
        if on_start is not None:
            on_start(task)
        record = runner.run(task)
        write(record)
        records.append(record)
        if on_done is not None:
            on_done(task, record)
    return records
