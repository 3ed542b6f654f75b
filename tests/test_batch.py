"""`vidqa batch` and `vidqa summarize`: sweeps, records, resume after a kill, damaged outputs,
per-row errors, bad input, answer extraction, the summary and the plot. Tiny model, 4 frames."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error

from vidqa import api
from vidqa.batch import runner as batching
from vidqa.batch.summary import (
    build_prompt,
    exact_match,
    extract_choice,
    normalize_answer,
    parse_options,
    score,
    summarize,
)
from vidqa.errors import BadInput
from vidqa.testing.videos import three_scene_frames, write_video

REPO = Path(__file__).resolve().parents[1]
FAST = ["--frames", "4", "--max-new-tokens", "2"]
DETERMINISTIC = ("id", "video", "question", "expected", "options", "answer", "correct", "preset", "keep", "error")


@pytest.fixture(scope="module")
def videos(tmp_path_factory, square_video):
    """A folder with two clips (square.mp4, scenes.mp4) next to which the CSVs are written."""
    folder = tmp_path_factory.mktemp("batch")
    (folder / "square.mp4").write_bytes(square_video.read_bytes())
    write_video(folder / "scenes.mp4", three_scene_frames(frames_per_scene=(6, 6, 6), size=(112, 112)))
    return folder


def write_csv(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


SIX = """id,video,question,expected,options
dir,square.mp4,Which way does the square move?,B,A. left|B. right|C. up|D. down
colour,square.mp4,What colour is the square?,red,
end,square.mp4,What colour is it at the end?,C,A. red|B. green|C. blue|D. yellow
count,scenes.mp4,How many scenes are there?,C,A. 1|B. 2|C. 3|D. 4
order,scenes.mp4,Which colour comes first?,red,
free,scenes.mp4,What happens in this video?,,
"""


def batch(run_cli, model, csv_path, output, *extra):
    return run_cli(["batch", csv_path, "-o", output, "--model", model, *FAST, *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(record):
    return (record["id"], record["preset"], record["keep"])


# --- the sweep -------------------------------------------------------------------------------


def test_expand_sweep_runs_none_once():
    presets = ["none", "fastv", "prunevid", "sparsevlm", "adatp"]
    combos = batching.expand_sweep(presets, [0.1, 0.3, 0.5])
    assert len(combos) == 1 + 4 * 3 == 13
    assert combos[0] == ("none", None)
    assert ("fastv", 0.3) in combos and ("adatp", 0.5) in combos
    assert batching.expand_sweep(presets, []) == [(name, None) for name in presets]  # each preset's default
    assert batching.expand_sweep(["none", "none"], [0.3, 0.5]) == [("none", None)]


def test_row_cells_replace_the_sweep(tmp_path):
    questions = write_csv(tmp_path, "q.csv", "video,question,prune,keep\n"
                          "a.mp4,q one,,\n"
                          "a.mp4,q two,fastv,\n"
                          "b.mp4,q three,,0.2\n"
                          "a.mp4,q four,\"none,prunevid\",\"0.1,0.9\"\n")
    rows = batching.read_questions(questions)
    tasks = batching.plan(rows, ["none", "fastv", "prunevid", "sparsevlm", "adatp"], [0.1, 0.3, 0.5])
    per_row = {}
    for task in tasks:
        per_row.setdefault(task.row.question, []).append((task.preset, task.keep))
    assert len(per_row["q one"]) == 13
    assert per_row["q two"] == [("fastv", 0.1), ("fastv", 0.3), ("fastv", 0.5)]
    assert per_row["q three"] == [("none", None)] + [(p, 0.2) for p in ("fastv", "prunevid", "sparsevlm", "adatp")]
    assert per_row["q four"] == [("none", None), ("prunevid", 0.1), ("prunevid", 0.9)]
    # grouped by video (a.mp4's rows first), ids default to the row number
    assert [task.row.video for task in tasks][-5:] == ["b.mp4"] * 5
    assert [row.id for row in rows] == ["1", "2", "3", "4"]
    assert rows[0].video_path == tmp_path / "a.mp4"


def test_sweep_records_summary_and_decode_once(run_cli, tiny_llava, videos, monkeypatch):
    from vidqa.engine import request as engine
    from vidqa.models import ADAPTERS

    decoded, encoded = [], []
    original = engine.decode_video
    monkeypatch.setattr(engine, "decode_video", lambda path, options: decoded.append(path) or original(path, options))
    for adapter_class in ADAPTERS:
        encode = adapter_class.encode_video
        monkeypatch.setattr(adapter_class, "encode_video",
                            lambda self, prompt, encode=encode: encoded.append(1) or encode(self, prompt))
    questions = write_csv(videos, "six.csv", SIX)
    output = videos / "sweep.jsonl"
    result = batch(run_cli, tiny_llava, questions, output, "--prune", "none", "--keep", "0.3,0.5", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert "[1/6]" not in result.stderr and "acc" in result.stderr  # no per-record lines off a terminal; the summary
    records = read_jsonl(output)
    assert len(records) == 6 * 1  # `none` once, whatever --keep says
    assert sorted(decoded) == sorted({str(videos / "square.mp4"), str(videos / "scenes.mp4")})  # once each
    assert {r["id"] for r in records} == {"dir", "colour", "end", "count", "order", "free"}
    first = next(r for r in records if r["id"] == "dir")
    assert first["options"] == ["A. left", "B. right", "C. up", "D. down"]
    assert first["preset"] == "none" and first["keep"] is None and first["error"] is None
    assert first["model"] == str(tiny_llava)
    assert set(first["stats"]) == {"tokens", "time", "flops", "peak_memory_bytes", "peak_memory_kind",
                                   "peak_memory_total_bytes", "verified", "prefix_reused", "decode_path"}
    assert first["stats"]["tokens"]["frames"] == 4
    assert first["stats"]["tokens"]["visual_tokens_before"] == 4 * 16
    assert len(encoded) == 2  # and encoded once each, for their three questions
    free = next(r for r in records if r["id"] == "free")
    assert free["expected"] is None and free["correct"] is None and free["answer"]
    assert all(isinstance(r["correct"], bool) for r in records if r["expected"])

    summary = json.loads(run_cli(["summarize", output, "--json"]).stdout)
    assert summary["records"] == 6 and summary["errors"] == 0
    (group,) = summary["groups"]
    scored = [r for r in records if r["correct"] is not None]
    assert group["rows"] == 6 and group["errors"] == 0 and group["scored"] == len(scored) == 5
    assert group["accuracy"] == pytest.approx(sum(r["correct"] for r in scored) / 5)
    mean = lambda values: pytest.approx(sum(values) / len(values))  # noqa: E731
    assert group["visual_tokens_after"] == mean([r["stats"]["tokens"]["visual_tokens_after"] for r in records])
    assert group["layer_avg_retention"] == mean([r["stats"]["tokens"]["layer_avg_retention"] for r in records])
    assert group["flops_percent"] == mean([100 * r["stats"]["flops"]["paper_fraction"] for r in records])
    assert group["prefill_s"] == mean([r["stats"]["time"]["prefill_s"] + r["stats"]["time"]["video_prefill_s"] for r in records])  # a shared video prefix counted once
    assert group["total_s"] == mean([r["stats"]["time"]["total_s"] for r in records])
    table = run_cli(["summarize", output])
    assert table.exit_code == 0 and "none" in table.stdout and "acc" in table.stdout


def test_real_presets_sweep(run_cli, tiny_llava, videos):
    from vidqa.pruning.core.presets import load_preset

    try:
        load_preset("fastv")
    except BadInput:
        pytest.skip("the fastv preset has not landed yet")
    questions = write_csv(videos, "two.csv", "video,question\nsquare.mp4,what happens ?\nsquare.mp4,what colour ?\n")
    output = videos / "fastv.jsonl"
    result = batch(run_cli, tiny_llava, questions, output, "--prune", "none,fastv", "--keep", "0.5,0.9", "--overwrite")
    assert result.exit_code == 0, result.stderr
    records = read_jsonl(output)
    assert sorted((r["id"], r["preset"], r["keep"]) for r in records) == sorted(
        (i, p, k) for i in ("1", "2") for p, k in (("none", None), ("fastv", 0.5), ("fastv", 0.9))
    )
    assert all(r["error"] is None for r in records)
    retention = {(r["preset"], r["keep"]): r["stats"]["tokens"]["layer_avg_retention"] for r in records}
    assert retention[("fastv", 0.5)] < retention[("none", None)] == 1.0
    # row 2's `none` reuses the encoding fastv ran on for row 1: it must be unchanged by it
    alone = videos / "none-only.jsonl"
    assert batch(run_cli, tiny_llava, questions, alone, "--overwrite").exit_code == 0
    assert {r["id"]: r["answer"] for r in read_jsonl(alone)} == {
        r["id"]: r["answer"] for r in records if r["preset"] == "none"}


# --- resume --------------------------------------------------------------------------------


STALLING_VIDQA = (  # `python -m vidqa`, stalled after its 2nd record is written, so that the kill lands there
    "import runpy, time, vidqa.batch.store as b; w = b.RecordWriter.write; n = [0]\n"
    "def write(self, record):\n"
    "    w(self, record); n[0] += 1\n"
    "    if n[0] == 2: time.sleep(3600)\n"
    "b.RecordWriter.write = write\n"
    "runpy.run_module('vidqa', run_name='__main__', alter_sys=True)"
)


def test_resume_after_sigkill_gives_every_record_once(run_cli, tiny_llava, videos, tmp_path):
    questions = write_csv(videos, "six.csv", SIX)
    reference = tmp_path / "reference.jsonl"
    assert batch(run_cli, tiny_llava, questions, reference).exit_code == 0
    expected = {key(r): r for r in read_jsonl(reference)}
    assert len(expected) == 6

    output = tmp_path / "killed.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-c", STALLING_VIDQA, "batch", str(questions), "-o", str(output), "--model", str(tiny_llava),
         *FAST], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 900  # a hang guard only: the kill waits for the stall, not for a time
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if output.exists() and output.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(10)
    partial = read_jsonl(output)
    assert len(partial) == 2

    resumed = batch(run_cli, tiny_llava, questions, output)
    assert resumed.exit_code == 0, resumed.stderr
    assert f"{len(partial)} of 6 records already" in resumed.stderr
    records = read_jsonl(output)
    assert sorted(key(r) for r in records) == sorted(expected)  # each exactly once
    for record in records:
        want = expected[key(record)]
        assert {f: record[f] for f in DETERMINISTIC} == {f: want[f] for f in DETERMINISTIC}
        assert record["stats"]["tokens"] == want["stats"]["tokens"]
        assert record["stats"]["flops"] == want["stats"]["flops"]


def test_truncated_last_line_is_dropped_and_redone(run_cli, tiny_llava, videos, tmp_path):
    questions = write_csv(videos, "three.csv", "".join(SIX.splitlines(keepends=True)[:4]))
    output = tmp_path / "out.jsonl"
    assert batch(run_cli, tiny_llava, questions, output).exit_code == 0
    complete = read_jsonl(output)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # a cut-off write

    result = batch(run_cli, tiny_llava, questions, output)
    assert result.exit_code == 0, result.stderr
    assert "dropped a damaged record (line 3" in result.stderr
    records = read_jsonl(output)  # every line parses again
    assert sorted(key(r) for r in records) == sorted(key(r) for r in complete)
    assert [r["answer"] for r in records] == [r["answer"] for r in complete]


def test_damage_before_the_last_line_is_refused(run_cli, tiny_llava, videos, tmp_path):
    questions = write_csv(videos, "three.csv", "".join(SIX.splitlines(keepends=True)[:4]))
    output = tmp_path / "out.jsonl"
    assert batch(run_cli, tiny_llava, questions, output).exit_code == 0
    lines = output.read_text().splitlines(keepends=True)
    output.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    before = output.read_bytes()
    assert_one_line_error(batch(run_cli, tiny_llava, questions, output), "line 2", "--overwrite")
    assert output.read_bytes() == before


def test_csv_output_flattens_stats_and_resumes(run_cli, tiny_llava, videos, tmp_path):
    import csv

    questions = write_csv(videos, "six.csv", SIX)
    output = tmp_path / "out.csv"
    assert batch(run_cli, tiny_llava, questions, output).exit_code == 0
    rows = list(csv.DictReader(output.open(newline="")))
    assert len(rows) == 6
    assert {"visual_tokens_before", "visual_tokens_after", "layer_avg_retention", "paper_flops_fraction",
            "prefill_s", "total_s", "prompt_tokens", "generated_tokens", "error"} <= set(rows[0])
    assert rows[0]["visual_tokens_before"] == "64" and rows[0]["error"] == ""

    text = output.read_text()
    output.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + text.splitlines()[-1][:20])  # cut last row
    resumed = batch(run_cli, tiny_llava, questions, output)
    assert resumed.exit_code == 0, resumed.stderr
    assert "dropped a damaged record" in resumed.stderr and "5 of 6 records already" in resumed.stderr
    again = list(csv.DictReader(output.open(newline="")))
    assert sorted((r["id"], r["answer"]) for r in again) == sorted((r["id"], r["answer"]) for r in rows)
    summary = json.loads(run_cli(["summarize", output, "--json"]).stdout)
    assert summary["records"] == 6 and summary["groups"][0]["visual_tokens_before"] == 64


def test_resume_with_other_options_is_refused(run_cli, tiny_llava, videos, tmp_path):
    questions = write_csv(videos, "one.csv", "video,question\nsquare.mp4,what happens ?\n")
    output = tmp_path / "out.jsonl"
    assert batch(run_cli, tiny_llava, questions, output).exit_code == 0
    other = run_cli(["batch", questions, "-o", output, "--model", tiny_llava, "--frames", "8", "--max-new-tokens", "2"])
    assert_one_line_error(other, "--frames 4 (now 8)", "--overwrite")
    fresh = run_cli(["batch", questions, "-o", output, "--model", tiny_llava, "--frames", "8",
                     "--max-new-tokens", "2", "--overwrite"])
    assert fresh.exit_code == 0
    (record,) = read_jsonl(output)
    assert record["parameters"]["frames"] == 8


# --- per-row errors --------------------------------------------------------------------------


def test_missing_video_and_empty_question_are_row_errors(run_cli, tiny_llava, videos, tmp_path):
    questions = write_csv(videos, "errors.csv", "id,video,question\n"
                          "ok,square.mp4,what happens ?\n"
                          "gone,nowhere.mp4,what happens ?\n"
                          "blank,square.mp4,   \n"
                          "ok2,scenes.mp4,what colour ?\n")
    output = tmp_path / "out.jsonl"
    result = batch(run_cli, tiny_llava, questions, output, "--verbose")
    assert result.exit_code == 1
    assert "2 of 4 records failed" in result.stderr
    assert "[3/4] gone · none · error: video not found" in result.stderr  # --verbose: a line per record
    records = {r["id"]: r for r in read_jsonl(output)}
    assert records["ok"]["error"] is None and records["ok2"]["error"] is None
    assert "nowhere.mp4" in records["gone"]["error"] and records["gone"]["answer"] is None
    assert records["gone"]["stats"] is None
    assert "question cell is empty" in records["blank"]["error"]
    assert "\n" not in records["gone"]["error"]

    # resuming keeps the error records; --retry-errors redoes them
    (videos / "nowhere.mp4").write_bytes((videos / "square.mp4").read_bytes())
    try:
        assert batch(run_cli, tiny_llava, questions, output).exit_code == 1
        retried = batch(run_cli, tiny_llava, questions, output, "--retry-errors")
        assert retried.exit_code == 1 and "1 of 4 records failed" in retried.stderr
        records = {r["id"]: r for r in read_jsonl(output)}
        assert len(records) == 4 and records["gone"]["error"] is None and records["gone"]["answer"]
    finally:
        (videos / "nowhere.mp4").unlink()


def test_clip_cache_bound_evicts_clip_and_encoding_together(monkeypatch, tmp_path):
    from vidqa.engine import request as engine
    from vidqa.video.decode import Clip

    def fake_decode(path, options):
        if "bad" in path:
            calls.append(path)
            raise BadInput(f"cannot decode video {path}")
        frames = np.zeros((4, 10, 10, 3), np.uint8)  # 1200 bytes
        return Clip(frames, np.arange(4), np.arange(4.0), 8.0, 1.0, 8, "decord")

    calls: list[str] = []
    monkeypatch.setattr(engine, "decode_video", fake_decode)
    cache = batching.ClipCache(max_bytes=2500)
    options = engine.FrameOptions(frames=4)
    a = cache.get(Path("a.mp4"), options)
    cache.encoded[id(a)] = "encoded a"
    b = cache.get(Path("b.mp4"), options)
    cache.encoded[id(b)] = "encoded b"
    assert cache.get(Path("a.mp4"), options) is a  # a hit, and now the most recent
    cache.get(Path("c.mp4"), options)  # 3600 bytes > 2500: the least recent (b) goes, with its encoding
    assert list(cache.encoded) == [id(a)] and cache.bytes == 2400
    assert cache.decodes == 3
    for _ in range(3):
        with pytest.raises(BadInput):
            cache.get(Path("bad.mp4"), options)
    assert calls == ["bad.mp4"]  # a failure is remembered


def test_out_of_memory_is_a_row_error_and_frees_the_cache(monkeypatch, tmp_path):
    import torch

    from vidqa.engine import request as engine
    from vidqa.engine.session import VideoSession
    from vidqa.errors import RuntimeFailure
    from vidqa.video.decode import Clip

    monkeypatch.setattr(engine, "decode_video", lambda path, options: Clip(
        np.zeros((4, 8, 8, 3), np.uint8), np.arange(4), np.arange(4.0), 8.0, 1.0, 8, "decord"))

    def out_of_memory(*args, **kwargs):
        raise RuntimeFailure("out of GPU memory; try fewer --frames, a pruning preset (--prune), or a smaller --model")

    emptied = []
    monkeypatch.setattr(VideoSession, "ask", out_of_memory)  # every row is answered through a session
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    questions = write_csv(tmp_path, "q.csv", "video,question\na.mp4,what ?\n")
    (row,) = batching.read_questions(questions)
    settings = batching.Settings(model="m", frame_options=engine.FrameOptions(frames=4),
                                 generation=engine.GenerationOptions(max_new_tokens=2), overrides=[], attn="sdpa")
    cache = batching.ClipCache(2**20)
    cache.encoded[123] = "stale"
    model = api.Model(None, api.Settings(model="m"))  # never called: the session's ask fails first
    record = batching.Runner(model, settings, cache).run(batching.Task(row, "none", None))
    assert record["error"].startswith("out of GPU memory") and record["answer"] is None
    assert emptied == [1] and cache.encoded == {}


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, fragments",
    [
        (b"video,q\nsquare.mp4,what ?\n", ["line 1", "missing required column 'question'", "found: video, q"]),
        (b"", ["empty file"]),
        (b"id,video,question\n", ["no rows"]),
        (b"video,question\nsquare.mp4,ok\nsquare.mp4,caf\xe9 ?\n", ["not UTF-8", "line 3"]),
        (b"id,video,question\nx,a.mp4,q\nx,b.mp4,q\n", ["line 3", "duplicate id 'x'"]),
        (b"video,question,keep\na.mp4,q,abc\n", ["line 2", "'abc' is not a number"]),
    ],
    ids=["missing-column", "empty", "header-only", "not-utf8", "duplicate-id", "bad-keep-cell"],
)
def test_bad_questions_csv(run_cli, tiny_llava, tmp_path, content, fragments):
    questions = tmp_path / "questions.csv"
    questions.write_bytes(content)
    output = tmp_path / "out.jsonl"
    assert_one_line_error(batch(run_cli, tiny_llava, questions, output), "questions.csv", *fragments)
    assert not output.exists()


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--keep", "abc"], ["--keep: 'abc' is not a number"]),
        (["--keep", "0.3,1.5"], ["--keep: 1.5 is not in (0, 1]"]),
        (["--prune", "no-such-preset"], ["--prune", "no-such-preset"]),
        (["-P", "novalue"], ["-P", "novalue"]),
        (["--frames", "0"], ["--frames"]),
    ],
    ids=["keep-not-a-number", "keep-out-of-range", "unknown-preset", "bad-override", "zero-frames"],
)
def test_bad_options(run_cli, tiny_llava, videos, tmp_path, extra, fragments):
    questions = write_csv(videos, "one.csv", "video,question\nsquare.mp4,what happens ?\n")
    output = tmp_path / "out.jsonl"
    assert_one_line_error(batch(run_cli, tiny_llava, questions, output, *extra), *fragments)
    assert not output.exists()


def test_bad_output_names(run_cli, tiny_llava, videos, tmp_path):
    questions = write_csv(videos, "one.csv", "video,question\nsquare.mp4,what happens ?\n")
    assert_one_line_error(batch(run_cli, tiny_llava, questions, tmp_path / "out.txt"), "out.txt", ".jsonl or .csv")
    assert not (tmp_path / "out.txt").exists()
    missing = run_cli(["batch", questions, "--model", tiny_llava])
    assert_one_line_error(missing, "--output")
    assert_one_line_error(run_cli(["batch", tmp_path / "nope.csv", "-o", tmp_path / "o.jsonl"]), "nope.csv", "not found")


def test_foreign_output_file_is_not_touched(run_cli, tiny_llava, videos, tmp_path):
    questions = write_csv(videos, "one.csv", "video,question\nsquare.mp4,what happens ?\n")
    output = tmp_path / "notes.csv"
    output.write_text("name,score\nalice,3\n")
    assert_one_line_error(batch(run_cli, tiny_llava, questions, output), "not a vidqa batch output")
    assert output.read_text() == "name,score\nalice,3\n"


# --- answers ---------------------------------------------------------------------------------


CATS = ["left", "right", "up", "down"]


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B) a cat", "B"),
        ("B.", "B"),
        ("B. right", "B"),
        ("The answer is B.", "B"),
        ("Answer: (c)", "C"),
        ("answer: d", "D"),
        ("b) dog", "B"),
        ("C: up", "C"),
        ("I think it's B", "B"),
        ("The correct option is A", "A"),
        ("A", "A"),
        ("A. left", "A"),
        ("A cat sits on a mat.", None),  # the article, and no option mentions cats
        ("The answer is a cat.", None),
        ("right", "B"),  # an option's text
        ("It moves to the right.", "B"),  # contains exactly one option's text
        ("It moves right, not left", None),  # two options' texts
        ("B or C", None),  # two letters
        ("E", None),  # not an option
        ("", None),
        ("   ", None),
    ],
)
def test_extract_choice(prediction, expected):
    assert extract_choice(prediction, "ABCD", CATS) == expected


def test_options_prompt_and_scoring():
    options = parse_options("A. left|B. right|C. up|D. down")
    assert options == [("A", "left"), ("B", "right"), ("C", "up"), ("D", "down")]
    assert parse_options("cat|dog") == [("A", "cat"), ("B", "dog")]
    assert parse_options("(A) cat|(B) dog") == [("A", "cat"), ("B", "dog")]
    assert parse_options("") == []
    prompt = build_prompt("Which way?", options)
    assert prompt == ("Which way?\nA. left\nB. right\nC. up\nD. down\n"
                      "Answer with the option's letter from the given choices directly.")
    assert build_prompt("Which way?", []) == "Which way?"
    assert score("The answer is B.", "B", options) is True
    assert score("(B) right", "right", options) is True  # the ground truth may be the option text
    assert score("A", "B", options) is False
    assert score("something", "B", options) is False
    assert score("B", None, options) is None
    assert score("Red.", "red", []) is True


@pytest.mark.parametrize(
    "prediction, answer, match",
    [
        ("Red", "red", True),
        ("The red square.", "red square", True),
        ("  a   Blue  circle!! ", "blue circle", True),
        ("red, green, blue", "Red green blue", True),
        ("red", "green", False),
        ("", "", False),
    ],
)
def test_normalised_exact_match(prediction, answer, match):
    assert exact_match(prediction, answer) is match


def test_normalize_answer():
    assert normalize_answer("The Answer: A cat!") == "answer cat"


def test_summary_agreement_without_ground_truth():
    def record(id_, preset, keep, prediction, error=None):
        stats = None if error else {"tokens": {"visual_tokens_after": 10, "layer_avg_retention": 0.5},
                                    "flops": {"paper_fraction": 0.4}, "time": {"prefill_s": 1.0, "total_s": 2.0}}
        return {"id": id_, "preset": preset, "keep": keep, "answer": prediction, "error": error,
                "correct": None, "expected": None, "options": None, "stats": stats}

    rows = summarize([
        record("1", "none", None, "a red square"), record("2", "none", None, "blue"),
        record("1", "fastv", 0.3, "A red square."), record("2", "fastv", 0.3, "green"),
        record("3", "fastv", 0.3, None, error="video not found: x.mp4"),
    ])
    fastv = rows[1]
    assert (fastv["preset"], fastv["keep"], fastv["rows"], fastv["errors"]) == ("fastv", 0.3, 3, 1)
    assert fastv["accuracy"] is None and fastv["agreement"] == 0.5
    assert fastv["flops_percent"] == pytest.approx(40.0)


# --- plot ------------------------------------------------------------------------------------


def test_summarize_plot_writes_a_png(run_cli, tiny_llava, videos, tmp_path):
    questions = write_csv(videos, "three.csv", "".join(SIX.splitlines(keepends=True)[:4]))
    output = tmp_path / "out.jsonl"
    quiet = batch(run_cli, tiny_llava, questions, output, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    png = tmp_path / "plots" / "accuracy.png"
    result = run_cli(["summarize", output, "--plot", png])
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line(run_cli, tiny_llava, videos, tmp_path, monkeypatch):
    questions = write_csv(videos, "one.csv", "video,question\nsquare.mp4,what happens ?\n")
    output = tmp_path / "out.jsonl"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert_one_line_error(batch(run_cli, tiny_llava, questions, output, "--plot", tmp_path / "p.png"),
                          "pip install -e \".[plot]\"")
    assert not output.exists()


def test_a_long_clip_streams_in_a_batch_and_is_cached_without_pixels(run_cli, tiny_llava, tmp_path):
    """Above 128 frames the batch's clip is only planned (decoded a chunk at a time when encoded):
    its cache entry holds no pixels, and both questions are answered, the second from the prefix."""
    write_video(tmp_path / "long.mp4", three_scene_frames(frames_per_scene=(50, 50, 50), size=(112, 112)))
    csv_path = write_csv(tmp_path, "q.csv", "id,video,question\na,long.mp4,What happens?\nb,long.mp4,Which colour comes first?\n")
    output = tmp_path / "out.jsonl"
    result = run_cli(["batch", csv_path, "-o", output, "--model", tiny_llava, "--frames", "140", "--max-new-tokens", "2",
                      "--prune", "evs", "--keep", "0.1"])
    assert result.exit_code == 0, result.stderr
    records = read_jsonl(output)
    assert [r["error"] for r in records] == [None, None]
    assert all(r["stats"]["tokens"]["frames"] == 140 for r in records)
    assert [r["stats"]["prefix_reused"] for r in records] == [False, True]
