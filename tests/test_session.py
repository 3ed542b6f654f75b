"""Reusing a video's prefill across questions (vidqa/engine/session.py): token-identical answers on
every family, for `none` and pre-LLM presets (1-D positions original and compact, Qwen M-RoPE),
with and without conversation history; in-LLM presets fall back to full prefills."""

from __future__ import annotations

import pytest
import torch

from vidqa.engine import request as engine
from vidqa.engine.session import VideoSession, prefix_reusable
from vidqa.pruning.core.presets import build_pruner, load_preset

QUESTIONS = ["what happens in this video ?", "which colour is the square ?", "is it moving left or right ?"]
GENERATION = engine.GenerationOptions(max_new_tokens=8)
# (family, preset, keep): none and EVS (original positions) everywhere; VidCom2 compacts the
# positions (positions: compact), which matters for 1-D RoPE
CASES = [(family, preset, keep) for family in ("llava", "qwen", "smol") for preset, keep in (("none", None), ("evs", 0.5))]
CASES.append(("llava", "vidcom2", 0.5))
# VisionZip and FastVID rank tokens by vision-encoder attention: the session must ask the encoder
# for it, as engine.answer does (a session that encoded without it failed every question)
CASES += [(family, preset, 0.3) for family in ("llava", "qwen", "smol") for preset in ("visionzip", "fastvid")]


def pruner_for(adapter, preset, keep):
    return build_pruner(load_preset(preset), adapter, keep=keep)


@pytest.mark.parametrize("family,preset,keep", CASES)
def test_reused_prefix_answers_are_token_identical(family_adapters, family_clips, family, preset, keep):
    adapter, clip = family_adapters[family], family_clips[family]
    pruner = pruner_for(adapter, preset, keep)
    expected = [engine.answer(adapter, clip, q, GENERATION, pruner=pruner) for q in QUESTIONS]
    session = VideoSession(adapter, clip, pruner, GENERATION)
    got = [session.ask(q) for q in QUESTIONS]
    assert [a.text for a in got] == [a.text for a in expected]
    assert [a.stats.tokens.generated_tokens for a in got] == [a.stats.tokens.generated_tokens for a in expected]
    # the first question pays the video's prefill; the others start from its cache
    assert [a.stats.prefix_reused for a in got] == [False, True, True]
    first = got[0].stats.time
    assert first.video_prefill_s > 0 and first.prefill_saved_s == 0
    for later in got[1:]:
        assert later.stats.time.video_prefill_s == 0 and later.stats.time.prefill_saved_s == first.video_prefill_s
        assert later.stats.time.vision_encoder_s == 0  # encoded once
    # the same token counts as the full run (what the LLM processed is unchanged)
    assert got[1].stats.tokens.visual_tokens_per_layer == expected[1].stats.tokens.visual_tokens_per_layer
    assert got[1].stats.tokens.llm_prompt_tokens == expected[1].stats.tokens.llm_prompt_tokens


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_prepare_prefills_before_the_first_question(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    session = VideoSession(adapter, clip, generation=GENERATION)
    cost = session.prepare()
    assert cost.time.video_prefill_s > 0 and cost.tokens.visual_tokens_after == cost.tokens.visual_tokens_before
    answers = [session.ask(q) for q in QUESTIONS[:2]]
    assert all(a.stats.prefix_reused for a in answers)
    assert [a.text for a in answers] == [engine.answer(adapter, clip, q, GENERATION).text for q in QUESTIONS[:2]]


@pytest.mark.parametrize("family", ["llava", "qwen", "smol"])
def test_history_matches_the_multi_turn_prompt(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    pruner = pruner_for(adapter, "evs", 0.5)
    session = VideoSession(adapter, clip, pruner, GENERATION, history=True)
    turns = []
    for question in QUESTIONS[:2]:
        expected = engine.answer(adapter, clip, question, GENERATION, pruner=pruner, history=tuple(turns))
        got = session.ask(question)
        assert got.text == expected.text
        turns.append((question, expected.text))
    assert session.turns == turns
    assert got.stats.prefix_reused and got.stats.tokens.llm_prompt_tokens == expected.stats.tokens.llm_prompt_tokens


def test_history_prompt_holds_the_earlier_turns(family_adapters, family_clips):
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, "is it red ?", history=(("what colour ?", "blue"),))
    assert prompt.text.index("what colour ?") < prompt.text.index("blue") < prompt.text.index("is it red ?")
    assert prompt.text.count("<|im_start|>user") == 2 and prompt.text.count("<|im_start|>assistant") == 2


def test_in_llm_presets_are_not_reused_but_answer_the_same(family_adapters, family_clips):
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    pruner = pruner_for(adapter, "fastv", None)
    assert not prefix_reusable(pruner) and prefix_reusable(pruner_for(adapter, "evs", 0.5))
    session = VideoSession(adapter, clip, pruner, GENERATION)
    got = [session.ask(q) for q in QUESTIONS[:2]]
    assert [a.text for a in got] == [engine.answer(adapter, clip, q, GENERATION, pruner=pruner).text for q in QUESTIONS[:2]]
    assert not any(a.stats.prefix_reused for a in got)
    assert got[1].stats.time.vision_encoder_s < got[0].stats.time.vision_encoder_s  # still encoded once


def test_a_different_prefix_is_prefilled_in_full(family_adapters, family_clips):
    """If a prompt's prefix rows ever differ from the cached ones, the cache is not used."""
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    session = VideoSession(adapter, clip, generation=GENERATION)
    session.ask(QUESTIONS[0])
    session.prefix.ids = session.prefix.ids.clone()
    session.prefix.ids[0, 0] += 1  # as if the system prompt had changed
    got = session.ask(QUESTIONS[1])
    assert not got.stats.prefix_reused and any("differs" in note for note in got.notes)
    assert got.text == engine.answer(adapter, clip, QUESTIONS[1], GENERATION).text


def test_the_cached_prefix_is_never_written(family_adapters, family_clips):
    adapter, clip = family_adapters["qwen"], family_clips["qwen"]
    session = VideoSession(adapter, clip, generation=GENERATION)
    session.prepare()
    cache = session.prefix.cache
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    for question in QUESTIONS:
        session.ask(question)
    cache.crop(-(cache.get_seq_length() - session.prefix.ids.shape[1]))
    for layer, (keys, values) in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_batch_rows_sharing_a_video_reuse_its_prefix(run_cli, tiny_llava, square_video, tmp_path):
    """`vidqa batch`: per video and configuration the first row prefills the video, the others
    reuse it; in-LLM presets never do; the predictions equal `vidqa ask`'s."""
    import json

    (tmp_path / "square.mp4").write_bytes(square_video.read_bytes())
    (tmp_path / "q.csv").write_text("id,video,question\n" + "".join(
        f"q{i},square.mp4,{q}\n" for i, q in enumerate(QUESTIONS)), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    fast = ["--model", tiny_llava, "--frames", "8", "--max-new-tokens", "6"]
    result = run_cli(["batch", tmp_path / "q.csv", "-o", output, "--prune", "none,evs,fastv", "--keep", "0.5", *fast])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert not any(r["error"] for r in records)
    by_preset = {}
    for record in records:
        by_preset.setdefault(record["preset"], []).append(record)
    for preset in ("none", "evs"):
        rows = sorted(by_preset[preset], key=lambda r: r["id"])
        assert [r["stats"]["prefix_reused"] for r in rows] == [False, True, True]
        paid = rows[0]["stats"]["time"]["video_prefill_s"]
        assert paid > 0 and all(r["stats"]["time"]["prefill_saved_s"] == paid for r in rows[1:])
    assert not any(r["stats"]["prefix_reused"] for r in by_preset["fastv"])
    for record in records:
        extra = [] if record["preset"] == "none" else ["--prune", record["preset"], "--keep", "0.5"]
        asked = run_cli(["ask", tmp_path / "square.mp4", record["question"], *fast, "-q", *extra])
        assert asked.stdout.strip() == record["answer"], record["id"]


def test_a_cached_encoding_without_vision_attention_is_redone_for_a_preset_that_reads_it(family_adapters, family_clips):
    """batch shares one encoding per clip across presets: `none` encodes first, without the
    encoder attention VisionZip reads; VisionZip's session must encode again, not fail."""
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    shared: dict = {}
    VideoSession(adapter, clip, pruner_for(adapter, "none", None), GENERATION, encoded_cache=shared).ask(QUESTIONS[0])
    assert "vision_attention" not in shared[id(clip)].meta
    pruner = pruner_for(adapter, "visionzip", 0.3)
    got = VideoSession(adapter, clip, pruner, GENERATION, encoded_cache=shared).ask(QUESTIONS[0])
    assert "vision_attention" in shared[id(clip)].meta
    assert got.text == engine.answer(adapter, clip, QUESTIONS[0], GENERATION, pruner=pruner).text


def test_a_pre_llm_stage_that_reads_the_question_is_not_reused(family_adapters):
    from dataclasses import fields
    from dataclasses import replace as replace_field

    pruner = pruner_for(family_adapters["llava"], "evs", 0.5)
    name, stage = pruner.preset.before_llm[0]

    class TextGuided(type(stage)):
        reads_question = True

    guided = TextGuided(**{f.name: getattr(stage, f.name) for f in fields(stage)})
    pruner.preset = replace_field(pruner.preset, stages=((name, guided),))
    assert not prefix_reusable(pruner)


# --- later questions cost only their text (the prompt layout, no pixels preprocessed again) ----------


@pytest.fixture(scope="module")
def streamed_adapters(family_adapters, tmp_path_factory):
    """Every family whose prompt layout is tested (`streams`) and whose cache a session reuses: the
    three family models, Qwen3-VL, GLM-4.1V and (transformers >= 5.25) LLaVA-OneVision-1.5."""
    from vidqa.models import base, load_model
    from vidqa.models.llava_onevision1_5 import LlavaOnevision15Adapter
    from vidqa.testing.glm4v import build_tiny_glm4v
    from vidqa.testing.qwen3 import build_tiny_qwen3_vl

    builders = {"qwen3": build_tiny_qwen3_vl, "glm4v": build_tiny_glm4v}
    if base.has_transformers_module(LlavaOnevision15Adapter.transformers_module):
        from vidqa.testing.llava_onevision1_5 import build_tiny_llava_onevision1_5

        builders["llava_ov15"] = build_tiny_llava_onevision1_5
    loaded = {name: load_model(str(build(tmp_path_factory.mktemp(f"session-{name}"))), device="cpu", dtype="float32")
              for name, build in builders.items()}
    return {**family_adapters, **loaded}


# Qwen3.5 is left out: its linear-attention cache cannot be cropped, so it reuses no prefix at all
STREAMED = ["llava", "qwen", "smol", "qwen3", "glm4v", "llava_ov15"]


def frame_side(video) -> int:
    """The largest side of the frames a video processor call received (nested lists: their first video)."""
    while isinstance(video, (list, tuple)):
        video = video[0]
    return max(int(size) for size in video.shape[-3:])


@pytest.mark.parametrize("family", STREAMED)
def test_later_questions_preprocess_no_pixels_and_give_the_full_prompts_inputs(streamed_adapters, square_video,
                                                                                family, monkeypatch):
    from vidqa.video.decode import load_clip

    if family not in streamed_adapters:
        pytest.skip("LLaVA-OneVision-1.5 is in transformers >= 5.25 only")
    adapter = streamed_adapters[family]
    assert adapter.streams
    clip = load_clip(square_video, num_frames=6 if family == "smol" else 8)
    pruner = pruner_for(adapter, "evs", 0.5)
    session = VideoSession(adapter, clip, pruner, engine.GenerationOptions(max_new_tokens=3), history=True)
    video_processor = adapter.processor.video_processor
    calls = []
    preprocess = video_processor.preprocess

    def counted(videos, *args, **kwargs):
        calls.append(frame_side(videos))
        return preprocess(videos, *args, **kwargs)

    monkeypatch.setattr(video_processor, "preprocess", counted)
    first = session.ask(QUESTIONS[0])
    assert calls and max(calls) >= 64  # the first question preprocessed the real frames
    del calls[:]
    turns = [(QUESTIONS[0], first.text)]
    for question in QUESTIONS[1:]:
        got = session.ask(question)
        assert calls and max(calls) <= 32, calls  # blank stand-ins of at most one merged token a side
        del calls[:]
        expected = engine.answer(adapter, clip, question, session.generation, pruner=pruner, history=tuple(turns))
        del calls[:]
        assert got.text == expected.text and got.stats.prefix_reused
        assert got.stats.tokens.llm_prompt_tokens == expected.stats.tokens.llm_prompt_tokens
        turns.append((question, got.text))
    # the later prompt: the full prompt's ids, rows, positions (only stand-in frames preprocessed)
    question, history = "is the square red ?", tuple(turns)
    later = session.question_prompt(question, history)
    full = adapter.prompt_for_clip(session.clip, question, history=history)
    for key, value in later.inputs.items():
        assert torch.equal(value, full.inputs[key]), key
    assert torch.equal(later.visual_index, full.visual_index)
    tokens = session.prefix.tokens
    later_inputs = adapter.generation_inputs(later, tokens, positions=session.pruner.positions)
    full_inputs = adapter.generation_inputs(full, tokens, positions=session.pruner.positions)
    for key in ("input_ids", "position_ids"):
        assert torch.equal(later_inputs.kwargs[key], full_inputs.kwargs[key]), key
    assert torch.equal(later_inputs.visual_rows, full_inputs.visual_rows)
