"""Honest stats (issue 13 §4): the peak memory is the request's own, above the loaded model, and a
prompt past the model's context is a one-line error, never a silent run."""

from __future__ import annotations

import gc
import json
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from vidqa.engine import request as engine
from vidqa.engine import stats
from vidqa.engine.stats import RequestMemory
from vidqa.models import load_model
from vidqa.video.decode import load_clip

QUESTION = "what happens in this video ?"
MIB = 2**20


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def touch(megabytes: int) -> np.ndarray:
    """An array whose pages are all resident."""
    return np.ones(megabytes * MIB // 8)


# --- peak memory ---------------------------------------------------------------------------


def test_cpu_peak_is_the_requests_own_high_water():
    gc.collect()  # earlier tests' garbage freed now, not mid-measure
    held = touch(64)  # in use before the request: not the request's
    memory = RequestMemory("cpu").start()
    block = touch(96)
    del block  # freed before the end: the peak still counts it
    above, total, kind = memory.stop()
    assert kind == "rss"  # Linux with /proc/self/clear_refs (this machine)
    assert above >= 90 * MIB
    assert total >= above + 60 * MIB  # the total includes what was held before
    quiet = RequestMemory("cpu").start()
    assert quiet.stop()[0] < 32 * MIB  # nothing allocated: no load peak reported as the request's
    del held


def test_cpu_peak_falls_back_to_sampling_where_the_counter_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(stats, "_reset_rss_high_water", lambda: False)
    # earlier tests' garbage collected now, not mid-measure: freeing it would shrink the RSS under the block
    gc.collect()
    memory = RequestMemory("cpu").start()
    block = touch(96)
    holding = resident_bytes()  # the RSS with the block resident
    for _ in range(1000):  # hold the block until the sampler has seen it (no timing assumption)
        if memory._sampled_peak >= holding:
            break
        time.sleep(0.01)
    del block
    above, total, kind = memory.stop()
    assert kind == "rss-sampled" and total >= holding  # the sampler saw the block, freed before the end
    assert above >= 90 * MIB
    assert memory._sampler is None


def test_without_proc_the_kind_says_it_is_the_process_peak(monkeypatch):
    monkeypatch.setattr(stats, "_proc_status_kib", lambda name: None)
    above, total, kind = RequestMemory("cpu").start().stop()
    assert kind == "rss-process" and above >= 0 and total > 0


def test_cuda_peak_subtracts_what_was_allocated_before(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 1600)
    assert RequestMemory(torch.device("cuda", 0)).start().stop() == (600, 1600, "cuda")
    assert calls == ["reset"]


def test_the_engine_reports_memory_the_request_allocates(tiny_llava, square_video, monkeypatch):
    adapter = load_model(str(tiny_llava), device="cpu", dtype="float32")
    clip = load_clip(square_video, num_frames=4)
    encode = adapter.encode_video
    blocks = []

    def encode_with_a_big_buffer(prompt):
        blocks.append(touch(128))
        return encode(prompt)

    monkeypatch.setattr(adapter, "encode_video", encode_with_a_big_buffer)
    result = engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=2))
    assert result.stats.peak_memory_kind == "rss"
    assert result.stats.peak_memory_bytes >= 120 * MIB
    assert result.stats.peak_memory_total_bytes > result.stats.peak_memory_bytes


def test_json_and_table_say_what_the_peak_is(run_cli, tiny_llava, square_video):
    args = ["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "4", "--max-new-tokens", "2"]
    record = json.loads(run_cli(args + ["--json"]).stdout)["stats"]
    assert record["peak_memory_kind"] == "rss"
    assert 0 <= record["peak_memory_bytes"] < record["peak_memory_total_bytes"]
    table = run_cli(args + ["--stats"]).stderr
    assert "peak RSS of the request" in table and "above the model" in table and "peak RSS in all" in table


# --- the model's context ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_length(tiny_llava, square_video):
    adapter = load_model(str(tiny_llava), device="cpu", dtype="float32")
    clip = load_clip(square_video, num_frames=8)
    return adapter.build_prompt(clip.frames, clip.timestamps, QUESTION).length


def with_context(tiny_llava, tmp_path, limit: int) -> str:
    """A copy of the tiny checkpoint whose LLM reads at most `limit` positions."""
    path = tmp_path / f"context-{limit}"
    shutil.copytree(tiny_llava, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = limit
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def ask(run_cli, model, video, *extra, question=QUESTION):
    return run_cli(["ask", video, question, "--model", model, "--frames", "8", "--max-new-tokens", "4", *extra])


def test_a_prompt_past_the_context_is_one_line_naming_tokens_limit_and_remedy(
        run_cli, tiny_llava, square_video, tmp_path, prompt_length):
    limit = prompt_length - 5
    model = with_context(tiny_llava, tmp_path, limit)
    for preset in ("none", "fastv"):  # pruning inside the LLM does not shorten the prompt
        result = ask(run_cli, model, square_video, "--prune", preset)
        assert_one_line_error(result, f"the prompt is {prompt_length} tokens", f"context of {limit}",
                              "--frames 7", "--prune evs --keep 0.", "-P positions=compact")
        assert result.stdout == ""


def test_the_suggested_flags_make_the_prompt_fit(run_cli, tiny_llava, square_video, tmp_path, prompt_length):
    """The remedies are the request's own numbers: each one suggested is run, and fits."""
    model = with_context(tiny_llava, tmp_path, prompt_length - 40)
    line = ask(run_cli, model, square_video).stderr
    remedies = line.split("; use ", 1)[1].strip().split(" or ")
    assert len(remedies) == 3 and remedies[-1] == "--keep auto", line  # --keep auto: issue 31
    for remedy in remedies:
        fitted = run_cli(["ask", square_video, QUESTION, "--model", model, "--max-new-tokens", "4",
                          *(["--frames", "8"] if "--frames" not in remedy else []), *remedy.split(), "--json"])
        assert fitted.exit_code == 0, (remedy, fitted.stderr)
        assert not any("past the model's context" in note for note in json.loads(fitted.stdout)["notes"]), remedy


def test_pruning_before_the_llm_counts_with_compact_positions_only(
        run_cli, tiny_llava, square_video, tmp_path, prompt_length):
    model = with_context(tiny_llava, tmp_path, prompt_length - 5)
    compact = ask(run_cli, model, square_video, "--prune", "prunevid", "--json")  # prunevid: positions compact
    assert compact.exit_code == 0, compact.stderr
    tokens = json.loads(compact.stdout)["stats"]["tokens"]
    assert tokens["prompt_tokens"] == prompt_length and tokens["llm_prompt_tokens"] < prompt_length - 5
    original = ask(run_cli, model, square_video, "--prune", "prunevid", "-P", "positions=original")
    assert_one_line_error(original, f"the prompt is {prompt_length} tokens", "after pruning before the LLM",
                          f"positions up to {prompt_length - 1}", "use -P positions=compact")


def test_an_answer_that_may_run_past_the_context_gets_a_note(
        run_cli, tiny_llava, square_video, tmp_path, prompt_length):
    model = with_context(tiny_llava, tmp_path, prompt_length + 2)
    result = ask(run_cli, model, square_video, "--json")
    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any(f"past the model's context of {prompt_length + 2} tokens after 2 new tokens" in note for note in notes)


def test_a_very_long_question_is_refused(run_cli, tiny_llava, square_video):
    """The issue's case: a question longer than the context (the tiny model reads 4,096 positions)."""
    question = " ".join(["square"] * 4200)
    result = ask(run_cli, tiny_llava, square_video, question=question)
    assert_one_line_error(result, "more than the model's context of 4096")
