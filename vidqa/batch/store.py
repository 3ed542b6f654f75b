"""The batch output file: JSON Lines or CSV, appended one record at a time, read back to resume.

Every record is written with one write() call, flushed and fsync'd, so a crash or a SIGKILL can
leave at most one damaged record: the last one. Reading drops it (the file is rewritten without
it, via a temporary file and os.replace) and the run redoes it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vidqa.batch.summary import normalize_keep
from vidqa.errors import BadInput

FORMATS = (".jsonl", ".csv")
RECORD_SCHEMA = 2  # 2: `answer` is the model's answer and `expected` the ground truth (1: `answer`, `prediction`)

# CSV output: the record's fields, then the main stats flattened (docs/batch.md).
CSV_FIELDS = [
    "id", "video", "question", "options", "expected", "answer", "correct", "preset", "keep",
    "error", "model", "frames", "visual_tokens_before", "visual_tokens_after", "layer_avg_retention",
    "paper_flops_fraction", "prompt_tokens", "llm_prompt_tokens", "generated_tokens",
    "video_decode_s", "vision_encoder_s", "prefill_s", "total_s", "peak_memory_bytes",
]
_CSV_STATS = {  # column -> path in the nested `stats`
    "frames": ("tokens", "frames"),
    "visual_tokens_before": ("tokens", "visual_tokens_before"),
    "visual_tokens_after": ("tokens", "visual_tokens_after"),
    "layer_avg_retention": ("tokens", "layer_avg_retention"),
    "paper_flops_fraction": ("flops", "paper_fraction"),
    "prompt_tokens": ("tokens", "prompt_tokens"),
    "llm_prompt_tokens": ("tokens", "llm_prompt_tokens"),
    "generated_tokens": ("tokens", "generated_tokens"),
    "video_decode_s": ("time", "video_decode_s"),
    "vision_encoder_s": ("time", "vision_encoder_s"),
    "prefill_s": ("time", "prefill_s"),
    "total_s": ("time", "total_s"),
    "peak_memory_bytes": (None, "peak_memory_bytes"),
}
_INTEGER_COLUMNS = {"frames", "visual_tokens_before", "visual_tokens_after", "prompt_tokens",
                    "llm_prompt_tokens", "generated_tokens", "peak_memory_bytes"}
_REQUIRED_KEYS = ("id", "preset", "keep")


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise BadInput(f"--output {path}: unknown extension '{path.suffix}'; use .jsonl or .csv")
    return suffix


@dataclass
class Existing:
    records: list[dict] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # why each dropped line was dropped
    upgraded: int = 0  # records read in the schema-1 layout (see upgrade_record)


def upgrade_record(record: dict) -> bool:
    """Bring a schema-1 record (ground truth in `answer`, the model's answer in `prediction`) to
    the current layout (`expected` = ground truth, `answer` = the model's answer, as in `ask
    --json`), in place. -> whether it was a schema-1 record."""
    if "prediction" not in record:
        return False
    record["expected"] = record.pop("answer", None)
    record["answer"] = record.pop("prediction")
    record["schema"] = RECORD_SCHEMA
    return True


# --- reading ---------------------------------------------------------------------------------


def read_records(path: Path, repair: bool = False) -> Existing:
    """Records of an existing output file. A damaged last record (an interrupted write: no final
    newline, bad JSON, a short CSV row) is dropped; with `repair`, the file is rewritten without
    it. Damage anywhere else, or a file that is not a batch output, is BadInput."""
    fmt = output_format(path)
    data = path.read_bytes()
    if fmt == ".jsonl":
        existing, keep_bytes = _read_jsonl(path, data)
    else:
        existing, keep_bytes = _read_csv(path, data)
    if repair and existing.dropped:
        atomic_write(path, keep_bytes)
    return existing


def _read_jsonl(path: Path, data: bytes) -> tuple[Existing, bytes]:
    existing = Existing()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline
    kept: list[bytes] = []
    last = max((n for n, raw in enumerate(complete, start=1) if raw.strip()), default=0)
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        record, problem = _parse_json_record(raw)
        if problem is None:
            existing.upgraded += upgrade_record(record)
            existing.records.append(record)
            kept.append(raw + b"\n")
            continue
        if number == last and not tail.strip():
            existing.dropped.append(f"line {number}: {problem}")
            continue
        raise BadInput(f"{path}: line {number}: {problem}; not written by an interrupted run (it is "
                       f"not the last line): fix or delete the line, or start over with --overwrite")
    if tail.strip():
        existing.dropped.append(f"line {len(complete) + 1}: incomplete (no newline at the end)")
    return existing, b"".join(kept)


def _parse_json_record(raw: bytes) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "not valid JSON"
    if not isinstance(record, dict) or any(key not in record for key in _REQUIRED_KEYS):
        return None, "not a vidqa batch record (no id/preset/keep)"
    return record, None


def _read_csv(path: Path, data: bytes) -> tuple[Existing, bytes]:
    existing = Existing()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise BadInput(f"{path}: not UTF-8 text (line {line}); not a vidqa batch output: "
                       f"use another --output or --overwrite") from None
    if not text.strip():
        return existing, b""
    incomplete = not text.endswith("\n")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as error:  # e.g. an unterminated quote at the end of a cut-off write
        if not incomplete:
            raise BadInput(f"{path}: line {start}: bad CSV ({error}); fix the line or use --overwrite") from None
        rows.append((start, []))
    if incomplete:
        line, _ = rows.pop()
        existing.dropped.append(f"line {line}: incomplete (no newline at the end)")
    if not rows:  # the header itself was cut off: start the file again
        return existing, b""
    header = rows[0][1]
    if any(key not in header for key in _REQUIRED_KEYS):
        raise BadInput(f"{path}: line 1: not a vidqa batch output (no id/preset/keep columns); "
                       f"use another --output, or --overwrite to replace it")
    body = [(line, row) for line, row in rows[1:] if row]
    for position, (line, row) in enumerate(body):
        if len(row) < len(header):
            if position == len(body) - 1:
                existing.dropped.append(f"line {line}: short row ({len(row)} of {len(header)} fields)")
                body = body[:-1]
                break
            raise BadInput(f"{path}: line {line}: short row ({len(row)} of {len(header)} fields), "
                           f"not the last one: fix or delete it, or start over with --overwrite")
    legacy = "prediction" in header  # schema 1: answer = ground truth, prediction = the model's
    for _, row in body:
        cells = dict(zip(header, row))
        if legacy:
            cells["expected"], cells["answer"] = cells.get("answer", ""), cells.get("prediction", "")
            existing.upgraded += 1
        existing.records.append(_record_from_csv(cells))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(row for _, row in body)
    return existing, buffer.getvalue().encode("utf-8")


def _record_from_csv(row: dict[str, str]) -> dict:
    """A CSV row back into the record shape (with the flattened stats nested again)."""

    def value(name):
        text = row.get(name, "")
        return None if text == "" else text

    record = {name: value(name) for name in CSV_FIELDS if name not in _CSV_STATS}
    record["keep"] = normalize_keep(record["keep"])
    correct = record.get("correct")
    record["correct"] = None if correct is None else correct.lower() == "true"
    record["options"] = record["options"].split("|") if record.get("options") else None
    if record.get("error") is None:
        stats: dict = {"tokens": {}, "time": {}, "flops": {}}
        for column, (group, name) in _CSV_STATS.items():
            text = value(column)
            if text is None:
                continue
            number = int(float(text)) if column in _INTEGER_COLUMNS else float(text)
            if group is None:
                stats[name] = number
            else:
                stats[group][name] = number
        record["stats"] = stats
    else:
        record["stats"] = None
    return record


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once: a temporary file in the same folder, os.replace."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# --- writing ---------------------------------------------------------------------------------


def csv_row(record: dict) -> list[str]:
    stats = record.get("stats") or {}
    cells = []
    for name in CSV_FIELDS:
        if name in _CSV_STATS:
            group, key = _CSV_STATS[name]
            value = (stats.get(group) or {}).get(key) if group else stats.get(key)
        else:
            value = record.get(name)
        if name == "options" and value:
            value = "|".join(value)
        if value is None:
            cells.append("")
        elif isinstance(value, bool):
            cells.append("true" if value else "false")
        else:
            cells.append(str(value))
    return cells


def encode_record(record: dict, fmt: str) -> bytes:
    if fmt == ".jsonl":
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    return _csv_line(csv_row(record))


def rewrite_records(path: Path, records: list[dict]) -> None:
    """Replace the output with exactly `records` (atomically), e.g. without its error records."""
    fmt = output_format(path)
    header = _csv_line(CSV_FIELDS) if fmt == ".csv" else b""
    atomic_write(path, header + b"".join(encode_record(record, fmt) for record in records))


class RecordWriter:
    """Appends records to the output, each flushed and fsync'd before the next starts."""

    def __init__(self, path: Path, overwrite: bool = False):
        self.path, self.format = path, output_format(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = overwrite or not path.exists() or path.stat().st_size == 0
        self._file = open(path, "wb" if fresh else "ab")
        if fresh and self.format == ".csv":
            self._write(_csv_line(CSV_FIELDS))

    def write(self, record: dict) -> None:
        self._write(encode_record(record, self.format))

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:  # e.g. a full disk: name the file (write() errors carry no name)
            if error.filename is None:
                error.filename = str(self.path)
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            self.close()
        except OSError:
            if exc_type is None:
                raise  # a failed final flush; otherwise the first error is the one to report
        return False


def _csv_line(cells: list[str]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue().encode("utf-8")
