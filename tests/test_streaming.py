"""Long videos (issue 31): the streamed pipeline gives what the one-shot one gives, carries its
stages' state over chunk boundaries, holds bounded memory, and fits the context (--keep auto,
--max-visual-tokens, the refusal of in-LLM presets that cannot fit)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_one_line_error

from vidqa.engine import request as engine
from vidqa.models import load_model
from vidqa.models.base import has_transformers_module
from vidqa.models.llava_onevision1_5 import LlavaOnevision15Adapter
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.core.streaming import HeldTokens
from vidqa.pruning.methods.evs import TemporalChangeSelect
from vidqa.pruning.methods.vidcom2 import FrameUniquenessSelect
from vidqa.tensors.tokens import VisualTokens
from vidqa.testing.glm4v import build_tiny_glm4v
from vidqa.testing.qwen3 import build_tiny_qwen3_vl
from vidqa.testing.qwen3_5 import build_tiny_qwen3_5
from vidqa.testing.videos import moving_square_frames, write_video
from vidqa.video.decode import clip_chunks, load_clip, plan_clip

QUESTION = "what happens in this video ?"


@pytest.fixture(scope="module")
def every_family(family_checkpoints, tmp_path_factory):
    """Every streamed family's tiny checkpoint, loaded (CPU, float32). GLM-4.1V twice: with its
    processor's own clip budget, and with a --max-pixels budget that binds (112 px frames -> 56),
    so a chunk handed to the processor alone would get larger frames than the whole clip's.
    LLaVA-OneVision-1.5 only on transformers >= 5.25."""
    paths = dict(family_checkpoints)
    paths["qwen3"] = build_tiny_qwen3_vl(tmp_path_factory.mktemp("stream-qwen3"))
    paths["qwen3_5"] = build_tiny_qwen3_5(tmp_path_factory.mktemp("stream-qwen3_5"))
    paths["glm4v"] = build_tiny_glm4v(tmp_path_factory.mktemp("stream-glm4v"))
    if has_transformers_module(LlavaOnevision15Adapter.transformers_module):
        from vidqa.testing.llava_onevision1_5 import build_tiny_llava_onevision1_5

        paths["llava_ov15"] = build_tiny_llava_onevision1_5(tmp_path_factory.mktemp("stream-llava-ov15"))
    loaded = {name: load_model(str(path), device="cpu", dtype="float32") for name, path in paths.items()}
    loaded["glm4v_budget"] = load_model(str(paths["glm4v"]), device="cpu", dtype="float32", max_pixels=56 * 56)
    return loaded


STREAMED = ["llava", "qwen", "smol", "qwen3", "qwen3_5", "glm4v", "glm4v_budget", "llava_ov15"]


def family_adapter(every_family, family):
    if family not in every_family:
        pytest.skip("LLaVA-OneVision-1.5 is in transformers >= 5.25 only")
    return every_family[family]


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """A 400-frame 112 px clip (8 fps): 300 frames of tiny LLaVA-OV are 4,800 visual tokens > its 4,096 context."""
    frames = moving_square_frames(num_frames=400, size=(112, 112), end_color=(0, 0, 255))
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", frames, fps=8.0)


class FakeState:
    def __init__(self):
        self.notes, self.details = [], {}


# --- the prompt layout and the streamed request ------------------------------------------------


@pytest.mark.parametrize("family", STREAMED)
@pytest.mark.parametrize("frames", [8, 7])
def test_the_layout_is_the_one_shot_prompt_without_pixels(every_family, square_video, family, frames):
    adapter = family_adapter(every_family, family)
    full = adapter.prompt_for_clip(load_clip(square_video, num_frames=frames), QUESTION)
    plan = plan_clip(square_video, num_frames=frames)
    first = adapter.chunk_prompt(next(iter(_chunks(plan, 2))), frames)
    layout = adapter.prompt_layout(plan, QUESTION, first_chunk=first)
    assert not any(key.startswith("pixel_") for key in layout.inputs)
    for key, value in layout.inputs.items():
        assert torch.equal(value, full.inputs[key]), key
    assert torch.equal(layout.visual_index, full.visual_index)
    assert torch.equal(layout.fixed_visual_index, full.fixed_visual_index)
    # the chunks' pixels, put together, are the one-shot prompt's
    key = next(key for key in full.inputs if key.startswith("pixel_values"))
    pieces = [adapter.chunk_prompt(chunk, frames).inputs[key] for chunk in _chunks(plan, 2)]
    torch.testing.assert_close(torch.cat(pieces, dim=1 if pieces[0].dim() == 5 else 0), full.inputs[key],
                               rtol=0, atol=0)


def _chunks(clip, size):
    from vidqa.video.decode import clip_chunks

    return clip_chunks(clip, size)


def test_a_streamed_request_counts_its_decoding_once_in_the_total(every_family, square_video, monkeypatch):
    """A streamed clip is decoded inside the request: the total is the call's own time, and it
    includes the decoding once (a slow decoder, planted, makes a double count plain)."""
    import time

    from vidqa.engine import streaming

    def slow_chunks(clip, size):
        for chunk in clip_chunks(clip, size):
            time.sleep(0.2)
            yield chunk

    monkeypatch.setattr(streaming, "clip_chunks", slow_chunks)
    adapter = family_adapter(every_family, "llava")
    started = time.perf_counter()
    answer = engine.answer(adapter, plan_clip(square_video, num_frames=8), QUESTION,
                           engine.GenerationOptions(max_new_tokens=2),
                           long_video=engine.LongVideoOptions(chunk_frames=3))
    wall = time.perf_counter() - started
    times = answer.stats.time
    assert times.video_decode_s >= 0.6  # three chunks, each 0.2 s late
    assert times.video_decode_s <= times.total_s <= wall


@pytest.mark.parametrize("family", STREAMED)
@pytest.mark.parametrize("preset, keep", [("none", None), ("evs", 0.3)])
def test_streamed_equals_one_shot_for_chunks_of_1_3_and_all(every_family, square_video, family, preset, keep):
    adapter = family_adapter(every_family, family)
    frames = 6 if family == "smol" else 8
    generation = engine.GenerationOptions(max_new_tokens=4)
    reference = engine.answer(adapter, load_clip(square_video, num_frames=frames), QUESTION, generation,
                              pruner=build_pruner(load_preset(preset), adapter, keep=keep))
    planned = plan_clip(square_video, num_frames=frames)
    assert planned.planned
    for chunk in (1, 3, frames):
        streamed = engine.answer(adapter, planned, QUESTION, generation,
                                 pruner=build_pruner(load_preset(preset), adapter, keep=keep),
                                 long_video=engine.LongVideoOptions(chunk_frames=chunk))
        assert streamed.text == reference.text, chunk
        assert streamed.stats.tokens.visual_tokens_per_stage == reference.stats.tokens.visual_tokens_per_stage
        assert torch.equal(streamed.kept.row, reference.kept.row)  # the same tokens kept, in the same LLM rows
        assert torch.equal(streamed.kept.left_at_stage, reference.kept.left_at_stage)
        assert streamed.stats.tokens.llm_prompt_tokens == reference.stats.tokens.llm_prompt_tokens
        if adapter.stream_frame_multiple == 2 and chunk % 2:
            assert any(f"--chunk-frames {chunk} rounded up to {chunk + 1}" in note for note in streamed.notes)


@pytest.fixture(scope="module")
def still_then_moving(tmp_path_factory):
    """A 12-frame 112 px clip (4 fps): one picture held for 5 frames, then a new picture every
    frame, twice over (dedup keeps the first frame of each still shot and every new one)."""
    import numpy as np

    generator = np.random.default_rng(0)
    still = np.repeat(generator.integers(0, 256, (1, 112, 112, 3), dtype=np.uint8), 5, axis=0)
    moving = generator.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    frames = np.concatenate([still, moving, still[:3], moving[:1]])
    return write_video(tmp_path_factory.mktemp("still") / "still.mp4", frames, fps=4.0)


@pytest.mark.parametrize("family", STREAMED)
def test_a_frame_selector_streams_and_equals_one_shot(every_family, still_then_moving, family):
    """dedup+evs: the selection pass decides a chunk at a time (its carry over the chunks), then
    the kept frames stream: the same frames, tokens, counts and answer as one piece."""
    adapter = family_adapter(every_family, family)
    generation = engine.GenerationOptions(max_new_tokens=4)

    def pruner():
        return build_pruner(load_preset("dedup+evs"), adapter, keep=0.3)

    reference = engine.answer(adapter, load_clip(still_then_moving, num_frames=12), QUESTION, generation,
                              pruner=pruner())
    kept = reference.details["frame_selection"]["kept_frames"]
    assert 2 < len(kept) < 12  # the still shots were dropped
    for chunk in (1, 3, 12):
        streamed = engine.answer(adapter, plan_clip(still_then_moving, num_frames=12), QUESTION, generation,
                                 pruner=pruner(), long_video=engine.LongVideoOptions(chunk_frames=chunk))
        assert not any("one piece" in note for note in streamed.notes), streamed.notes
        assert streamed.details["frame_selection"] == reference.details["frame_selection"], chunk
        assert streamed.text == reference.text, chunk
        assert streamed.stats.tokens.visual_tokens_per_stage == reference.stats.tokens.visual_tokens_per_stage
        assert streamed.stats.tokens.frames == reference.stats.tokens.frames == len(kept)
        assert torch.equal(streamed.kept.row, reference.kept.row)  # provenance over the decoded clip
        assert torch.equal(streamed.kept.left_at_stage, reference.kept.left_at_stage)
        assert streamed.stats.flops.vision_encoder_macs == reference.stats.flops.vision_encoder_macs


def test_streamed_tokens_are_the_one_shot_tokens(every_family, square_video):
    """The kept rows, their sequence rows, frames and features (the encoder runs per frame)."""
    adapter = every_family["llava"]
    clip, planned = load_clip(square_video, num_frames=8), plan_clip(square_video, num_frames=8)
    stats = engine.Stats()
    pruner = build_pruner(load_preset("evs"), adapter, keep=0.3)
    _, whole, _, _ = engine.video_tokens(adapter, clip, QUESTION, pruner, stats)
    streamed_pruner = build_pruner(load_preset("evs"), adapter, keep=0.3)
    _, streamed, state, _ = engine.video_tokens(adapter, planned, QUESTION, streamed_pruner, stats,
                                                long_video=engine.LongVideoOptions(chunk_frames=3))
    assert torch.equal(streamed.seq_index, whole.seq_index)
    assert torch.equal(streamed.frame, whole.frame)
    assert torch.equal(streamed.origin, whole.origin)
    torch.testing.assert_close(streamed.features, whole.features)
    assert state.details["evs"] == {"pruning_rate": 0.7, "kept_per_frame": state.details["evs"]["kept_per_frame"]}


# --- state carried over chunk boundaries ---------------------------------------------------------


def _random_tokens(frames=7, rows=3, cols=4, hidden=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(frames * rows * cols, hidden, generator=generator)
    features[rows * cols * 2:rows * cols * 3] = features[rows * cols:rows * cols * 2]  # a frame that did not change
    return VisualTokens.from_grid(features, (frames, rows, cols), torch.arange(frames * rows * cols) + 5)


def _pieces(tokens, frames_per_chunk):
    per_frame = tokens.grid[1] * tokens.grid[2]
    step = frames_per_chunk * per_frame
    return [tokens.select(torch.arange(start, min(start + step, len(tokens)))).replace(origin=None)
            for start in range(0, len(tokens), step)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("rate", [0.5, 0.8, 0.99])
def test_evs_carries_the_previous_frame_and_its_best_tokens(chunk, rate):
    tokens = _random_tokens()
    stage = TemporalChangeSelect(pruning_rate=rate)
    whole_state, stream_state = FakeState(), FakeState()
    whole = stage.apply(tokens, whole_state)
    stream = stage.open_stream(tokens.grid, stream_state)
    for piece in _pieces(tokens, chunk):
        stream.push(piece)
        assert stream.held <= len(whole) or stream.held <= piece.grid[1] * piece.grid[2] * chunk
    streamed = stream.finish()
    assert torch.equal(streamed.seq_index, whole.seq_index)
    assert torch.equal(streamed.origin, whole.origin)
    assert torch.equal(streamed.features, whole.features)
    assert stream_state.details == whole_state.details and stream_state.notes == whole_state.notes


def test_evs_ties_go_to_the_lower_index_across_chunks():
    """Identical frames score 0 everywhere: the kept tokens are the earliest, whatever the chunks."""
    features = torch.ones(6 * 4, 3)
    tokens = VisualTokens.from_grid(features, (6, 2, 2), torch.arange(24))
    stage = TemporalChangeSelect(pruning_rate=0.5)
    stream = stage.open_stream(tokens.grid, FakeState())
    for piece in _pieces(tokens, 1):
        stream.push(piece)
    assert stream.finish().seq_index.tolist() == stage.apply(tokens, FakeState()).seq_index.tolist()


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_vidcom2_needs_the_whole_video_so_its_tokens_are_held(chunk):
    """VidCom2's channel variance, video mean and frame budgets are over every frame: it opens no
    stream, and the held chunks give it exactly the whole video."""
    tokens = _random_tokens()
    stage = FrameUniquenessSelect(ratio=0.4)
    assert stage.open_stream(tokens.grid, FakeState()) is None
    held = HeldTokens()
    for piece in _pieces(tokens, chunk):
        held.push(piece)
    whole_state, held_state = FakeState(), FakeState()
    assert torch.equal(stage.apply(held.finish(), held_state).seq_index, stage.apply(tokens, whole_state).seq_index)
    assert held_state.details == whole_state.details


def test_a_streamed_vidcom2_request_says_it_held_the_tokens(every_family, square_video):
    adapter = every_family["llava"]
    answer = engine.answer(adapter, plan_clip(square_video, num_frames=8), QUESTION,
                           engine.GenerationOptions(max_new_tokens=2),
                           pruner=build_pruner(load_preset("vidcom2"), adapter, keep=0.3),
                           long_video=engine.LongVideoOptions(chunk_frames=3))
    assert any("needs the whole video at once" in note for note in answer.notes)


# --- fitting the context -----------------------------------------------------------------------


def test_keep_auto_picks_a_fitting_retention_and_compact_positions(run_cli, tiny_llava, long_video):
    result = run_cli(["ask", long_video, QUESTION, "--model", tiny_llava, "--frames", "300", "--keep", "auto",
                      "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    fit = record["pruning"]["fit"]
    assert fit["positions"] == "compact" and record["parameters"]["positions"] == "compact"
    assert record["preset"] == "evs" and 0 < fit["keep"] < 1
    tokens = record["stats"]["tokens"]
    assert tokens["visual_tokens_before"] == 4800
    assert tokens["llm_prompt_tokens"] + 3 <= 4096  # the prompt and the answer fit the context
    assert any("--keep auto" in note and "positions=compact" in note for note in record["notes"])


def test_max_visual_tokens_caps_the_llm_input(run_cli, tiny_llava, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8", "--prune", "evs",
                      "--max-visual-tokens", "40", "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["stats"]["tokens"]["visual_tokens_after"] <= 40
    assert record["pruning"]["fit"]["positions"] == "original"  # the whole prompt fits: positions stay


def test_an_in_llm_preset_that_cannot_fit_is_one_line_naming_a_pre_llm_one(run_cli, tiny_llava, long_video):
    result = run_cli(["ask", long_video, QUESTION, "--model", tiny_llava, "--frames", "300", "--prune", "fastv",
                      "--max-new-tokens", "2"])
    assert_one_line_error(result, "fastv", "inside the LLM", "4096", "--prune evs", "positions=compact", "--keep auto")


def test_the_suggested_pre_llm_flags_really_fit(run_cli, tiny_llava, long_video):
    refused = run_cli(["ask", long_video, QUESTION, "--model", tiny_llava, "--frames", "300", "--max-new-tokens", "2"])
    assert refused.exit_code == 2
    flags = refused.stderr.split("--prune evs --keep ")[1].split()[0]
    result = run_cli(["ask", long_video, QUESTION, "--model", tiny_llava, "--frames", "300", "--prune", "evs",
                      "--keep", flags, "-P", "positions=compact", "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.stderr


def test_bad_long_video_flags_are_one_line(run_cli, tiny_llava, square_video):
    assert_one_line_error(run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--keep", "most"]),
                          "--keep", "most", "auto")
    assert_one_line_error(run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--chunk-frames", "0"]),
                          "--chunk-frames", "0")


# --- progress ------------------------------------------------------------------------------------


def test_progress_is_drawn_only_on_a_terminal_without_quiet(monkeypatch):
    from vidqa.cli import common
    from vidqa.engine.streaming import Progress

    monkeypatch.setattr(common, "interactive", lambda: False)
    with common.ProgressBar(wanted=True) as bar:  # stderr is not a terminal
        bar(Progress(1, 4, 10))
        assert bar.bar is None
    monkeypatch.setattr(common, "interactive", lambda: True)
    with common.ProgressBar(wanted=False) as bar:  # -q or --json
        bar(Progress(1, 4, 10))
        assert bar.bar is None
    with common.ProgressBar(wanted=True) as bar:
        bar(Progress(1, 4, 10))
        assert bar.bar is not None
        bar(Progress(4, 4, 12))  # the last chunk: gone before the answer streams
        assert bar.bar is None and bar.done


def test_a_streamed_cli_request_prints_no_progress_off_a_terminal(run_cli, tiny_llava, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8", "--chunk-frames", "3",
                      "--max-new-tokens", "2", "--no-stats"])
    assert result.exit_code == 0, result.stderr
    assert "frames" not in result.stderr and "tokens kept" not in result.stderr


# --- memory ----------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vidqa import api
    from vidqa.engine.stats import RequestMemory
    checkpoint, video, frames, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model = api.open_model(api.Settings(model=checkpoint, device="cpu"))
    settings = dict(prune="evs", keep=0.05, params=("positions=compact",), max_new_tokens=2, chunk_frames=chunk)
    model.ask(video, "what ?", frames=8, **settings)  # first-request set-up is not the video's
    memory = RequestMemory("cpu").start()  # decoding included
    model.ask(video, "what ?", frames=frames, **settings)
    print(json.dumps(memory.stop()[0]))
""")


def test_a_streamed_request_peaks_far_below_the_clip_in_one_piece(tiny_llava, long_video):
    """Streamed EVS over 384 frames, 16 at a time, against the same request as one 384-frame chunk
    (each in a fresh process; a ratio of memory, never a time). Measured here: ~23 MiB against
    ~135 MiB. The RSS peak of a few-MiB request moves by a few MiB with the C allocator's state
    (and the kernel's reclaim of file pages: tests/test_request_limits.py), so the bound is a ratio with room for that, not a comparison of two small streamed peaks."""
    peaks = {}
    for chunk in (16, 384):
        run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tiny_llava), str(long_video), "384", str(chunk)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[chunk] = json.loads(run.stdout.strip().splitlines()[-1])
    assert peaks[16] <= 0.4 * peaks[384], peaks


def test_a_streamed_request_holds_at_most_two_chunks_of_pixels(tiny_llava, long_video, monkeypatch):
    """What the bound rests on, counted rather than measured: at no point are more than two
    chunks' decoded frames, or two chunks' preprocessed pixels, alive (the one being worked on and
    the one being replaced), however many chunks the clip has."""
    import weakref

    from vidqa.engine import streaming

    alive = {"decoded": 0, "pixels": 0}
    most = dict(alive)

    def track(kind, array):
        alive[kind] += 1
        most[kind] = max(most[kind], alive[kind])
        weakref.finalize(array, lambda: alive.__setitem__(kind, alive[kind] - 1))

    def tracked_chunks(clip, size):
        for chunk in clip_chunks(clip, size):
            track("decoded", chunk.frames)
            yield chunk

    adapter = load_model(str(tiny_llava), device="cpu", dtype="float32")
    chunk_prompt = adapter.chunk_prompt

    def tracked_chunk_prompt(chunk, total_frames):
        prompt = chunk_prompt(chunk, total_frames)
        track("pixels", prompt.inputs["pixel_values_videos"])
        return prompt

    monkeypatch.setattr(streaming, "clip_chunks", tracked_chunks)
    monkeypatch.setattr(adapter, "chunk_prompt", tracked_chunk_prompt)
    pruner = build_pruner(load_preset("evs"), adapter, keep=0.05)
    engine.answer(adapter, plan_clip(long_video, num_frames=96), QUESTION, engine.GenerationOptions(max_new_tokens=2),
                  pruner=pruner, long_video=engine.LongVideoOptions(chunk_frames=8))
    assert most == {"decoded": 2, "pixels": 2}  # 12 chunks went through


# --- sessions (chat, batch, serve) ---------------------------------------------------------------


def test_a_session_fits_and_streams_a_long_video_once_and_answers_as_ask(tiny_llava, long_video):
    """--keep auto in a session: the first question streams the 300 frames (more than 128) and
    fits the prefix once; every question equals `ask --keep auto` and later ones reuse the prefix."""
    from vidqa import api

    model = api.open_model(api.Settings(model=str(tiny_llava), device="cpu", dtype="float32"))
    settings = model.settings.replace(frames=300, keep="auto", max_new_tokens=3)
    session = model.session(long_video, settings)
    assert session.clip.planned  # not decoded as a whole
    questions = [QUESTION, "which colour is the square ?"]
    got = [session.ask(question) for question in questions]
    expected = [model.ask(long_video, question, settings) for question in questions]
    assert [a.text for a in got] == [a.text for a in expected]
    assert [a.stats.prefix_reused for a in got] == [False, True]
    for answer, reference in zip(got, expected):
        assert answer.preset.name == reference.preset.name == "evs"
        assert answer.answer.details["fit"] == reference.answer.details["fit"]
        assert answer.record()["parameters"]["positions"] == "compact"
        assert answer.stats.tokens.llm_prompt_tokens == reference.stats.tokens.llm_prompt_tokens
    assert any("--keep auto" in note for note in got[1].answer.notes)


def test_chat_takes_keep_auto_and_max_visual_tokens(run_cli, tiny_llava, square_video):
    result = run_cli(["chat", square_video, "--model", tiny_llava, "--frames", "8", "--prune", "evs",
                      "--max-visual-tokens", "40", "--max-new-tokens", "2", "--json"],
                     input="what happens ?\nwhich colour ?\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2 and all(r["stats"]["tokens"]["visual_tokens_after"] <= 40 for r in records)
    assert records[1]["stats"]["prefix_reused"] and records[0]["pruning"]["fit"]["max_visual_tokens"] == 40
