"""The micro model's synthetic world and training script (vidqa.micro)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from microworld import world
from microworld.model import build_processor
from microworld.train import answer_labels, evaluate, frames_for_step, main, text_batch, video_batch


def _colour_counts(frame: np.ndarray) -> Counter:
    packed = frame.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    codes, counts = np.unique(packed, return_counts=True)
    return Counter({(int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255): int(n) for c, n in zip(codes, counts)})


def test_same_seed_same_clip_other_seed_other_clip():
    a, b = world.heldout_clip(3), world.heldout_clip(3)
    assert np.array_equal(a.frames, b.frames) and a.answers == b.answers
    c = world.make_clip(np.random.default_rng(7), 8)
    d = world.make_clip(np.random.default_rng(7), 8)
    assert np.array_equal(c.frames, d.frames) and c.answers == d.answers
    others = [world.heldout_clip(i) for i in range(4, 8)]
    assert not any(np.array_equal(a.frames, o.frames) for o in others)
    assert not np.array_equal(world.heldout_clip(3, seed=world.HELDOUT_SEED + 1).frames, a.frames)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (8, 112, 112, 3)


def test_answers_are_balanced():
    clips = world.heldout_clips(800)  # expected count per answer >= 200; bounds are ~4 sigma
    for kind, options in world.ANSWERS.items():
        counts = Counter(c.answers[kind] for c in clips)
        assert set(counts) == set(options), (kind, counts)
        expected = len(clips) / len(options)
        for option in options:
            assert 0.75 * expected <= counts[option] <= 1.25 * expected, (kind, counts)
    # the square's and background's start and end colours agree about half the time
    for key in ("square_colours", "background_colours"):
        same = sum(getattr(c, key)[0] == getattr(c, key)[1] for c in clips)
        assert 0.4 <= same / len(clips) <= 0.6, (key, same)


@pytest.mark.parametrize("num_frames", [1, 2, 4, 8])
def test_the_evidence_is_where_the_answers_say(num_frames):
    squares = {v: k for k, v in world.SQUARE_COLOURS.items()}
    backgrounds = {v: k for k, v in world.BACKGROUND_COLOURS.items()}
    rng = np.random.default_rng(11)
    for _ in range(60):
        clip = world.make_clip(rng, num_frames)
        frames, answers = clip.frames, clip.answers
        seen_squares, seen_backgrounds, white = [], [], []
        for t, frame in enumerate(frames):
            counts = _colour_counts(frame)
            # the background is the most common colour; exactly one square colour, one square
            seen_backgrounds.append(backgrounds[counts.most_common(1)[0][0]])
            present = [squares[c] for c in counts if c in squares]
            assert len(present) == 1, present
            seen_squares.append(present[0])
            x0, y0, x1, y1 = clip.square_boxes[t]
            side = x1 - x0
            assert world.SQUARE_SIDE[0] <= side <= world.SQUARE_SIDE[1] and y1 - y0 == side
            assert counts[world.SQUARE_COLOURS[present[0]]] == side * side  # never occluded
            assert (frame[y0:y1, x0:x1] == world.SQUARE_COLOURS[present[0]]).all()
            white.append(counts.get(world.CIRCLE_COLOUR, 0))
        assert seen_squares[0] == answers["square_start"] and seen_squares[-1] == answers["square_end"]
        assert seen_backgrounds[0] == answers["background_start"] and seen_backgrounds[-1] == answers["background_end"]
        # at most one change each, in the middle part of the clip
        for seen, change in ((seen_squares, clip.square_change), (seen_backgrounds, clip.background_change)):
            switches = [t for t in range(1, len(seen)) if seen[t] != seen[t - 1]]
            assert switches == ([] if change is None else [change])
            if change is not None:
                margin = max(1, round(num_frames / 4))
                assert margin <= change <= num_frames - margin
        # the circle is white pixels in exactly its frames, a full disc (not hidden by the square)
        assert [t for t, n in enumerate(white) if n] == list(clip.circle_frames)
        assert answers["circle"] == ("yes" if clip.circle_frames else "no")
        if clip.circle_frames:
            assert white[clip.circle_frames[0]] > 0.9 * np.pi * clip.circle[2] ** 2
        if num_frames == 1:
            assert "direction" not in answers and "background_change" not in answers
            continue
        assert answers["background_change"] == ("yes" if seen_backgrounds[0] != seen_backgrounds[-1] else "no")
        # direction: the square's pixels move that way, from near one edge to near the other
        centres = [(b[0] + b[2]) / 2 for b in clip.square_boxes], [(b[1] + b[3]) / 2 for b in clip.square_boxes]
        dx, dy = centres[0][-1] - centres[0][0], centres[1][-1] - centres[1][0]
        expected = {"right": (dx > 0, dy == 0), "left": (dx < 0, dy == 0), "down": (dy > 0, dx == 0), "up": (dy < 0, dx == 0)}
        assert all(expected[answers["direction"]]), (answers["direction"], dx, dy)
        assert max(abs(dx), abs(dy)) >= 112 - world.SQUARE_SIDE[1] - 2 * world.EDGE_MARGIN


@pytest.mark.parametrize("num_frames", [1, 8])
def test_the_square_is_at_the_edge_the_aux_answers_name(num_frames):
    rng = np.random.default_rng(5)
    for _ in range(100):
        clip = world.make_clip(rng, num_frames)
        for kind, t in (("square_where_start", 0), ("square_where_end", -1)):
            x0, y0, x1, y1 = clip.square_boxes[t]
            gaps = {"left": x0, "right": 112 - x1, "top": y0, "bottom": 112 - y1}
            edge = clip.aux_answers[kind]
            assert gaps[edge] <= world.EDGE_MARGIN
            assert all(gap >= world.ACROSS_MARGIN for name, gap in gaps.items() if name != edge
                       and {name, edge} not in ({"left", "right"}, {"top", "bottom"}))
    counts = Counter(world.heldout_clip(i).aux_answers["square_where_start"] for i in range(400))
    assert set(counts) == set(world.EDGES) and min(counts.values()) >= 70


def test_questions_and_answers_are_in_the_vocabulary():
    tokenizer = build_processor().tokenizer
    unk = tokenizer.unk_token_id
    for question in world.ALL_QUESTIONS.values():
        assert unk not in tokenizer(question)["input_ids"], question
    for options in (world.ANSWERS | world.AUX_ANSWERS).values():
        for answer in options:
            assert tokenizer(answer)["input_ids"] not in ([unk], []) and len(tokenizer(answer)["input_ids"]) == 1


def test_training_chats_ask_one_question_per_group():
    rng = np.random.default_rng(0)
    by_question = {q: k for k, q in world.ALL_QUESTIONS.items()}
    for num_frames in (1, 8):
        for _ in range(100):
            clip = world.make_clip(rng, num_frames)
            turns = world.training_chat(clip, rng)
            kinds = [by_question[q] for q, _ in turns]
            groups = [next(i for i, g in enumerate(world.GROUPS) if k in g) for k in kinds]
            assert len(groups) == len(set(groups)) == 4
            truth = clip.answers | clip.aux_answers
            assert all(answer == truth[kind] for kind, (_, answer) in zip(kinds, turns))
            if num_frames == 1:
                assert not {"direction", "background_change"} & set(kinds)


def test_batches_put_the_loss_on_the_answers_only():
    processor = build_processor()
    tokenizer = processor.tokenizer
    rng = np.random.default_rng(0)
    inputs = video_batch(rng, 3, 4, processor)
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    assert inputs["pixel_values_videos"].shape == (3, 4, 3, 112, 112)
    assert ((inputs["input_ids"] == video_id).sum(1) == 4 * 16 + 1).all()
    answers = {a for options in (world.ANSWERS | world.AUX_ANSWERS).values() for a in options}
    for ids, labels in zip(inputs["input_ids"], inputs["labels"]):
        kept = tokenizer.convert_ids_to_tokens(ids[labels != -100])
        assert kept[1::2] == ["<|im_end|>"] * (len(kept) // 2) and set(kept[0::2]) <= answers
        assert len(kept) == 8  # 4 turns x (answer + <|im_end|>)
    text = text_batch(rng, 2, processor)
    for ids, labels in zip(text["input_ids"], text["labels"]):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        kept = [t for t, lab in zip(tokens, labels) if lab != -100]
        before_question = [tokens[i - 1] for i, t in enumerate(tokens) if t == "?"]
        assert kept[0::2] == before_question and kept[1::2] == ["<|im_end|>"] * 4
    ids = torch.tensor([tokenizer.convert_tokens_to_ids("<|im_start|> assistant red <|im_end|> red".split())])
    assert answer_labels(ids, tokenizer).tolist() == [[-100, -100, ids[0, 2].item(), ids[0, 3].item(), -100]]


def test_curriculum_and_text_mixing():
    """Text-only steps first, then 1 -> 2 -> 4 -> 8 frames; --mix-text adds text batches later,
    and at its default of 0 it draws nothing, so the committed seed-0 run stays reproducible."""
    def schedule(mix_text, seed=0):
        rng = np.random.default_rng(seed)
        return [frames_for_step(step, 3900, 300, rng, mix_text) for step in range(3900)], rng.random()

    plain, after_plain = schedule(0.0)
    assert set(plain[:300]) == {0} and 0 not in plain[300:]
    assert plain[300] == 1 and plain[1300] == 2 and plain[1700] == 4 and Counter(plain[2100:])[8] > 1000
    assert after_plain == schedule(0.0)[1]  # deterministic
    # before the 8-frame phase (step 2,028) the default recipe draws no random number at all
    rng = np.random.default_rng(7)
    for step in range(2028):
        frames_for_step(step, 3900, 300, rng, 0.0)
    assert rng.random() == np.random.default_rng(7).random()
    mixed, _ = schedule(0.25)
    text_share = mixed[300:].count(0) / 3600
    assert 0.2 < text_share < 0.3
    assert set(mixed[:300]) == {0}


def test_mix_text_outside_0_1_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "ckpt"), "--mix-text", "1.5"])
    assert exit_info.value.code == 2
    assert "--mix-text 1.5" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_training_smoke_saves_a_loadable_fp16_checkpoint(tmp_path, run_cli):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "micro"
    code = main(["--out", str(out), "--seed", "0", "--steps", "6", "--batch", "2", "--text-steps", "1",
                 "--warmup", "2", "--eval-every", "3", "--eval-clips", "1", "--final-eval-clips", "2",
                 "--log-every", "2", "--threads", "0"])  # 0: leave torch threads alone
    assert code == 0
    summary = json.loads((out / "micro_train.json").read_text())
    assert summary["steps"] == 6 and summary["parameters"] > 1_000_000
    assert set(summary["final_eval"]["accuracy"]) == set(world.QUESTION_TYPES) | {"overall"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert processor.tokenizer.convert_tokens_to_ids("circle") != processor.tokenizer.unk_token_id
    # the mp4 path the CLI takes: write, decode, ask
    result = evaluate(n_clips=2, model=model.eval(), processor=processor, from_mp4=True, question_types=("circle",))
    assert 0.0 <= result["circle"] <= 1.0
    video = world.write_clip(tmp_path / "clip.mp4", world.heldout_clip(0))
    asked = run_cli(["ask", video, world.QUESTIONS["circle"], "--model", out, "--frames", "8",
                     "--max-new-tokens", "2", "--json"])
    assert asked.exit_code == 0, asked.stderr
    assert json.loads(asked.stdout)["stats"]["tokens"]["visual_tokens_before"] == 128


def test_written_clips_decode_close_to_the_generated_frames(tmp_path):
    from vidqa.video.decode import load_clip

    clip = world.heldout_clip(5)
    decoded = load_clip(world.write_clip(tmp_path / "c.mp4", clip), num_frames=8).frames
    assert decoded.shape == clip.frames.shape
    assert np.abs(decoded.astype(int) - clip.frames.astype(int)).mean() < 6
