"""The extras of the synthetic world (microworld.world, `extras=True`): the flash and the corner
block the SmolLM2 benchmark model is asked about. No checkpoint needed."""

from __future__ import annotations

from collections import Counter

import numpy as np

from microworld import world


def _diamond(clip) -> np.ndarray:
    ys, xs = np.mgrid[0 : world.SIZE, 0 : world.SIZE]
    fx, fy, fr = clip.flash
    return np.abs(xs - fx) + np.abs(ys - fy) <= fr


def test_extras_leave_the_rest_of_the_clip_as_it_was():
    """The micro model's held-out clips are unchanged: only the flash (its frames) and the corner
    block (frame 0) differ, and every other answer is the same."""
    for index in range(40):
        plain, extra = world.heldout_clip(index), world.heldout_clip(index, extras=True)
        assert {k: extra.answers[k] for k in plain.answers} == plain.answers
        assert np.array_equal(plain.square_boxes, extra.square_boxes)
        changed = (plain.frames != extra.frames).any(-1)  # (T, H, W)
        allowed = np.zeros_like(changed)
        for t in extra.flash_frames:
            allowed[t] |= _diamond(extra)
        x0, y0, x1, y1 = extra.corner_box
        allowed[0, y0:y1, x0:x1] = True
        assert not (changed & ~allowed).any(), index


def test_the_flash_and_the_corner_are_where_the_answers_say():
    rng = np.random.default_rng(5)
    for num_frames in (1, 2, 8, 16):
        for _ in range(40):
            clip = world.make_clip(rng, num_frames, extras=True)
            flash_rgb = world.FLASH_COLOURS[clip.answers["flash"]]
            corner_rgb = world.FLASH_COLOURS[clip.answers["corner_start"]]
            assert 1 <= len(clip.flash_frames) <= 2
            assert list(clip.flash_frames) == list(range(clip.flash_frames[0], clip.flash_frames[-1] + 1))
            diamond = _diamond(clip)
            for t in range(num_frames):
                visible = (clip.frames[t][diamond] == flash_rgb).all(-1)
                # drawn whole (nothing covers it) in its frames, absent elsewhere
                assert visible.all() if t in clip.flash_frames else not visible.all()
            x0, y0, x1, y1 = clip.corner_box
            assert (x0 in (0, world.SIZE - world.CORNER_SIDE)) and (y0 in (0, world.SIZE - world.CORNER_SIDE))
            assert (clip.frames[0, y0:y1, x0:x1] == corner_rgb).all()
            for t in range(1, num_frames):  # only at the start
                assert not (clip.frames[t, y0:y1, x0:x1] == corner_rgb).all(-1).all()
            # the square keeps its colour where it is drawn (the extras never cover it)
            sx0, sy0, sx1, sy1 = clip.square_boxes[0]
            assert (clip.frames[0, sy0:sy1, sx0:sx1] == world.SQUARE_COLOURS[clip.answers["square_start"]]).all()


def test_extra_answers_are_balanced_and_asked_in_training():
    clips = world.heldout_clips(600, extras=True)
    for kind, options in world.EXTRA_ANSWERS.items():
        counts = Counter(c.answers[kind] for c in clips)
        assert set(counts) == set(options)
        assert all(0.75 * 150 <= counts[o] <= 1.25 * 150 for o in options), (kind, counts)
    flash_frames = Counter(len(c.flash_frames) for c in clips)
    assert set(flash_frames) == {1, 2}
    asked = [q for q, _ in world.training_chat(clips[0], np.random.default_rng(0))]
    assert world.EXTRA_QUESTIONS["flash"] in asked and world.EXTRA_QUESTIONS["corner_start"] in asked
    plain = [q for q, _ in world.training_chat(world.heldout_clip(0), np.random.default_rng(0))]
    assert not set(plain) & set(world.EXTRA_QUESTIONS.values())


def test_emphasis_weights_a_type_within_its_group_and_none_draws_as_before():
    clips = world.heldout_clips(200, extras=True)

    def picks(emphasis, seed=0):
        rng = np.random.default_rng(seed)
        return [q for c in clips for q, _ in world.training_chat(c, rng, emphasis)]

    change = world.SMOL_QUESTIONS["background_change"]
    uniform, weighted = picks(None), picks({"background_change": 3.0})
    assert 0.25 <= uniform.count(change) / len(clips) <= 0.42  # 1 of 3
    assert 0.52 <= weighted.count(change) / len(clips) <= 0.68  # 3 of 5
    assert len(weighted) == len(uniform)  # still one question per group
    # the same as the draw without the argument (old runs reproduce)
    rng = np.random.default_rng(0)
    assert uniform == [q for c in clips for q, _ in world.training_chat(c, rng)]


def test_emphasis_flag_rejects_unknown_types_and_bad_weights():
    import pytest

    from microworld.train_smol import parse_emphasis

    assert parse_emphasis("direction=2, background_change=3") == {"direction": 2.0, "background_change": 3.0}
    assert parse_emphasis(None) is None
    for bad, said in (("colour=2", "unknown question type 'colour'"), ("direction", "not TYPE=WEIGHT"),
                      ("direction=0", "must be > 0")):
        with pytest.raises(ValueError, match=said):
            parse_emphasis(bad)


def test_attention_bias_counts_the_top_tokens_per_eighth(load_script):
    """benchmarks/micro/attention_bias.py: planted scores land in the eighths they were put in,
    and AdaTP's frame debiasing spreads a per-frame trend."""

    import torch

    from vidqa.pruning.methods.adatp import frame_debiased_scores

    module = load_script("benchmarks/micro/attention_bias.py")
    scores = torch.rand(128, generator=torch.Generator().manual_seed(0))
    scores[112:] += 10.0  # the last frame wins
    counts = module.top_eighths(scores)
    assert counts.tolist() == [0] * 7 + [13]
    frame = torch.arange(128) // 16
    trend = (frame.float() + 1) * (1 + 0.1 * torch.rand(128, generator=torch.Generator().manual_seed(1)))
    assert module.top_eighths(trend)[-1] == 13
    assert module.top_eighths(frame_debiased_scores(trend, frame)).max() < 13
