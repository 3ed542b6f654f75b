"""The first five minutes: the README's first command (the bundled micro model on samples/), life
without the hub, the version, one-line option errors, Ctrl-C, a full disk, `vidqa models`."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from helpers import default_sigint

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FIRST_QUESTION = "Which way does the square move?"  # the README's first command asks this of square.mp4


def vidqa_process(*args, env_extra=None, drop=(), **popen):
    """`python -m vidqa ARGS` from the repository root, with a clean environment."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "vidqa", *map(str, args)], cwd=REPO, env=env,
                            stdout=popen.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE, text=True, **popen)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# --- the bundled model and the samples ---------------------------------------------------------


def test_readme_first_command_answers_right(run_cli):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = f'vidqa ask samples/square.mp4 "{FIRST_QUESTION}" --model micro'
    assert command in readme  # the README's first command is the one tested here
    result = run_cli(["ask", SAMPLES / "square.mp4", FIRST_QUESTION, "--model", "micro"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "right"
    assert "note" not in result.stderr  # 8 frames of an 8-frame clip: nothing to warn about


def test_micro_answers_the_sample_questions(run_cli, tmp_path):
    rows = list(csv.DictReader((SAMPLES / "questions.csv").open(encoding="utf-8")))
    assert len(rows) >= 15 and all(row["expected"] for row in rows)
    output = tmp_path / "samples.jsonl"
    result = run_cli(["batch", SAMPLES / "questions.csv", "-o", output, "--model", "micro", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == len(rows)
    wrong = [(r["id"], r["expected"], r["answer"]) for r in records if r["correct"] is not True]
    assert len(wrong) <= 1, wrong  # (near) 100%; the committed checkpoint gets all of them
    assert all(r["parameters"]["frames"] == 8 for r in records)  # micro's own clip length


def test_samples_match_the_micro_world():
    """questions.csv's ground truth is the world's, for the clips make_samples.py draws."""
    sys.path.insert(0, str(SAMPLES))
    try:
        import make_samples
    finally:
        sys.path.remove(str(SAMPLES))
    rows = list(csv.DictReader((SAMPLES / "questions.csv").open(encoding="utf-8")))
    for name, wanted in make_samples.WANTED.items():
        _, clip = make_samples.find_clip(wanted)
        mine = {row["question"]: row["expected"] for row in rows if row["video"] == name}
        from microworld import world

        assert mine == {world.QUESTIONS[kind]: answer for kind, answer in clip.answers.items()}


def test_micro_is_packaged_and_listed(run_cli):
    from vidqa.micro import CHECKPOINT

    assert (CHECKPOINT / "model.safetensors").is_file() and (CHECKPOINT / "config.json").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"vidqa.micro" = ["checkpoint/*"' in pyproject  # (then the SmolLM2 model's smol_checkpoint/*)
    assert not (REPO / "benchmarks" / "micro" / "checkpoint").exists()  # one copy
    listing = run_cli(["models"])
    assert listing.exit_code == 0 and "--model micro" in listing.stdout
    # checkpoint ids are whole on their lines, never cut mid-word
    assert "  HuggingFaceTB/SmolVLM2-256M-Video-Instruct\n" in listing.stdout
    rows = json.loads(run_cli(["models", "--json"]).stdout)
    assert next(r for r in rows if r["family"] == "LLaVA-OneVision")["bundled"] == ["micro"]


# --- without the hub ---------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_hub_fails_fast_in_one_line(tmp_path):
    """HF_HUB_OFFLINE unset, HF_ENDPOINT pointing at a closed port: one line, exit 1, no retries."""
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    process = vidqa_process("ask", SAMPLES / "square.mp4", FIRST_QUESTION, env_extra=env,
                            drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "cannot be reached" in lines[0] and "--model micro" in lines[0] and "llava-onevision" in lines[0]
    assert "Retry" not in err and ".." not in lines[0] and out == ""


def test_offline_without_the_model_cached_suggests_micro(tmp_path):
    process = vidqa_process("ask", SAMPLES / "square.mp4", FIRST_QUESTION,
                            env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1
    lines = error_lines(err)
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and "--model micro" in lines[0], err
    assert ".." not in lines[0]


@pytest.fixture
def online(monkeypatch):
    """This process as if HF_HUB_OFFLINE were unset, talking to `endpoint`."""
    from huggingface_hub import constants

    def use(endpoint: str) -> None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)

    return use


def test_a_hub_that_never_answers_is_a_timeout_not_a_hang(run_cli, online, monkeypatch, square_video):
    from vidqa import hub

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        online(f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.5)
        result = run_cli(["ask", square_video, "what ?", "--model", "someone/some-model"])
    assert_one_line_error(result, "someone/some-model", "no answer within 0.5 s", "--model micro", exit_code=1)


def test_a_cached_model_loads_without_the_hub(run_cli, online, monkeypatch, tiny_llava, square_video, tmp_path):
    """Unreachable hub + the checkpoint in the local cache: it loads from the cache, no request."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llava, snapshot)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    online(f"http://127.0.0.1:{_closed_port()}")
    result = run_cli(["ask", square_video, "what ?", "--model", "someone/tiny", "--frames", "4",
                      "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "someone/tiny"


def test_models_load_without_hub_kernels(monkeypatch, tiny_llava):
    """transformers >= 5.25 kernelizes by default: on a GPU it fetches RMSNorm, activation and RoPE
    kernels from the hub (an offline machine waits, then falls back), and the layers would rotate keys
    with other code than the pruning hooks rotate queries with. vidqa asks for none, on every version
    (docs/models.md, "Hub kernels"); on 5.25 the CPU load here would otherwise leave use_kernels True."""
    from transformers import AutoModelForImageTextToText

    from vidqa.models import load_model

    load = AutoModelForImageTextToText.from_pretrained
    asked = []

    def recording(*args, **kwargs):
        asked.append(kwargs.get("use_kernels"))
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", recording)
    adapter = load_model(str(tiny_llava), device="cpu")
    assert asked == [False]
    assert not adapter.model.use_kernels


# --- the command line itself -------------------------------------------------------------------


def test_version(run_cli):
    from vidqa import __version__

    result = run_cli(["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"vidqa {__version__}"


@pytest.mark.parametrize("args, fragments", [
    (["ask", "clip.mp4", "q", "--keep", "abc"], ["--keep", "abc"]),
    (["ask", "clip.mp4", "q", "--dtype", "float64"], ["--dtype", "float64"]),
    (["batch", "q.csv", "--frames", "many"], ["--frames", "many"]),
    (["ask", "clip.mp4", "q", "--no-such-option"], ["--no-such-option"]),
    (["ask"], ["video"]),
], ids=["keep", "dtype", "batch-frames", "unknown-option", "missing-argument"])
def test_option_errors_are_one_line(run_cli, args, fragments):
    result = run_cli(args)
    assert_one_line_error(result, *fragments, exit_code=2)
    assert "--help" in result.stderr and "╭" not in result.stderr


def test_help_has_no_type_column_on_flags(run_cli):
    for command in (["ask", "--help"], ["batch", "--help"]):
        result = run_cli(command)
        assert result.exit_code == 0
        assert "<bool>" not in result.stdout and "--quiet" in result.stdout
    assert "-p, --prune" in run_cli(["batch", "--help"]).stdout  # batch has ask's -p


# What the `vidqa` console script runs, with a marker on stderr once vidqa.entry (a few lines, no
# imports of its own) is in: the signal then lands in the seconds of imports that main() guards.
# (The interpreter's own startup before that is Python's, not vidqa's.)
CONSOLE_SCRIPT = ("import sys; from vidqa.entry import main; sys.stderr.write('started\\n'); sys.stderr.flush(); "
                  "sys.argv[0] = 'vidqa'; main()")


@pytest.mark.parametrize("delay", [0.0, 4.0], ids=["during-imports", "later"])
def test_ctrl_c_exits_130_quietly(delay):
    process = subprocess.Popen(
        [sys.executable, "-c", CONSOLE_SCRIPT, "ask", str(SAMPLES / "square.mp4"), FIRST_QUESTION, "--model", "micro"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert process.stderr.readline() == "started\n"
    time.sleep(delay)  # 0: while `from .cli import main` imports typer, torch, transformers
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the answer came before the signal (a very fast machine)")
    if process.returncode == -signal.SIGINT:
        # The signal landed after Python restored SIGINT's default action in its own shutdown
        # (the last ~0.8 s of torch teardown): killed by SIGINT, which a shell reports as 130 too.
        # Only acceptable once the answer is out.
        assert out.strip(), f"killed by SIGINT before answering: {err}"
    else:
        assert process.returncode == 130, err
    assert "Traceback" not in err and len(error_lines(err)) <= 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_ask_json_on_a_full_disk_names_the_file():
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        process = vidqa_process("ask", SAMPLES / "square.mp4", FIRST_QUESTION, "--model", "micro", "--json",
                                stdout=full)
        _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    lines = error_lines(err)
    assert len(lines) == 1 and "/dev/full" in lines[0] and "free space, then rerun" in lines[0], err
    assert "internal error" not in err


def test_batch_on_a_full_disk_says_how_to_resume(run_cli, monkeypatch, tmp_path):
    from vidqa.batch import store as batch_store

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch_store.os, "fsync", no_space)
    output = tmp_path / "results.jsonl"
    result = run_cli(["batch", SAMPLES / "questions.csv", "-o", output, "--model", "micro", "--max-new-tokens", "4"])
    assert_one_line_error(result, str(output), "free space, then rerun to resume", exit_code=1)


# --- batch records: one meaning of `answer` ---------------------------------------------------


def test_old_answer_column_and_old_results_still_work(run_cli, tmp_path):
    old_csv = tmp_path / "old.csv"
    old_csv.write_text("id,video,question,answer\n"
                       f"d,{SAMPLES / 'square.mp4'},{FIRST_QUESTION},right\n"
                       f"c,{SAMPLES / 'square.mp4'},what colour is the square at the start ?,red\n")
    output = tmp_path / "results.jsonl"
    # a schema-1 results file holding row d: ground truth in `answer`, the model's in `prediction`
    old = {"schema": 1, "id": "d", "video": str(SAMPLES / "square.mp4"), "question": FIRST_QUESTION, "options": None,
           "answer": "right", "prediction": "right", "correct": True, "preset": "none", "keep": None, "error": None,
           "model": "micro", "parameters": {"frames": 8}, "stats": None, "pruning": {}, "notes": []}
    output.write_text(json.dumps(old) + "\n")
    result = run_cli(["batch", old_csv, "-o", output, "--model", "micro", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.stderr
    assert "'answer' as the ground truth" in result.stderr and "resuming: 1 of 2" in result.stderr
    records = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert set(records) == {"d", "c"}
    for record in records.values():  # both in today's layout, the old one rewritten
        assert "prediction" not in record and record["schema"] == 2
    assert (records["d"]["expected"], records["d"]["answer"]) == ("right", "right")
    assert (records["c"]["expected"], records["c"]["answer"], records["c"]["correct"]) == ("red", "red", True)


def test_expected_and_answer_columns_together_are_refused(run_cli, tmp_path):
    both = tmp_path / "both.csv"
    both.write_text("video,question,expected,answer\nx.mp4,q,a,b\n")
    assert_one_line_error(run_cli(["batch", both, "-o", tmp_path / "r.jsonl", "--model", "micro"]),
                          "'expected'", "'answer'")


def test_summary_shows_the_retention_a_preset_reached():
    from rich.console import Console

    from vidqa.batch.summary import summarize, summary_table

    def record(preset, keep, retention):
        return {"id": "1", "preset": preset, "keep": keep, "answer": "a", "expected": "a", "correct": True,
                "error": None, "options": None,
                "stats": {"tokens": {"visual_tokens_after": 10, "layer_avg_retention": retention},
                          "flops": {"paper_fraction": retention}, "time": {"prefill_s": 0.1, "total_s": 0.2}}}

    rows = summarize([record("none", None, 1.0), record("adatp", 0.5, 0.189), record("fastv", 0.3, 0.3)])
    assert [row["keep_reached"] for row in rows] == [None, False, True]
    console = Console(width=200, record=True)
    console.print(summary_table(rows))
    text = console.export_text()
    assert "0.5→0.19" in text and "0.3→" not in text


def test_a_model_the_hub_does_not_have_is_bad_input(tmp_path):
    """The hub says "no such repository" (401 + X-Error-Code RepoNotFound, as huggingface.co does):
    exit 2 (an unknown model), one line."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NoSuchRepository(BaseHTTPRequestHandler):
        def _answer(self):
            body = b'{"error": "Repository not found"}'
            self.send_response(401)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepository)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path / "hf")}
    try:  # a subprocess: transformers reads HF_HUB_OFFLINE once, at import
        process = vidqa_process("ask", SAMPLES / "square.mp4", FIRST_QUESTION, "--model", "nobody/no-such-model",
                                env_extra=env, drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        _, err = process.communicate(timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert process.returncode == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "nobody/no-such-model" in lines[0], err
    assert "not found on the Hugging Face hub" in lines[0] and "--model micro" in lines[0] and ".." not in lines[0]
