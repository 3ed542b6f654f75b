"""The dense world (microworld.dense): every question's evidence is where the question type says,
the answers are uniform, and a seed fixes the clips. No checkpoint needed."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from microworld import dense, world

SMALL = dense.DenseSize(8, 4)  # 112 px, the tightest layout
SIZES = (SMALL, dense.REDUCED, dense.FULL)
WORLD_CLIP_0_SHA256 = "94e57f6e3b383b7e0d76128f686031801dfee618f23ddfb47ba6f1ce3ee40bd7"


def _clips(size, n, seed=11):
    rng = np.random.default_rng(seed)
    return [dense.make_clip(rng, size) for _ in range(n)]


def _mask(shape, box):
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _disc(size, cx, cy, r):
    ys, xs = np.mgrid[0:size, 0:size]
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


def _diamond(size, cx, cy, r):
    ys, xs = np.mgrid[0:size, 0:size]
    return np.abs(xs - cx) + np.abs(ys - cy) <= r


def _shows(frame, mask, rgb) -> bool:
    return bool((frame[mask] == rgb).all())


def test_sizes_give_the_token_counts_the_benchmark_names():
    assert (dense.FULL.frames, dense.FULL.tokens_per_frame, dense.FULL.visual_tokens, dense.FULL.size) == (32, 64, 2048, 224)
    assert (dense.REDUCED.frames, dense.REDUCED.tokens_per_frame, dense.REDUCED.size) == (16, 36, 168)
    clip = dense.heldout_clip(0, dense.REDUCED)
    assert clip.frames.shape == (16, 168, 168, 3) and clip.frames.dtype == np.uint8
    with pytest.raises(ValueError, match="frames"):
        dense.DenseSize(4, 8)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s.frames}x{s.tokens_per_frame}")
def test_each_event_is_drawn_whole_in_its_frames_and_nowhere_else(size):
    for clip in _clips(size, 25):
        T, px = clip.num_frames, size.size
        flash = _diamond(px, *clip.flash)
        flash_rgb = world.FLASH_COLOURS[clip.answers["flash"]]
        ball = _disc(px, *clip.ball)
        light = _mask((px, px), clip.light_box)
        corner = _mask((px, px), clip.corner_box)
        corner_rgb = world.FLASH_COLOURS[clip.answers["corner_start"]]
        for t in range(T):
            frame = clip.frames[t]
            assert _shows(frame, flash, flash_rgb) == (t in clip.flash_frames)
            assert _shows(frame, ball, dense.BALL_COLOUR) == (t in clip.ball_frames)
            assert _shows(frame, light, dense.LIGHT_ON if t in clip.blink_frames else dense.LIGHT_OFF)
            assert _shows(frame, corner, corner_rgb) == (t == 0)
            # nothing covers the square, whose colour is the start colour until the change
            x0, y0, x1, y1 = clip.square_boxes[t]
            changed = clip.square_change is not None and t >= clip.square_change
            colour = clip.answers["square_end" if changed else "square_start"]
            assert (frame[y0:y1, x0:x1] == world.SQUARE_COLOURS[colour]).all()
        # the ball's colour, the flash's and the light's on colour appear nowhere else
        for rgb, mask, frames in ((dense.BALL_COLOUR, ball, clip.ball_frames),
                                  (dense.LIGHT_ON, light, clip.blink_frames)):
            found = (clip.frames == rgb).all(-1)
            found[list(frames)] &= ~mask
            assert not found.any()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s.frames}x{s.tokens_per_frame}")
def test_evidence_sits_where_each_question_type_claims(size):
    for clip in _clips(size, 60):
        T, px = clip.num_frames, size.size
        # the middle event: 1-2 consecutive frames inside the middle half
        frames = clip.flash_frames
        assert 1 <= len(frames) <= 2 and list(frames) == list(range(frames[0], frames[-1] + 1))
        assert T // 4 <= frames[0] and frames[-1] < T - T // 4
        # the object in one region of a few frames: near the middle of the edge it names
        assert 2 <= len(clip.ball_frames) <= max(2, T // 8)
        cx, cy, _ = clip.ball
        distance = {"left": cx, "right": px - 1 - cx, "top": cy, "bottom": px - 1 - cy}
        assert distance[clip.answers["ball"]] <= px // 4
        across = cy if clip.answers["ball"] in ("left", "right") else cx
        assert px / 3 <= across <= px - px / 3
        # counting: one to four single-frame blinks, never two in a row, the count in words
        blinks = clip.blink_frames
        assert dense.COUNT_WORDS[len(blinks) - 1] == clip.answers["blinks"]
        assert all(b - a >= 2 for a, b in itertools.pairwise(blinks))
        lit = [t for t in range(T) if _shows(clip.frames[t], _mask((px, px), clip.light_box), dense.LIGHT_ON)]
        assert tuple(lit) == blinks
        # order: the one named first ends before the other begins
        first, second = ((clip.flash_frames, clip.ball_frames) if clip.answers["order"] == "flash"
                         else (clip.ball_frames, clip.flash_frames))
        assert first[-1] < second[0]
        # motion and the start / end questions: the world's rules
        assert clip.aux_answers["square_where_start"] == world.START_EDGE[clip.answers["direction"]]
        starts = clip.square_boxes[0][:2], clip.square_boxes[-1][:2]
        axis = 0 if clip.answers["direction"] in ("left", "right") else 1
        assert (starts[1][axis] > starts[0][axis]) == (clip.answers["direction"] in ("right", "down"))
        assert (clip.answers["background_change"] == "yes") == (clip.background_change is not None)


def test_the_backgrounds_named_are_the_first_and_last_frames_backgrounds():
    for clip in _clips(dense.REDUCED, 40):
        for t, kind in ((0, "background_start"), (-1, "background_end")):
            frame = clip.frames[t]
            colours, counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)
            assert tuple(colours[np.argmax(counts)]) == world.BACKGROUND_COLOURS[clip.answers[kind]]


def test_answers_are_uniform_and_the_same_story_at_every_size():
    clips = {size: dense.heldout_clips(400, size) for size in (dense.DenseSize(16, 4), dense.REDUCED)}
    small, reduced = clips.values()
    for kind, options in dense.DENSE_ANSWERS.items():
        counts = Counter(c.answers[kind] for c in reduced)
        assert set(counts) == set(options), kind
        expected = 400 / len(options)
        assert all(0.7 * expected <= counts[o] <= 1.3 * expected for o in options), (kind, counts)
    # the answers are drawn before any place, so a 16-frame clip tells the same story at any grid
    assert [c.answers for c in small] == [c.answers for c in reduced]


def test_a_seed_fixes_the_clips_and_training_draws_from_another_stream():
    a, b = dense.heldout_clip(5, dense.REDUCED), dense.heldout_clip(5, dense.REDUCED)
    assert np.array_equal(a.frames, b.frames) and a.answers == b.answers
    other = dense.heldout_clip(5, dense.REDUCED, seed=7)
    assert not np.array_equal(a.frames, other.frames)
    assert not np.array_equal(a.frames, dense.heldout_clip(6, dense.REDUCED).frames)
    training = dense.make_clip(np.random.default_rng(np.random.SeedSequence(0, spawn_key=(1, 0))), dense.REDUCED)
    assert not any(np.array_equal(training.frames, dense.heldout_clip(i, dense.REDUCED).frames) for i in range(20))


def test_a_training_chat_asks_one_question_of_each_group():
    clip = dense.heldout_clip(0, dense.REDUCED)
    turns = dense.training_chat(clip, np.random.default_rng(0))
    assert len(turns) == len(dense.DENSE_GROUPS)
    answers = {**clip.answers, **clip.aux_answers}
    asked = {question: answer for question, answer in turns}
    for group in dense.DENSE_GROUPS:
        chosen = [k for k in group if dense.TRAINING_QUESTIONS[k] in asked]
        assert len(chosen) == 1 and asked[dense.TRAINING_QUESTIONS[chosen[0]]] == answers[chosen[0]]
    # over many chats every evaluated type is asked
    rng = np.random.default_rng(1)
    seen = {q for _ in range(60) for q, _ in dense.training_chat(clip, rng)}
    assert set(dense.DENSE_QUESTIONS.values()) <= seen


def test_the_smol_worlds_clips_are_unchanged():
    """The dense world sits beside world.py without changing its clips: the committed SmolLM2
    checkpoint and its accuracy figures were made on these (SHA-256 of held-out clip 0's pixels)."""
    import hashlib

    clip = world.heldout_clip(0, extras=True)
    assert hashlib.sha256(clip.frames.tobytes()).hexdigest() == WORLD_CLIP_0_SHA256


def test_the_held_out_folder_and_the_oracle_read_the_dense_world(load_script, tmp_path):
    """benchmarks/micro: `--world dense` writes the dense clips and questions, and the oracle
    selection sees the ball and the light in the dense frame's cells."""
    acc = load_script("benchmarks/micro/accuracy.py")
    size = dense.DenseSize(8, 5)
    csv_path = acc.heldout.generate(tmp_path, clips=[0, 3], dense_size=size)
    rows = acc.heldout.read_questions(csv_path)
    assert len(rows) == 2 * len(dense.DENSE_QUESTION_TYPES)
    clip = dense.heldout_clip(3, size)
    row = next(r for r in rows if r["id"] == "c0003-blinks")
    assert (row["question"], row["expected"]) == (dense.DENSE_QUESTIONS["blinks"], clip.answers["blinks"])
    manifest = acc.heldout.read_manifest(tmp_path)
    assert (manifest["world"], manifest["size"], manifest["frames"]) == ("dense", size.size, size.frames)
    truth = manifest["clips"][3]
    _, small = acc.cell_coverage(truth, (size.frames, size.grid, size.grid))
    x0, y0, x1, y1 = clip.light_box
    light_cell = ((y0 + y1) // 2 // dense.CELL, (x0 + x1) // 2 // dense.CELL)
    assert all(small[t][light_cell] > 0 for t in range(size.frames))  # the light, every frame
    t = clip.ball_frames[0]
    ball_cell = (clip.ball[1] // dense.CELL, clip.ball[0] // dense.CELL)
    assert small[t][ball_cell] > 0
    assert acc.world_types("dense") == list(dense.DENSE_QUESTION_TYPES)
    assert acc.selection_tasks([0.25], num_tokens=size.visual_tokens)[0] == ("start-only", 100, 0.5)


def test_a_changed_dense_world_rewrites_the_held_out_clips(load_script, tmp_path, monkeypatch):
    """The manifest keys a dense folder by a digest of clip 0's pixels: the same world reuses its
    clips, a world drawn differently (here a bigger light) rewrites them."""
    acc = load_script("benchmarks/micro/accuracy.py")
    size = dense.DenseSize(8, 5)
    acc.heldout.generate(tmp_path, clips=[0], dense_size=size)
    video = tmp_path / "clips" / "c0000.mp4"
    first = (video.stat().st_mtime_ns, acc.heldout.read_manifest(tmp_path)["world_digest"])
    acc.heldout.generate(tmp_path, clips=[0], dense_size=size)
    assert (video.stat().st_mtime_ns, acc.heldout.read_manifest(tmp_path)["world_digest"]) == first
    monkeypatch.setattr(dense, "LIGHT_SIDE", dense.LIGHT_SIDE - 4)
    acc.heldout.generate(tmp_path, clips=[0], dense_size=size)
    manifest = acc.heldout.read_manifest(tmp_path)
    assert manifest["world_digest"] != first[1] and video.stat().st_mtime_ns != first[0]
    assert manifest["clips"][0]["light_box"] == list(dense.heldout_clip(0, size).light_box)


def test_the_prunevid_analysis_reads_the_cells_a_ball_covers(load_script):
    """benchmarks/micro/prunevid_static.py checks the token cells under the ball: one cell for a
    ball inside it, both for one across a cell edge (28 px cells, 6 a row)."""
    analysis = load_script("benchmarks/micro/prunevid_static.py")
    assert analysis.disc_cells(42, 42, 10, dense.CELL, 6) == {7}
    assert analysis.disc_cells(28, 10, 10, dense.CELL, 6) == {0, 1}
    assert analysis.disc_cells(56, 56, 12, dense.CELL, 6) == {7, 8, 13, 14}


def test_the_end_bias_analysis_splits_answers_by_the_events_half(load_script):
    """benchmarks/micro/event_halves.py: an event wholly before the middle frame is in the first
    half, wholly from it on in the second, else across; records count under their clip's truth."""
    analysis = load_script("benchmarks/micro/event_halves.py")
    assert analysis.clip_half((6, 7), 16) == "first half"
    assert analysis.clip_half((8, 9), 16) == "second half"
    assert analysis.clip_half((7, 8), 16) == "across"
    truth = dense.heldout_clip(0, dense.REDUCED)
    rows = [{"id": "c0000-ball", "preset": "fastv", "keep": 0.25, "correct": True, "error": None},
            {"id": "c0000-flash", "preset": "fastv", "keep": 0.25, "correct": False, "error": None},
            {"id": "c0000-order", "preset": "fastv", "keep": 0.25, "correct": True, "error": None},
            {"id": "c0000-ball", "preset": "dycoke", "keep": 0.25, "correct": False, "error": "unreachable"}]
    counts = analysis.tally(rows, dense.REDUCED)
    ball = analysis.clip_half(truth.ball_frames, 16)
    flash = analysis.clip_half(truth.flash_frames, 16)
    cells = counts[("fastv", 0.25)]
    assert cells[("ball", ball)] == [1, 1] and cells[("flash", flash)] == [0, 1]
    assert sum(n for _, n in cells.values()) == 2 and ("dycoke", 0.25) not in counts


def test_the_answer_probe_reads_a_planted_answer_and_not_noise(load_script):
    """benchmarks/micro/answer_probe.py's probe: features that carry each answer along a direction
    of its own score far above chance on the held-out half; features without it score near chance."""
    pytest.importorskip("sklearn")
    analysis = load_script("benchmarks/micro/answer_probe.py")
    rng = np.random.default_rng(0)
    answers = rng.integers(0, 4, size=400)
    noise = rng.normal(size=(400, 32))
    planted = noise.copy()
    planted[np.arange(400), answers] += 3.0  # answer j raises feature j
    assert analysis.held_out_accuracy(planted, answers) > 0.8
    assert analysis.held_out_accuracy(noise, answers) < 0.4


def test_the_light_stepping_stones_answer_from_the_frames():
    """Where the light is = the edge nearest its centre; its colour at the start / end = the pixels
    of frame 0 / T-1; "more than n" = the lit frames counted in the pixels."""
    for size in (SMALL, dense.REDUCED):
        px, T = size.size, size.frames
        for clip in _clips(size, 30, seed=4):
            light = _mask((px, px), clip.light_box)
            lit = [t for t in range(T) if _shows(clip.frames[t], light, dense.LIGHT_ON)]
            answers = clip.aux_answers
            assert answers["light_start"] == ("white" if 0 in lit else "grey")
            assert answers["light_end"] == ("white" if T - 1 in lit else "grey")
            for n in (1, 2, 3):
                assert answers[f"light_more_than_{n}"] == ("yes" if len(lit) > n else "no")
            ys, xs = np.nonzero(light)
            cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
            nearest = {"left": cx, "right": px - cx, "top": cy, "bottom": px - cy}
            assert nearest[answers["light_where"]] == min(nearest.values())
    # every stone's answers all occur
    counts = Counter((k, a) for c in dense.heldout_clips(200, dense.REDUCED) for k, a in c.aux_answers.items())
    options = {"light_where": set(world.EDGES), "light_start": {"grey", "white"}, "light_end": {"grey", "white"},
               **{f"light_more_than_{n}": {"yes", "no"} for n in (1, 2, 3)}}
    assert set(options) == set(dense.LIGHT_STONES)
    for stone, expected in options.items():
        assert {a for (k, a) in counts if k == stone} == expected, stone


def test_a_chat_with_the_light_stones_asks_one_of_each_extra_group_too():
    clip = dense.heldout_clip(2, dense.REDUCED)
    groups = dense.DENSE_GROUPS + dense.LIGHT_STONE_GROUPS
    turns = dense.training_chat(clip, np.random.default_rng(0), groups)
    asked = dict(turns)
    answers = {**clip.answers, **clip.aux_answers}
    assert len(turns) == len(groups)
    for group in groups:
        chosen = [k for k in group if dense.TRAINING_QUESTIONS[k] in asked]
        assert len(chosen) == 1 and asked[dense.TRAINING_QUESTIONS[chosen[0]]] == answers[chosen[0]]
    # the stones never enter the evaluated set, and a chat without them draws as before
    assert not set(dense.LIGHT_STONES) & set(dense.DENSE_QUESTIONS)
    assert dense.training_chat(clip, np.random.default_rng(0)) == dense.training_chat(
        clip, np.random.default_rng(0), dense.DENSE_GROUPS)


def test_frame_budget_sorts_frames_by_what_changes_and_counts_a_clip_once(load_script):
    """benchmarks/micro/frame_budget.py: a frame is an event frame while the flash or the ball is
    shown or the frame after, else a light frame the same way for a blink, else the background's
    or the square's colour change, else motion; a clip's tokens count once however many of its
    questions are read, and an event is 'seen' when any token of its own frames is kept."""
    analysis = load_script("benchmarks/micro/frame_budget.py")
    for index in range(12):
        clip = dense.heldout_clip(index, dense.REDUCED)
        shown = set(clip.flash_frames) | set(clip.ball_frames)
        for t, kind in enumerate(analysis.frame_kinds(clip), start=1):
            assert (kind == "event") == (t in shown or t - 1 in shown)
            if kind == "light":
                assert t in clip.blink_frames or t - 1 in clip.blink_frames
            if kind == "background":
                assert t == clip.background_change
    clip = dense.heldout_clip(0, dense.REDUCED)
    kept = [0] * 16
    kept[0], kept[clip.flash_frames[0]] = 5, 2
    motion = analysis.frame_kinds(clip).index("motion") + 1
    kept[motion] = 1
    rows = [{"id": f"c0000-{kind}", "preset": "evs", "keep": 0.1, "correct": kind == "flash", "error": None,
             "kept": {"kept_per_frame": kept}} for kind in ("flash", "ball", "order")]
    rows.append({"id": "c0000-ball", "preset": "random", "keep": 0.1, "correct": True, "error": None})  # no kept
    cell = analysis.tally(rows, dense.REDUCED)[("evs", 0.1)]
    assert cell["clips"] == 1 and cell["frame 0"] == 5 and cell["event"] == 2 and cell["motion"] == 1
    assert sum(cell[kind] for kind in analysis.KINDS) == 3
    assert not set(clip.ball_frames) & set(clip.flash_frames)
    assert cell[("flash", True)] == [1, 1] and cell[("ball", False)] == [0, 1]
    assert ("random", 0.1) not in analysis.tally(rows, dense.REDUCED)


def test_event_fates_finds_the_events_cells_and_labels_a_clip_by_its_best_token(load_script):
    """benchmarks/micro/event_fates.py: the event's cells are the 28 px cells its box touches, in
    its own frames only; a token is alone, the carrier of a merge, merged into another, or dropped,
    and a clip takes its event tokens' best fate."""
    import torch

    from vidqa.pruning.core.provenance import TokenFates

    analysis = load_script("benchmarks/micro/event_fates.py")
    grid = dense.REDUCED.grid
    for index in range(8):
        clip = dense.heldout_clip(index, dense.REDUCED)
        for event, frames, (cx, cy, _) in (("ball", clip.ball_frames, clip.ball), ("flash", clip.flash_frames, clip.flash)):
            cells = analysis.event_cells(clip, event, grid)
            assert {i // (grid * grid) for i in cells} == set(frames)
            for t in frames:  # the centre's cell is among them
                assert (t * grid + cy // 28) * grid + cx // 28 in cells
    # six tokens: 0 alone, 1 carries a merge with 2, 3 dropped before the LLM, 4 dropped inside it, 5 alone
    fates = TokenFates(grid=(1, 2, 3), sampled_frames=1, row=torch.tensor([0, 1, 1, -1, 2, 3]),
                       left_at_layer=torch.tensor([-1, -1, -1, -1, 5, -1]), left_at_stage=torch.tensor([-1, -1, -1, 0, -1, -1]),
                       group=torch.tensor([-1, 0, 0, -1, -1, -1]), stages=["s"], num_layers=8,
                       representative=torch.tensor([True, True, False, False, True, True]))
    assert [analysis.token_fate(fates, i) for i in range(6)] == [
        "alone", "carries a merge", "merged into another", "dropped", "dropped", "alone"]
    assert analysis.clip_fate(fates, [2, 3, 4]) == "merged into another"
    assert analysis.clip_fate(fates, [1, 2, 3]) == "carries a merge"
    assert analysis.clip_fate(fates, [3, 4]) == "dropped"
