"""`vidqa ask` end to end on a tiny random LLaVA-OneVision checkpoint and generated videos."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error

from vidqa import flops
from vidqa.testing.videos import moving_square_frames, write_video

QUESTION = "what happens in this video ?"


def ask(run_cli, model, video, *extra, question=QUESTION, input=None):
    args = ["ask", video] + ([question] if question is not None else [])
    return run_cli(args + ["--model", model, "--frames", "8", "--max-new-tokens", "6", *extra], input=input)


def test_json_record_has_answer_and_consistent_stats(run_cli, tiny_llava, square_video):
    result = ask(run_cli, tiny_llava, square_video, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert set(record) == {"schema", "answer", "model", "preset", "parameters", "stats", "pruning", "kept", "notes"}
    assert record["answer"]
    assert record["preset"] == "none"
    assert record["parameters"]["frames"] == 8
    tokens = record["stats"]["tokens"]
    assert tokens["frames"] == 8
    assert tokens["visual_tokens_before"] == 8 * 16  # 4x4 pooled tokens per 112 px frame
    assert tokens["visual_tokens_after"] == tokens["visual_tokens_before"]
    assert tokens["visual_tokens_per_layer"] == [128] * 4
    assert tokens["layer_avg_retention"] == 1.0
    # the prompt holds the 128 frame tokens + the image_newline token + the text
    assert tokens["llm_prompt_tokens"] == tokens["prompt_tokens"] > 129
    assert 1 <= tokens["generated_tokens"] <= 6
    times = record["stats"]["time"]
    assert all(times[key] >= 0 for key in times)
    assert times["prefill_s"] > 0 and times["total_s"] >= times["prefill_s"]
    fl = record["stats"]["flops"]
    assert fl["paper_fraction"] == 1.0
    shape = flops.LLMShape(num_layers=4, hidden=64, intermediate=128, num_heads=4, num_kv_heads=2, head_dim=16)
    assert fl["paper_vanilla_macs"] == flops.visual_prefill_macs(shape, [128] * 4)
    assert fl["prompt_prefill_macs"] > fl["paper_vanilla_macs"]
    assert fl["vision_encoder_macs"] > 0
    # the request's own peak above the loaded model may be 0 (memory freed earlier is reused)
    assert 0 <= record["stats"]["peak_memory_bytes"] < record["stats"]["peak_memory_total_bytes"]


def test_streamed_plain_and_quiet_answers_agree(run_cli, tiny_llava, square_video):
    streamed = ask(run_cli, tiny_llava, square_video, "--no-stats")
    plain = ask(run_cli, tiny_llava, square_video, "--no-stream", "--no-stats")
    quiet = ask(run_cli, tiny_llava, square_video, "-q")
    as_json = json.loads(ask(run_cli, tiny_llava, square_video, "--json").stdout)
    assert streamed.exit_code == plain.exit_code == quiet.exit_code == 0
    assert streamed.stdout.strip() == plain.stdout.strip() == quiet.stdout.strip() == as_json["answer"]
    assert quiet.stderr.strip() == ""


def test_stats_table_goes_to_stderr(run_cli, tiny_llava, square_video):
    result = ask(run_cli, tiny_llava, square_video, "--stats")
    assert result.exit_code == 0
    assert "visual tokens" in result.stderr and "paper convention" in result.stderr
    assert "visual tokens" not in result.stdout


def test_question_from_stdin_only_without_an_argument(run_cli, tiny_llava, square_video):
    from_stdin = ask(run_cli, tiny_llava, square_video, "--json", question=None, input=QUESTION)
    from_dash = ask(run_cli, tiny_llava, square_video, "--json", question="-", input=QUESTION)
    from_arg = ask(run_cli, tiny_llava, square_video, "--json")
    assert from_stdin.exit_code == from_dash.exit_code == 0, from_stdin.stderr + from_dash.stderr
    answer = json.loads(from_arg.stdout)["answer"]
    assert json.loads(from_stdin.stdout)["answer"] == json.loads(from_dash.stdout)["answer"] == answer
    # an argument wins: piped input is left alone (a `while read` loop keeps the rest of its list)
    with_arg = ask(run_cli, tiny_llava, square_video, "--json", input="what happens\nnext line")
    assert with_arg.exit_code == 0
    record, expected = json.loads(with_arg.stdout), json.loads(from_arg.stdout)
    assert record["answer"] == answer
    assert record["stats"]["tokens"]["prompt_tokens"] == expected["stats"]["tokens"]["prompt_tokens"]


def test_greedy_is_deterministic_and_the_video_matters(run_cli, tiny_llava, square_video, tmp_path):
    first = ask(run_cli, tiny_llava, square_video, "-q").stdout
    assert ask(run_cli, tiny_llava, square_video, "-q").stdout == first
    other = write_video(tmp_path / "other.mp4", moving_square_frames(num_frames=24, size=(112, 112), seed=3,
                                                                     color=(0, 255, 0), background=(200, 200, 0)))
    assert ask(run_cli, tiny_llava, other, "-q").stdout != first


def test_fps_and_window_sampling(run_cli, tiny_llava, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--fps", "2", "--start", "1",
                      "--end", "3", "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["tokens"]["frames"] == 4


def test_more_frames_than_the_video_has_are_clamped_with_a_note(run_cli, tiny_llava, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "40",
                      "--max-new-tokens", "2", "--no-stats"])
    assert result.exit_code == 0
    assert "using 24" in result.stderr
    as_json = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "40",
                       "--max-new-tokens", "2", "--json"])
    record = json.loads(as_json.stdout)
    assert record["stats"]["tokens"]["frames"] == 24
    assert any("using 24" in note for note in record["notes"])


def test_bfloat16_on_cpu(run_cli, tiny_llava, square_video):
    result = ask(run_cli, tiny_llava, square_video, "--dtype", "bfloat16", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["parameters"]["dtype"] == "bfloat16"


# --- bad input: one line, the bad value, non-zero exit, no traceback ---------------------------


def test_missing_video(run_cli, tiny_llava, tmp_path):
    assert_one_line_error(ask(run_cli, tiny_llava, tmp_path / "nope.mp4"), "nope.mp4")


@pytest.mark.parametrize("content", [b"this is not a video\n", b""], ids=["text-file", "zero-length"])
def test_file_that_is_not_a_video(run_cli, tiny_llava, tmp_path, content):
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(content)
    assert_one_line_error(ask(run_cli, tiny_llava, fake), "fake.mp4")


def test_truncated_video(run_cli, tiny_llava, square_video, tmp_path):
    cut = tmp_path / "cut.mp4"
    data = square_video.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    assert_one_line_error(ask(run_cli, tiny_llava, cut), "cut.mp4")


def test_zero_frames(run_cli, tiny_llava, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "0"])
    assert_one_line_error(result, "--frames", "0")


def test_empty_question(run_cli, tiny_llava, square_video):
    assert_one_line_error(ask(run_cli, tiny_llava, square_video, question="  "), "question")


def test_start_past_the_end(run_cli, tiny_llava, square_video):
    assert_one_line_error(ask(run_cli, tiny_llava, square_video, "--start", "60"), "--start", "60")


def test_unknown_model_id_offline(run_cli, square_video):
    # HF_HUB_OFFLINE is set (conftest) and nothing is cached: the model cannot load (exit 1)
    result = ask(run_cli, "nobody/no-such-model", square_video)
    assert_one_line_error(result, "nobody/no-such-model", "HF_HUB_OFFLINE", "--model micro", exit_code=1)


def test_directory_that_is_not_a_checkpoint(run_cli, square_video, tmp_path):
    assert_one_line_error(ask(run_cli, str(tmp_path), square_video), str(tmp_path), "not a model checkpoint")


def test_bad_generation_options(run_cli, tiny_llava, square_video):
    assert_one_line_error(ask(run_cli, tiny_llava, square_video, "--max-new-tokens", "0"), "--max-new-tokens")
    assert_one_line_error(ask(run_cli, tiny_llava, square_video, "--temperature", "-1"), "--temperature")


def test_help_documents_exit_codes(run_cli):
    result = run_cli(["ask", "--help"])
    assert result.exit_code == 0
    assert "Exit codes" in result.stdout and "bad input" in result.stdout
