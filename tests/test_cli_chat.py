"""`vidqa chat` end to end on the tiny LLaVA-OneVision checkpoint: piped questions, JSON lines,
history, stats, exits (EOF, empty line, Ctrl-C) and bad input."""

from __future__ import annotations

import io
import json

from conftest import assert_one_line_error

from vidqa.cli import chat as cli_chat

QUESTIONS = ["what happens in this video ?", "which colour is the square ?", "is it moving left or right ?"]


def chat(run_cli, model, video, *extra, input=""):
    return run_cli(["chat", video, "--model", model, "--frames", "8", "--max-new-tokens", "6", *extra], input=input)


def ask_quiet(run_cli, model, video, question, *extra):
    result = run_cli(["ask", video, question, "--model", model, "--frames", "8", "--max-new-tokens", "6", "-q", *extra])
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def test_piped_questions_get_the_answers_ask_gives(run_cli, tiny_llava, square_video):
    piped = "\n".join([QUESTIONS[0], "", QUESTIONS[1], QUESTIONS[2]]) + "\n"  # a blank line is skipped
    result = chat(run_cli, tiny_llava, square_video, "--prune", "evs", "--keep", "0.5", "--stats", input=piped)
    assert result.exit_code == 0, result.stderr
    expected = [ask_quiet(run_cli, tiny_llava, square_video, q, "--prune", "evs", "--keep", "0.5") for q in QUESTIONS]
    assert result.stdout.splitlines() == expected
    lines = result.stderr.splitlines()
    assert lines[0].startswith("video ready: 8 frames, 128 visual tokens → 64 (evs)") and "prefilled once" in lines[0]
    per_question = [line for line in lines if line.startswith("first token")]
    assert len(per_question) == 3 and all("with the video's prefill" in line for line in per_question)


def test_json_lines_say_the_prefix_was_reused(run_cli, tiny_llava, square_video):
    result = chat(run_cli, tiny_llava, square_video, "--json", input="\n".join(QUESTIONS) + "\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in records] == QUESTIONS
    assert all(r["stats"]["prefix_reused"] for r in records)
    saved = {r["stats"]["time"]["prefill_saved_s"] for r in records}
    assert len(saved) == 1 and saved.pop() > 0  # the same one-off prefill, saved by every question
    assert all(r["stats"]["time"]["video_prefill_s"] == 0 for r in records)
    assert records[0]["parameters"]["reuse"] is True and records[0]["parameters"]["history"] is False
    assert [r["answer"] for r in records] == [ask_quiet(run_cli, tiny_llava, square_video, q) for q in QUESTIONS]


def test_no_reuse_and_in_llm_presets_prefill_each_question(run_cli, tiny_llava, square_video):
    piped = "\n".join(QUESTIONS[:2]) + "\n"
    reused = chat(run_cli, tiny_llava, square_video, "-q", input=piped)
    full = chat(run_cli, tiny_llava, square_video, "--no-reuse", "--json", input=piped)
    assert reused.exit_code == full.exit_code == 0
    records = [json.loads(line) for line in full.stdout.splitlines()]
    assert not any(r["stats"]["prefix_reused"] for r in records)
    assert [r["answer"] for r in records] == reused.stdout.splitlines()
    fastv = chat(run_cli, tiny_llava, square_video, "--prune", "fastv", input=piped)
    assert fastv.exit_code == 0, fastv.stderr
    assert "the preset acts inside the LLM" in fastv.stderr.splitlines()[0]
    assert len(fastv.stdout.splitlines()) == 2


def test_history_is_kept_with_the_flag(run_cli, tiny_llava, square_video):
    piped = "\n".join(QUESTIONS[:2]) + "\n"
    result = chat(run_cli, tiny_llava, square_video, "--history", "--json", input=piped)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0]["parameters"]["history"] is True
    # the second question's prompt also holds the first turn
    assert records[1]["stats"]["tokens"]["llm_prompt_tokens"] > records[0]["stats"]["tokens"]["llm_prompt_tokens"]


def test_ctrl_c_exits_130(run_cli, tiny_llava, square_video, monkeypatch):
    from vidqa.engine import session

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(session.VideoSession, "ask", interrupted)
    result = chat(run_cli, tiny_llava, square_video, input=QUESTIONS[0] + "\n")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert "Traceback" not in result.stderr


def test_at_a_terminal_an_empty_line_ends(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first ?\n\nnever asked ?\n"))
    assert list(cli_chat.read_questions(interactive=True)) == ["first ?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("first ?\n\nsecond ?"))
    assert list(cli_chat.read_questions(interactive=False)) == ["first ?", "second ?"]


def test_bad_input_gets_one_line(run_cli, tiny_llava, square_video, tmp_path):
    assert_one_line_error(chat(run_cli, tiny_llava, square_video, "--keep", "2"), "--keep", "2")
    assert_one_line_error(chat(run_cli, tiny_llava, tmp_path / "missing.mp4"), "missing.mp4")
    assert_one_line_error(chat(run_cli, tiny_llava, square_video, "--prune", "nosuch"), "nosuch")
