"""The committed micro checkpoint answers the held-out questions, and the benchmark is sensitive to
which frames' tokens are kept (benchmarks/micro/heldout.py, benchmarks/micro/accuracy.py).

The behaviour tests run on the committed checkpoint at vidqa/micro/checkpoint (a missing
checkpoint is a failure, not a skip); VIDQA_MICRO_CHECKPOINT=/path points them at another
checkpoint (e.g. a second seed).
The held-out subsets are generated from the seed in tmp_path (cheap), never committed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from microworld import world
from vidqa.micro import CHECKPOINT as MICRO_CHECKPOINT

CHECKPOINT = Path(os.environ.get("VIDQA_MICRO_CHECKPOINT") or MICRO_CHECKPOINT)
START_TYPES = ("square_start", "background_start")
END_TYPES = ("square_end", "background_end")


@pytest.fixture(scope="module")
def acc(load_script):
    return load_script("benchmarks/micro/accuracy.py")


def checkpoint() -> Path:
    """The trained checkpoint (committed); a missing one fails the test, saying how to rebuild it."""
    if not (CHECKPOINT / "config.json").is_file():
        pytest.fail(
            f"the trained micro checkpoint is missing: {CHECKPOINT}/config.json not found. Train it with the "
            "command in benchmarks/micro/README.md (python -m microworld.train --out vidqa/micro/checkpoint "
            "--seed 0 ...), or set VIDQA_MICRO_CHECKPOINT to a checkpoint directory."
        )
    return CHECKPOINT


def _accuracy(records, types):
    chosen = [r for r in records if r["type"] in types and r["correct"] is not None]
    assert chosen and not any(r.get("error") for r in chosen)
    return sum(r["correct"] for r in chosen) / len(chosen)


# --- the checkpoint ----------------------------------------------------------------------------


def test_checkpoint_answers_heldout_questions_through_vidqa_batch(acc, run_cli, tmp_path):
    """>= 95% of 7 question types x 6 held-out clips (mp4, decoded by vidqa), --prune none."""
    model = checkpoint()
    csv_path = acc.heldout.generate(tmp_path / "heldout", clips=6)
    rows = acc.heldout.read_questions(csv_path)
    assert len(rows) == 6 * len(world.QUESTION_TYPES)
    out = tmp_path / "none.jsonl"
    result = run_cli(["batch", csv_path, "-o", out, "--model", model, "--frames", "8", "--max-new-tokens", "3",
                      "--device", "cpu", "--dtype", "float32", "--prune", "none", "-q"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(rows) and all(r["error"] is None for r in records)
    table = acc.accuracy_table(records, world.QUESTION_TYPES)
    assert len(table) == 1 and table[0]["preset"] == "none"
    overall = table[0]["overall"]
    wrong = [(r["id"], r["expected"], r["answer"]) for r in records if not r["correct"]]
    per_type = {t: table[0][t]["accuracy"] for t in world.QUESTION_TYPES}
    assert overall["accuracy"] >= 0.95, f"accuracy {overall['accuracy']:.3f} < 0.95; per type {per_type}; wrong (id, expected, answer) {wrong[:12]}"


def test_keeping_only_one_half_of_the_clip_loses_the_other_halfs_questions(acc, tmp_path):
    """End-only tokens (frames 4-7) lose "at the start" questions, start-only (0-3) "at the end"
    ones, each by >= 0.25 against all tokens and against the opposite selection. The clips are the
    first held-out clips where both the square and the background change colour, so the start and
    end answers differ and half the clip cannot give both."""
    from vidqa.models import load_model

    adapter = load_model(str(checkpoint()), device="cpu", dtype="float32")
    clips = [i for i in range(200)
             if (c := world.heldout_clip(i)).square_change is not None and c.background_change is not None][:6]
    assert len(clips) == 6
    folder = tmp_path / "changing"
    csv_path = acc.heldout.generate(folder, clips=clips, types=START_TYPES + END_TYPES)
    rows = acc.heldout.read_questions(csv_path)
    tasks = [("all", 128, 1.0), ("start-only", 64, 0.5), ("end-only", 64, 0.5)]
    records = acc.join_types(acc.run_selections(adapter, rows, folder, acc.heldout.read_manifest(folder), tasks))
    assert len(records) == len(rows) * len(tasks)
    by = {name: [r for r in records if r["preset"] == name] for name, _, _ in tasks}
    for name, budget, _ in tasks:
        assert all(r["stats"]["tokens"]["visual_tokens_after"] == budget for r in by[name])
    full = {kinds: _accuracy(by["all"], kinds) for kinds in (START_TYPES, END_TYPES)}
    start_only = {kinds: _accuracy(by["start-only"], kinds) for kinds in (START_TYPES, END_TYPES)}
    end_only = {kinds: _accuracy(by["end-only"], kinds) for kinds in (START_TYPES, END_TYPES)}
    report = f"all {full}, start-only {start_only}, end-only {end_only}"
    assert full[START_TYPES] - end_only[START_TYPES] >= 0.25, report
    assert full[END_TYPES] - start_only[END_TYPES] >= 0.25, report
    assert start_only[START_TYPES] - end_only[START_TYPES] >= 0.25, report
    assert end_only[END_TYPES] - start_only[END_TYPES] >= 0.25, report


# --- the benchmark's plumbing (no checkpoint needed) -------------------------------------------


def test_heldout_set_is_regenerable_and_ids_name_the_type(acc, tmp_path):
    from vidqa.batch.runner import read_questions as batch_read

    a = acc.heldout.generate(tmp_path / "a", clips=3, types=("square_start", "circle"))
    b = acc.heldout.generate(tmp_path / "b", clips=3, types=("square_start", "circle"))
    rows_a, rows_b = acc.heldout.read_questions(a), acc.heldout.read_questions(b)
    assert rows_a == rows_b and len(rows_a) == 6
    for row in rows_a:
        assert acc.heldout.type_of_id(row["id"]) == row["type"]
        assert acc.heldout.clip_of_id(row["id"]) == int(row["clip"])
        assert row["expected"] == world.heldout_clip(int(row["clip"])).answers[row["type"]]
        assert (tmp_path / "a" / row["video"]).stat().st_size > 0
    parsed = batch_read(a)  # what vidqa batch sees: unknown columns ignored, videos resolved
    assert [r.id for r in parsed] == [r["id"] for r in rows_a]
    assert all(r.video_path.exists() and r.expected for r in parsed)
    manifest = acc.heldout.read_manifest(tmp_path / "a")
    assert manifest["seed"] == world.HELDOUT_SEED and sorted(manifest["clips"]) == [0, 1, 2]
    assert manifest["clips"][1]["square_boxes"] == world.heldout_clip(1).square_boxes.tolist()



def test_first_clip_extends_a_sweep_with_the_next_clips(acc, tmp_path):
    """--first-clip 2 --clips 2 asks about clips 2 and 3, the same clips a 4-clip set holds there."""
    folder = tmp_path / "more"
    with pytest.raises(SystemExit, match="no records"):  # nothing run: only the held-out set is made
        acc.main(["--first-clip", "2", "--clips", "2", "--heldout", str(folder), "--model", str(MICRO_CHECKPOINT),
                  "--skip-sweep", "--skip-references"])
    rows = acc.heldout.read_questions(folder / acc.heldout.CSV_NAME)
    assert sorted({int(row["clip"]) for row in rows}) == [2, 3]
    with pytest.raises(SystemExit) as refused:  # argparse's one-line error, exit 2, no traceback
        acc.main(["--first-clip", "-1", "--heldout", str(tmp_path / "bad"), "--skip-sweep", "--skip-references"])
    assert refused.value.code == 2 and not (tmp_path / "bad").exists()
    whole = acc.heldout.read_questions(acc.heldout.generate(tmp_path / "whole", clips=4))
    assert rows == [row for row in whole if int(row["clip"]) >= 2]


def test_types_asks_only_the_named_question_types(acc, tmp_path):
    """--types writes only those types' questions; an unknown type is argparse's one-line error."""
    folder = tmp_path / "two-types"
    with pytest.raises(SystemExit, match="no records"):
        acc.main(["--clips", "2", "--heldout", str(folder), "--model", str(MICRO_CHECKPOINT),
                  "--types", "direction,square_end", "--skip-sweep", "--skip-references"])
    rows = acc.heldout.read_questions(folder / acc.heldout.CSV_NAME)
    assert len(rows) == 4 and {row["type"] for row in rows} == {"direction", "square_end"}
    with pytest.raises(SystemExit) as refused:
        acc.main(["--heldout", str(tmp_path / "bad"), "--types", "direction,ball", "--skip-sweep", "--skip-references"])
    assert refused.value.code == 2 and not (tmp_path / "bad").exists()

def _tokens(frames=8, side=4):
    from vidqa.tensors.tokens import VisualTokens

    n = frames * side * side
    token = torch.arange(n)
    return VisualTokens(features=torch.zeros(n, 2), frame=token // (side * side), row=(token % (side * side)) // side,
                        col=token % side, seq_index=token + 5, grid=(frames, side, side))


def test_selections_keep_the_frames_and_cells_they_say(acc):
    tokens = _tokens()
    frame_of = lambda name, k=64: sorted(set(tokens.frame[acc.selection_index(name, tokens, k)].tolist()))  # noqa: E731
    assert frame_of("start-only") == [0, 1, 2, 3]
    assert frame_of("end-only") == [4, 5, 6, 7]
    assert frame_of("even-frames") == [0, 2, 4, 6]
    for name in ("checkerboard", "per-frame-random", "random", "all"):
        index = acc.selection_index(name, tokens, 128 if name == "all" else 64)
        assert len(set(index.tolist())) == len(index) == (128 if name == "all" else 64)
        if name in ("checkerboard", "per-frame-random"):
            assert np.bincount(tokens.frame[index].numpy()).tolist() == [8] * 8
    assert acc.spread(13, 8) == [2, 1, 2, 1, 2, 2, 1, 2] and sum(acc.spread(32, 8)) == 32
    with pytest.raises(ValueError):
        acc.selection_index("end-only", tokens, 32)

    clip = world.heldout_clip(0)
    truth = acc.heldout._truth(clip)
    index = acc.selection_index("oracle", tokens, 8, truth)  # one token per frame: the square's cell
    for i in index.tolist():
        t, r, c = int(tokens.frame[i]), int(tokens.row[i]), int(tokens.col[i])
        x0, y0, x1, y1 = clip.square_boxes[t]
        covered = max(0, min(x1, 28 * c + 28) - max(x0, 28 * c)) * max(0, min(y1, 28 * r + 28) - max(y0, 28 * r))
        assert covered >= 28 * 28 * 0.25, (t, r, c, clip.square_boxes[t])
    assert len(acc.selection_index("oracle", tokens, 13, truth)) == 13


def _record(id, preset, keep, correct=None, error=None, fraction=0.5):
    stats = None if error else {"flops": {"paper_fraction": fraction},
                                "tokens": {"visual_tokens_after": 10, "layer_avg_retention": fraction}}
    return {"id": id, "preset": preset, "keep": keep, "correct": correct, "error": error, "stats": stats,
            "answer": None if error else "x"}


def test_table_joins_types_by_id_and_shows_unreachable_cells(acc):
    message = "--keep 0.1 is below what 'fastv' can reach on this 4-layer model (at least 0.250)"
    records = [
        _record("c0000-square_start", "none", None, True, fraction=1.0),
        _record("c0000-circle", "none", None, False, fraction=1.0),
        _record("c0000-square_start", "fastv", 0.1, error=message),
        _record("c0000-circle", "fastv", 0.1, error=message),
        _record("c0000-square_start", "fastv", 0.5, True),
        _record("c0000-circle", "fastv", 0.5, True),
        _record("not-from-heldout", "none", None, True),
    ]
    table = acc.accuracy_table(records, ("square_start", "circle"), order=["none", "fastv"])
    assert [(r["preset"], r["keep"]) for r in table] == [("none", None), ("fastv", 0.1), ("fastv", 0.5)]
    assert table[0]["overall"]["accuracy"] == 0.5 and table[0]["circle"]["accuracy"] == 0.0
    assert table[1]["square_start"]["unreachable"] == 1 and table[1]["overall"]["at_least"] == 0.25
    markdown = acc.markdown_table(table, ("square_start", "circle"))
    line = next(line for line in markdown.splitlines() if line.startswith("| fastv | 0.1 |"))
    assert line.count("unreachable") == 3 and "R ≥ 0.25" in line
    assert "| fastv | 0.5 | 1.00 | 1.00 | 1.00 |" in markdown


def test_the_48_clip_table_is_what_the_counts_give(load_script):
    """docs/accuracy.md's 48-clip table: clips 0-23 recovered from the 24-clip table's cells (the
    recovery checked on the rerun, whose records and table both exist), clips 24-47 counted."""
    combine = load_script("benchmarks/micro/combine_clips.py")
    runs = Path(__file__).resolve().parents[1] / "benchmarks" / "micro" / "runs"
    doc = combine.DOC.read_text(encoding="utf-8")
    rerun_table = doc[doc.index("The rerun's full table"):]
    recovered = combine.table_counts(rerun_table[:rerun_table.index("</details>")])
    counted = combine.record_counts(runs / "smol_sweep_rerun_clips0-23.jsonl.gz")
    assert len(recovered) >= 40 and recovered == {key: counted[key] for key in recovered}
    table = combine.combined_table(combine.table_counts(combine.doc_block()),
                                   combine.record_counts(runs / "smol_sweep_seed0_clips24-47.jsonl.gz"))
    assert table in doc


def committed_records(name: str) -> list[dict]:
    """The records of benchmarks/micro/runs/<name>.jsonl.gz."""
    import gzip

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "micro" / "runs" / f"{name}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_doc_block_renders(acc, sweep, refs, types, begin, end) -> dict:
    """docs/accuracy.md's block between the `begin` and `end` markers is what accuracy.py renders
    from these records (dense 16 x 36 token counts); -> the render's summary."""
    from microworld import dense

    markdown, summary = acc.render(sweep, refs, acc.DEFAULT_PRESETS, types, num_tokens=dense.REDUCED.visual_tokens)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "accuracy.md").read_text(encoding="utf-8")
    assert markdown.strip() == doc[doc.index(begin) + len(begin):doc.index(end)].strip()
    return summary


def test_the_dense_interim_block_is_what_its_records_give(acc):
    """docs/accuracy.md's dense 16 x 36 block (the interim model, eight types, keep 0.25) renders
    from the committed records (answers, scores and the figures the table reads)."""
    from microworld import dense

    sweep = committed_records("dense16x36_interim_sweep_keep0.25_clips0-47")
    refs = committed_records("dense16x36_interim_references_keep0.25_clips0-47")
    types = [t for t in dense.DENSE_QUESTION_TYPES if t not in ("ball", "blinks", "order")]
    summary = assert_doc_block_renders(acc, sweep, refs, types, acc.DENSE_DOC_BEGIN, acc.DENSE_DOC_END)
    assert summary["clips"] == 48 and len(sweep) == 13 * 48 * len(types)


def assert_three_keep_dense_block(acc, types: list[str], part: str, marker: str) -> dict:
    """A light24 block swept in two runs (keeps 0.1 / 0.5, then 0.25) renders from its committed
    records `dense16x36_light24_{sweep,references}_{run}_{part}_clips0-47`, which hold every token
    once and 12 presets at three keeps; three references at three keeps (per-frame-random and oracle
    at 0.5 are also sensitivity rows) and the other four sensitivity selections."""
    runs = ("keep0.1-0.5", "keep0.25")
    sweep = [r for run in runs for r in committed_records(f"dense16x36_light24_sweep_{run}_{part}_clips0-47")]
    refs = [r for run in runs for r in committed_records(f"dense16x36_light24_references_{run}_{part}_clips0-47")]
    summary = assert_doc_block_renders(acc, sweep, refs, types, f"<!-- dense light24 {marker}:begin -->",
                                       f"<!-- dense light24 {marker}:end -->")
    assert summary["clips"] == 48 and len(sweep) == (1 + 12 * 3) * 48 * len(types)
    assert len(refs) == (3 * 3 + 4) * 48 * len(types)
    return summary


def test_the_dense_new_types_block_and_every_token_row_are_what_their_records_give(acc):
    """docs/accuracy.md's flash / ball / order block (the interim dense checkpoint, keeps 0.1,
    0.25 and 0.5, two runs) renders from its committed records, and the every-token figures the
    text gives (0.93 overall, the blinks 0.29) are those of the 11-type records."""
    from microworld import dense

    assert_three_keep_dense_block(acc, ["flash", "ball", "order"], "flash-ball-order", "new types")
    _, every = acc.render(committed_records("dense16x36_light24_none_clips0-47"), [], ["none"], list(dense.DENSE_QUESTION_TYPES),
                          num_tokens=dense.REDUCED.visual_tokens)
    none = every["presets"][0]
    assert none["overall"]["n"] == 48 * 11 and round(none["overall"]["accuracy"], 2) == 0.93
    doc = (Path(__file__).resolve().parents[1] / "docs" / "accuracy.md").read_text(encoding="utf-8")
    assert round(none["blinks"]["accuracy"], 2) == 0.29 and "every token scores **0.93** overall" in doc


def test_the_dense_shared_types_block_at_three_keeps_is_what_its_records_give(acc):
    """docs/accuracy.md's keeps 0.1 / 0.25 / 0.5 block of the seven types both worlds share (the
    interim dense checkpoint, two runs; its every-token rows are the 11-type records') renders from
    its committed records."""
    types = ["square_start", "square_end", "direction", "background_change", "background_start", "background_end",
             "corner_start"]
    assert_three_keep_dense_block(acc, types, "shared-types", "shared types")
