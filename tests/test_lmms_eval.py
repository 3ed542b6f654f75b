"""`--model vidqa` for lmms-eval (vidqa/eval/lmms_model.py), offline.

A local multiple-choice task (YAML + a JSONL dataset of generated micro-world clips, no hub) runs
through the real `python -m lmms_eval` with the trained micro model, pruned with fastv and a -P
override; its predictions and score must equal `vidqa batch`'s on the same questions, and every
logged sample must carry vidqa's stats. Skipped when lmms-eval is not installed (`pip install -e
".[eval]"`); the check that vidqa itself never imports lmms_eval always runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

from microworld import world

ROOT = Path(__file__).resolve().parents[1]
CLIPS = (0, 1, 2)
TYPES = ("square_end", "direction", "circle")
# the same answer-changing options on both sides
FRAMES, MAX_NEW_TOKENS, PRESET, KEEP, PARAMS = 8, 4, "fastv", 0.5, ("select.layer=1",)


def micro_checkpoint() -> Path:
    """The trained micro model (VIDQA_MICRO_CHECKPOINT overrides, as in test_micro_accuracy)."""
    path = Path(os.environ.get("VIDQA_MICRO_CHECKPOINT") or ROOT / "vidqa" / "micro" / "checkpoint")
    if not (path / "config.json").is_file():
        pytest.fail(f"the trained micro checkpoint is missing: {path}/config.json (shipped in the package as --model micro)")
    return path


def test_vidqa_never_imports_lmms_eval():
    code = "import sys, vidqa.cli.app, vidqa.batch.runner, vidqa.engine.request, vidqa.eval; print('lmms_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


lmms_eval_missing = importlib.util.find_spec("lmms_eval") is None
needs_lmms_eval = pytest.mark.skipif(
    lmms_eval_missing, reason="lmms-eval is not installed (optional extra: pip install -e '.[eval]')"
)


# --- the local task ------------------------------------------------------------------------------

TASK_YAML = """\
task: vidqa_micro_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

# The micro model reads a 56-word vocabulary, so the prompt is the question alone (an option list
# would be <unk> words to it); the options are in the doc and the answer is their letter.
TASK_UTILS = '''\
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    said = results[0].strip().lower().rstrip(".")
    letters = [letter for letter, text in zip("ABCDEFGH", doc["options"]) if text == said]
    return {"accuracy": float(letters == [doc["answer"]])}
'''


@pytest.fixture(scope="module")
def local_task(tmp_path_factory, load_script):
    """-> (include dir for --include_path, questions CSV for vidqa batch, the ids in doc_id order)."""
    folder = tmp_path_factory.mktemp("lmms_task")
    heldout = load_script("benchmarks/micro/heldout.py")
    csv_path = heldout.generate(folder / "heldout", list(CLIPS), types=TYPES)
    docs = []
    for row in heldout.read_questions(csv_path):
        options = list(world.ANSWERS[row["type"]])
        docs.append({
            "id": row["id"], "video": str((csv_path.parent / row["video"]).resolve()), "question": row["question"],
            "options": options, "answer": string.ascii_uppercase[options.index(row["expected"])],
        })
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    include = folder / "tasks"
    include.mkdir()
    (include / "vidqa_micro_mc.yaml").write_text(TASK_YAML.format(data=data, max_new_tokens=MAX_NEW_TOKENS))
    (include / "utils.py").write_text(TASK_UTILS)
    return include, csv_path, [doc["id"] for doc in docs]


def _run_lmms_eval(include: Path, out: Path, checkpoint: Path) -> subprocess.CompletedProcess:
    model_args = (f"model={checkpoint},device=cpu,frames={FRAMES},prune={PRESET},keep={KEEP},"
                  f"params={';'.join(PARAMS)}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(out / "hf"),
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "lmms_eval", "--model", "vidqa", "--model_args", model_args,
               "--tasks", "vidqa_micro_mc", "--include_path", str(include), "--batch_size", "1",
               "--log_samples", "--output_path", str(out / "results")]
    return subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=900)


@needs_lmms_eval
def test_local_task_through_lmms_eval_matches_vidqa_batch(local_task, tmp_path, run_cli):
    include, csv_path, ids = local_task
    count = len(ids)
    checkpoint = micro_checkpoint()
    done = _run_lmms_eval(include, tmp_path, checkpoint)
    # lmms-eval 0.7.3 exits 0 even when the evaluation raised: the files are the evidence
    assert done.returncode == 0, done.stderr[-4000:]
    results_files = sorted((tmp_path / "results").rglob("*_results.json"))
    samples_files = sorted((tmp_path / "results").rglob("*_samples_vidqa_micro_mc.jsonl"))
    assert len(results_files) == 1 and len(samples_files) == 1, done.stderr[-4000:]
    results = json.loads(results_files[0].read_text())
    samples = [json.loads(line) for line in samples_files[0].read_text().splitlines() if line.strip()]
    assert len(samples) == count

    batch_out = tmp_path / "batch.jsonl"
    ran = run_cli(["batch", csv_path, "-o", batch_out, "--model", checkpoint, "--device", "cpu",
                   "--frames", FRAMES, "--max-new-tokens", MAX_NEW_TOKENS, "--prune", PRESET,
                   "--keep", KEEP, *[arg for p in PARAMS for arg in ("-P", p)]])
    assert ran.exit_code == 0, ran.stderr
    records = {r["id"]: r for r in map(json.loads, batch_out.read_text().splitlines())}
    assert len(records) == count and not any(r["error"] for r in records.values())

    by_id = {ids[s["doc_id"]]: s for s in samples}  # the samples file keeps doc_id, not the doc
    assert set(by_id) == set(records)
    for doc_id, sample in by_id.items():
        record = records[doc_id]
        response = sample["filtered_resps"]
        assert (response if isinstance(response, str) else response[0]) == record["answer"], doc_id
        assert sample["accuracy"] == float(bool(record["correct"])), doc_id
        logged = sample["token_counts"][0]["vidqa"]
        assert logged["error"] is None and logged["preset"] == PRESET and logged["keep"] == KEEP
        tokens = record["stats"]["tokens"]
        assert logged["visual_tokens_before"] == tokens["visual_tokens_before"] == FRAMES * 16
        assert logged["visual_tokens_after"] == tokens["visual_tokens_after"] < logged["visual_tokens_before"]
        assert logged["layer_avg_retention"] == pytest.approx(tokens["layer_avg_retention"])
        assert logged["layer_avg_retention"] == pytest.approx(KEEP, abs=0.05)
        assert logged["flops_percent"] == pytest.approx(100 * record["stats"]["flops"]["paper_fraction"])
        assert logged["prefill_s"] > 0
        assert logged["parameters"]["overrides"] == list(PARAMS)
        assert sample["token_counts"][0]["input_tokens"] == tokens["llm_prompt_tokens"]

    accuracy = sum(bool(r["correct"]) for r in records.values()) / count
    assert results["results"]["vidqa_micro_mc"]["accuracy,none"] == pytest.approx(accuracy)
    run = results["throughput"]
    mean_retention = sum(r["stats"]["tokens"]["layer_avg_retention"] for r in records.values()) / count
    assert run["avg_vidqa_layer_avg_retention"] == pytest.approx(mean_retention)
    assert 0 < run["avg_vidqa_flops_percent"] < 100 and run["avg_vidqa_prefill_s"] > 0

    from vidqa.eval.summary import collect

    (row,) = collect([tmp_path / "results"])
    assert (row["task"], row["preset"], row["keep"], row["samples"]) == ("vidqa_micro_mc", PRESET, str(KEEP), count)
    assert row["scores"] == {"accuracy": pytest.approx(accuracy)}
    assert row["layer_avg_retention"] == pytest.approx(mean_retention)


# --- the model's arguments, without running a task ---------------------------------------------------


@needs_lmms_eval
def test_params_split_on_semicolons_and_bad_arguments_are_one_line():
    from vidqa.errors import BadInput
    from vidqa.eval.lmms_model import VidqaLMM, parse_params

    assert parse_params("select.ratio=0.3; merge.tau=0.9") == ["select.ratio=0.3", "merge.tau=0.9"]
    assert parse_params(None) == []
    with pytest.raises(BadInput, match="expected key=value"):
        parse_params("ratio")
    checkpoint = str(micro_checkpoint())
    with pytest.raises(BadInput, match="unknown argument.*framez"):
        VidqaLMM(model=checkpoint, framez=8)
    with pytest.raises(BadInput, match="--batch_size 4"):
        VidqaLMM(model=checkpoint, batch_size=4)
    with pytest.raises(BadInput, match="not a parameter"):
        VidqaLMM(model=checkpoint, prune="fastv", params="nope=1")
    with pytest.raises(BadInput, match="does not prune"):
        VidqaLMM(model=checkpoint, prune="none", keep=0.25)


@needs_lmms_eval
def test_loglikelihood_is_refused_with_the_reason():
    from vidqa.eval.lmms_model import VidqaLMM

    model = VidqaLMM(model=str(micro_checkpoint()), device="cpu", frames=8)
    with pytest.raises(NotImplementedError, match="generation only.*generate_until"):
        model.loglikelihood([])


# --- the summary, on files shaped like lmms-eval's (no lmms-eval needed) --------------------------


def _write_run(folder: Path, preset: str, retentions: dict[str, list[float]], score: float) -> None:
    folder.mkdir(parents=True)
    keep = "" if preset == "none" else ",keep=0.25"
    results = {
        "results": {"group": {"alias": "group", "acc,none": score, "acc_stderr,none": 0.01},
                    "sub_a": {"alias": " - sub_a", "acc,none": score}, "sub_b": {"alias": " - sub_b", "acc,none": score}},
        "group_subtasks": {"group": ["sub_a", "sub_b"]},
        "config": {"model_args": f"model=some/model,frames=32,prune={preset}{keep}"},
    }
    (folder / "20260101_000000_results.json").write_text(json.dumps(results))
    for task, values in retentions.items():
        lines = [json.dumps({"doc_id": i, "token_counts": [{"input_tokens": 9, "vidqa": {
            "error": None, "layer_avg_retention": r, "flops_percent": 100 * r, "prefill_s": r, "visual_tokens_after": 10}}]})
            for i, r in enumerate(values)]
        (folder / f"20260101_000000_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")


def test_summary_puts_score_next_to_cost_per_task_and_preset(tmp_path, capsys):
    from vidqa.eval import summary

    _write_run(tmp_path / "none", "none", {"sub_a": [1.0, 1.0], "sub_b": [1.0]}, 0.6)
    _write_run(tmp_path / "adatp", "adatp", {"sub_a": [0.2, 0.3], "sub_b": [0.25]}, 0.55)
    rows = {(r["task"], r["preset"]): r for r in summary.collect([tmp_path])}
    assert set(rows) == {(t, p) for t in ("group", "sub_a", "sub_b") for p in ("none", "adatp")}
    pooled = rows[("group", "adatp")]
    assert pooled["samples"] == 3 and pooled["keep"] == "0.25" and pooled["scores"] == {"acc": 0.55}
    assert pooled["layer_avg_retention"] == pytest.approx(0.25) and pooled["flops_percent"] == pytest.approx(25)
    assert rows[("sub_a", "adatp")]["layer_avg_retention"] == pytest.approx(0.25)
    assert rows[("sub_b", "none")]["keep"] is None and rows[("sub_b", "none")]["samples"] == 1
    assert summary.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["task", "preset", "keep"]
    assert table[1].split()[:5] == ["group", "none", "-", "acc", "0.6"]  # `none` first within a task
    assert summary.main([str(tmp_path / "empty")]) == 2
    (tmp_path / "empty").mkdir()
    assert summary.main([str(tmp_path / "empty")]) == 2
    assert "no *_results.json" in capsys.readouterr().err
