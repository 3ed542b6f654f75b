"""Frame selection before the vision encoder (issue #35 item 3): the `dedup` frame selector.

Planted signals (a static shot collapses to one frame, a clip of new content keeps every frame,
a slow drift adds up against the last KEPT frame), chunked = whole clip, Qwen's frame pairs, the
composition syntax (`dedup+evs`, `dedup+earlytom`) and its one-line errors, every family, identity
parity (threshold 0 = without it), and the reporting: per-stage counts, --json, provenance over
the decoded clip, --show-kept, FLOPs, the run-time check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from helpers import QUESTION, answer_clip

from vidqa.engine.session import VideoSession
from vidqa.errors import BadInput
from vidqa.models import load_model
from vidqa.pruning.core.frame_selection import (
    ChunkSelection,
    FrameSelection,
    SelectedClip,
    select_units,
    selected_clip,
)
from vidqa.pruning.core.presets import available_presets, build_pruner, frame_selectors, load_preset
from vidqa.pruning.core.provenance import DROPPED_BEFORE_LLM, KEPT
from vidqa.pruning.methods.dedup import FrameDedup, dedup_units, gray_thumbnails
from vidqa.render.show_kept import DROPPED_BEFORE, cell_roles, panel_caption
from vidqa.testing.qwen3 import build_tiny_qwen3_vl
from vidqa.testing.qwen3_5 import build_tiny_qwen3_5
from vidqa.testing.videos import write_video
from vidqa.video.decode import Clip

STILL, MOVING = 4, 4  # frames of the static shot, then of new content


def planted_frames(still: int = STILL, moving: int = MOVING, side: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (still + moving, side, side, 3): one picture held for `still` frames, then a new
    picture every frame (random pixels: every thumbnail differs by tens of gray levels)."""
    generator = np.random.default_rng(seed)
    picture = generator.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    new = generator.integers(0, 256, (moving, side, side, 3), dtype=np.uint8)
    return np.concatenate([np.repeat(picture, still, axis=0), new])


def clip_of(frames: np.ndarray, fps: float = 4.0) -> Clip:
    """A decoded clip of `frames` at `fps` (no file, no codec: the pixels are exact)."""
    count = len(frames)
    indices = np.arange(count)
    return Clip(frames=frames, indices=indices, timestamps=indices / fps, fps=fps, duration=count / fps,
                total_frames=count, decoder="test")


@pytest.fixture(scope="module")
def adapters(family_adapters, tmp_path_factory):
    """The three family models, plus Qwen3-VL and Qwen3.5 (one 128 px frame pair = 4x4 tokens)."""
    qwen3 = build_tiny_qwen3_vl(tmp_path_factory.mktemp("frames-qwen3"))
    qwen3_5 = build_tiny_qwen3_5(tmp_path_factory.mktemp("frames-qwen3_5"))
    return {**family_adapters,
            "qwen3": load_model(str(qwen3), device="cpu", dtype="float32", max_pixels=128 * 128),
            "qwen3_5": load_model(str(qwen3_5), device="cpu", dtype="float32", max_pixels=128 * 128)}


# --- the selection --------------------------------------------------------------------------------


def test_a_static_shot_collapses_to_one_frame_and_new_content_stays():
    frames = planted_frames()
    choice = select_units(FrameDedup(), frames, unit=1)
    assert choice.keep == [True, False, False, False, True, True, True, True]
    assert choice.scores[0] is None and choice.scores[1:STILL] == [0.0] * (STILL - 1)
    assert min(choice.scores[STILL:]) > 20  # random pictures differ by tens of gray levels
    no_static = planted_frames(still=1, moving=7)
    assert select_units(FrameDedup(), no_static, unit=1).keep == [True] * 8


def test_the_reference_is_the_last_kept_frame_so_a_slow_drift_adds_up():
    """Each frame one gray level brighter than the one before: below a threshold of 1.5 frame to
    frame, but every second frame differs from the last kept one by 2."""
    frames = np.stack([np.full((32, 32, 3), 100 + t, dtype=np.uint8) for t in range(7)])
    choice = select_units(FrameDedup(threshold=1.5), frames, unit=1)
    assert choice.keep == [True, False, True, False, True, False, True]


def test_threshold_zero_keeps_every_frame():
    frames = np.repeat(planted_frames()[:1], 6, axis=0)
    assert select_units(FrameDedup(threshold=0.0), frames, unit=1).keep == [True] * 6


@pytest.mark.parametrize("chunk_units", [1, 2, 3, 5])
def test_chunks_with_the_carried_frame_choose_as_the_whole_clip(chunk_units):
    frames = np.concatenate([planted_frames(seed=1), planted_frames(seed=2), planted_frames(still=3, moving=1, seed=3)])
    whole = select_units(FrameDedup(), frames, unit=1)
    chunked = select_units(FrameDedup(), frames, unit=1, chunk_units=chunk_units)
    assert chunked.keep == whole.keep and chunked.scores == whole.scores
    # the carry is the last kept frame's thumbnail: a chunk handed it continues where the last stopped
    first = dedup_units(gray_thumbnails(frames[:5], 32), 2.0, None)
    rest = dedup_units(gray_thumbnails(frames[5:], 32), 2.0, first.carry)
    assert first.keep + rest.keep == whole.keep


def test_frame_pairs_are_kept_or_dropped_together():
    """Unit 2 (Qwen's temporal patch): a pair is compared by its mean thumbnail, the count stays even."""
    frames = planted_frames(still=6, moving=4)
    choice = select_units(FrameDedup(), frames, unit=2)
    assert choice.keep == [True, False, False, True, True]
    clip = selected_clip(clip_of(frames), "dedup", FrameDedup(), unit=2)
    assert clip.frame_selection.kept_frames().tolist() == [0, 1, 6, 7, 8, 9]
    odd = selected_clip(clip_of(frames[:7]), "dedup", FrameDedup(), unit=2)  # the last unit: one frame
    assert odd.frame_selection.num_units == 4 and odd.frame_selection.kept_frames().tolist() == [0, 1, 6]


def test_the_kept_frames_keep_their_indices_and_timestamps():
    source = clip_of(planted_frames(), fps=4.0)
    clip = selected_clip(source, "dedup", FrameDedup(), unit=1)
    assert isinstance(clip, SelectedClip) and clip.source is source
    assert clip.indices.tolist() == [0, 4, 5, 6, 7]
    assert clip.timestamps.tolist() == [0.0, 1.0, 1.25, 1.5, 1.75]
    assert np.array_equal(clip.frames, source.frames[[0, 4, 5, 6, 7]])
    assert clip.duration == source.duration and clip.fps == source.fps
    assert clip.sample_fps == pytest.approx(4.0)  # the decoded rate, not the thinner one left


def test_details_record_the_choice():
    selection = FrameSelection(stage="dedup", unit=2, num_frames=7, kept_units=(0, 3), scores=(None, 0.5, 1.0, 9.0))
    assert selection.details() == {"stage": "dedup", "frames_in": 7, "frames_kept": 3, "frames_per_unit": 2,
                                   "kept_frames": [0, 1, 6], "scores": [None, 0.5, 1.0, 9.0]}


# --- presets: the selector and its composition ----------------------------------------------------


def test_the_selector_is_apart_from_the_token_presets_and_composes_in_front():
    assert "dedup" in frame_selectors() and "dedup" not in available_presets()
    alone = load_preset("dedup")
    assert alone.where == "before vision encoder" and [n for n, _ in alone.stages] == ["dedup"]
    composed = load_preset("dedup+evs", ["threshold=5", "pruning_rate=0.5"])
    assert composed.name == "dedup+evs" and [n for n, _ in composed.stages] == ["dedup", "select"]
    assert composed.stages[0][1].threshold == 5.0 and composed.stages[1][1].pruning_rate == 0.5
    assert composed.positions == load_preset("evs").positions
    assert composed.typical_keep == load_preset("evs").typical_keep
    assert "dedup" in composed.keep_rule and "--keep" in composed.keep_rule
    assert load_preset("dedup+earlytom", ["dedup.threshold=1", "frames.tau=0.5"]).stages[1][1].tau == 0.5


@pytest.mark.parametrize(("name", "fragment"), [
    ("evs+dedup", "'evs' is not a frame selector"),
    ("dedup+dedup", "selects frames too"),
    ("dedup+evs+fastv", "compose one frame selector with one preset"),
    ("dedup+", "compose one frame selector"),
    ("dedup+evz", "unknown preset 'evz' (did you mean 'evs'?)"),
])
def test_a_bad_composition_is_one_line_naming_it(name, fragment):
    with pytest.raises(BadInput) as error:
        load_preset(name)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_dedup_alone_has_no_budget_and_a_bad_parameter_is_named(family_adapters):
    with pytest.raises(BadInput, match="no budget for --keep"):
        build_pruner(load_preset("dedup"), family_adapters["llava"], keep=0.5)
    with pytest.raises(BadInput, match=r"dedup\.dedup\.threshold = -1\.0 is out of range"):
        load_preset("dedup", ["threshold=-1"])


# --- through the engine -------------------------------------------------------------------------


def test_static_frames_are_not_encoded_and_every_number_says_so(family_adapters):
    adapter = family_adapters["llava"]
    clip = clip_of(planted_frames())
    none = answer_clip(adapter, clip)
    answer = answer_clip(adapter, clip, build_pruner(load_preset("dedup+evs"), adapter))
    tokens = answer.stats.tokens
    per_frame = none.stats.tokens.visual_tokens_before // 8
    kept = 1 + MOVING
    assert answer.details["frame_selection"]["kept_frames"] == [0, 4, 5, 6, 7]
    assert tokens.frames == kept and tokens.visual_tokens_before == kept * per_frame
    stages = tokens.visual_tokens_per_stage
    assert list(stages) == ["decoded frames", "dedup", "vision encoder", "select"]
    assert stages["decoded frames"] == 8 * per_frame and stages["dedup"] == stages["vision encoder"] == kept * per_frame
    assert stages["select"] == max(per_frame, int(kept * per_frame * 0.25))  # EVS at 0.25 of the frames kept
    # FLOPs: the encoder ran on the kept frames only
    assert 0 < answer.stats.flops.vision_encoder_macs < none.stats.flops.vision_encoder_macs
    assert answer.stats.flops.vision_encoder_macs * 8 == none.stats.flops.vision_encoder_macs * kept
    # the run-time check held on the shorter prompt
    assert answer.stats.verified["checks"] == none.stats.verified["checks"]
    # provenance over the decoded clip: the static frames dropped whole by dedup
    fates = answer.kept
    assert fates.grid[0] == 8 and fates.sampled_frames == 8 and fates.stages[0] == "dedup"
    by_frame = fates.outcome().view(8, per_frame)
    assert (by_frame[1:STILL] == DROPPED_BEFORE_LLM).all()
    assert (fates.left_at_stage.view(8, per_frame)[1:STILL] == 0).all()
    compact = fates.compact()
    assert compact["dropped_by_stage"]["dedup"] == (STILL - 1) * per_frame
    assert sum(compact["kept_per_frame"]) == tokens.visual_tokens_after
    roles = cell_roles(fates)
    assert (roles.role[1:STILL] == DROPPED_BEFORE).all() and (roles.role[[0, 4]] != DROPPED_BEFORE).any()
    assert panel_caption(fates, 1, clip.timestamps, 0, 0) == "0.2 s\nframe dropped (dedup)"


def test_keep_counts_the_tokens_of_the_frames_kept(family_adapters):
    adapter = family_adapters["llava"]
    clip = clip_of(planted_frames())
    answer = answer_clip(adapter, clip, build_pruner(load_preset("dedup+visionzip"), adapter, keep=0.5))
    tokens = answer.stats.tokens
    assert tokens.visual_tokens_per_stage["vision encoder"] == tokens.visual_tokens_before
    assert tokens.layer_avg_retention == pytest.approx(0.5, abs=0.02)
    assert tokens.visual_tokens_after < tokens.visual_tokens_per_stage["decoded frames"] * 0.5


@pytest.mark.parametrize("family", ["llava", "smol"])
def test_composes_with_earlytom_inside_the_encoder(family_adapters, family):
    adapter = family_adapters[family]
    clip = clip_of(planted_frames())
    answer = answer_clip(adapter, clip, build_pruner(load_preset("dedup+earlytom"), adapter))
    stages = answer.stats.tokens.visual_tokens_per_stage
    assert list(stages)[:4] == ["decoded frames", "dedup", "vision encoder", "frames"]
    assert answer.details["earlytom"]["frames"][0]["frames_in"] == 1 + MOVING  # the encoder saw the kept frames
    assert answer.stats.tokens.encoder_frames_per_layer[0] == 1 + MOVING
    assert answer.kept.grid[0] == 8 and answer.stats.verified["checks"][0] == "vision_encoder"


FAMILIES = ["llava", "qwen", "smol", "qwen3", "qwen3_5"]
PAIRS = {"llava": 1, "qwen": 2, "smol": 1, "qwen3": 2, "qwen3_5": 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_drops_the_static_shot_and_matches_without_it_at_threshold_zero(adapters, family):
    adapter = adapters[family]
    clip = clip_of(planted_frames(side=128))
    unit = PAIRS[family]
    plain = answer_clip(adapter, clip)
    same = answer_clip(adapter, clip, build_pruner(load_preset("dedup", ["threshold=0"]), adapter))
    assert same.text == plain.text and same.stats.tokens.generated_tokens == plain.stats.tokens.generated_tokens
    assert same.stats.tokens.visual_tokens_per_layer == plain.stats.tokens.visual_tokens_per_layer
    answer = answer_clip(adapter, clip, build_pruner(load_preset("dedup"), adapter))
    selection = answer.details["frame_selection"]
    assert selection["frames_per_unit"] == unit
    assert selection["kept_frames"] == ([0, 4, 5, 6, 7] if unit == 1 else [0, 1, 4, 5, 6, 7])
    tokens = answer.stats.tokens
    assert tokens.frames == len(selection["kept_frames"])
    kept_units = len(selection["kept_frames"]) // unit
    assert tokens.visual_tokens_before * (8 // unit) == plain.stats.tokens.visual_tokens_before * kept_units
    assert tokens.visual_tokens_per_stage["decoded frames"] == plain.stats.tokens.visual_tokens_before
    assert answer.kept.grid == plain.kept.grid and answer.kept.frames_per_grid_frame == unit
    assert answer.stats.verified is not None


@pytest.mark.parametrize("family", ["llava", "qwen", "smol"])
def test_identity_composition_gives_the_presets_own_answer(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    for preset in ("evs", "fastv"):
        expected = answer_clip(adapter, clip, build_pruner(load_preset(preset), adapter, keep=0.5))
        composed = answer_clip(adapter, clip, build_pruner(load_preset(f"dedup+{preset}", ["threshold=0"]), adapter,
                                                           keep=0.5))
        assert composed.text == expected.text, preset
        assert composed.stats.tokens.visual_tokens_per_layer == expected.stats.tokens.visual_tokens_per_layer, preset
        assert torch.equal(composed.kept.row, expected.kept.row), preset


def test_a_clip_selected_again_by_the_same_pruner_is_not_selected_twice(family_adapters):
    adapter = family_adapters["llava"]
    pruner = build_pruner(load_preset("dedup"), adapter)
    clip = pruner.before_encoder(clip_of(planted_frames()))
    assert pruner.before_encoder(clip) is clip
    other = build_pruner(load_preset("dedup", ["threshold=0"]), adapter).before_encoder(clip)
    assert other.num_frames == 8 and other.source is clip.source  # selected again from the decoded frames


def test_a_session_selects_once_and_reuses_the_prefix_with_the_same_answers(family_adapters):
    adapter = family_adapters["llava"]
    clip = clip_of(planted_frames())
    pruner = build_pruner(load_preset("dedup+evs"), adapter)
    reusing = VideoSession(adapter, clip, pruner)
    plain = VideoSession(adapter, clip, pruner, reuse=False)
    assert reusing.reuse  # a pre-LLM preset behind a frame selector keeps a reusable prefix
    for question in (QUESTION, "what colour is the square ?"):
        reused, fresh = reusing.ask(question), plain.ask(question)
        assert reused.text == fresh.text
        assert reused.details["frame_selection"] == fresh.details["frame_selection"]
        assert reused.details["frame_selection"]["frames_kept"] == 1 + MOVING
        assert reused.stats.tokens.visual_tokens_per_stage == fresh.stats.tokens.visual_tokens_per_stage
    assert reused.stats.prefix_reused


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("frames-video") / "still.mp4", planted_frames(side=112), fps=4.0)


def test_cli_json_and_show_kept_report_the_dropped_frames(run_cli, family_checkpoints, planted_video, tmp_path):
    image = tmp_path / "kept.png"
    result = run_cli(["ask", planted_video, QUESTION, "--model", family_checkpoints["llava"], "--frames", "8",
                      "--max-new-tokens", "2", "--prune", "dedup+evs", "--json", "--show-kept", image])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["preset"] == "dedup+evs"
    assert record["pruning"]["frame_selection"]["kept_frames"] == [0, 4, 5, 6, 7]
    tokens = record["stats"]["tokens"]
    assert list(tokens["visual_tokens_per_stage"]) == ["decoded frames", "dedup", "vision encoder", "select"]
    assert tokens["frames"] == 5
    kept = record["kept"]
    assert kept["grid"][0] == 8 and kept["kept_per_frame"][1:STILL] == [0] * (STILL - 1)
    assert kept["dropped_by_stage"]["dedup"] == (STILL - 1) * kept["grid"][1] * kept["grid"][2]
    assert image.stat().st_size > 0
    table = run_cli(["ask", planted_video, QUESTION, "--model", family_checkpoints["llava"], "--frames", "8",
                     "--max-new-tokens", "2", "--prune", "dedup", "--stats"])
    assert table.exit_code == 0 and "(decoded frames)" in table.stderr and "(dedup)" in table.stderr


def test_cli_errors_are_one_line(run_cli, family_checkpoints, planted_video):
    model = family_checkpoints["llava"]
    result = run_cli(["ask", planted_video, QUESTION, "--model", model, "--prune", "evs+dedup"])
    assert_one_line_error(result, "evs+dedup", "not a frame selector")
    result = run_cli(["ask", planted_video, QUESTION, "--model", model, "--prune", "dedup", "--keep", "0.5"])
    assert_one_line_error(result, "dedup", "--keep")
    shown = run_cli(["presets", "show", "dedup+evs"])
    assert shown.exit_code == 0 and "frame_dedup" in shown.stdout and "before vision encoder" in shown.stdout


def test_outcomes_of_kept_frames_are_their_own(family_adapters):
    """The lift moves each kept frame's fates to its decoded frame, unchanged."""
    adapter = family_adapters["llava"]
    clip = clip_of(planted_frames())
    selected = build_pruner(load_preset("dedup+evs"), adapter)
    answer = answer_clip(adapter, clip, selected)
    grid = answer.kept.grid
    per_frame = grid[1] * grid[2]
    outcome = answer.kept.outcome().view(8, per_frame)
    assert (outcome[0] != DROPPED_BEFORE_LLM).all()  # EVS keeps the first frame whole
    assert (outcome[4:] == KEPT).sum() > 0


def test_a_choice_that_keeps_nothing_keeps_the_first_unit():
    class DropAll(FrameDedup):
        def select(self, frames, unit, carry):
            units = -(-len(frames) // unit)
            return ChunkSelection([False] * units, [None] * units, carry)

    clip = selected_clip(clip_of(planted_frames()), "drop", DropAll(), unit=2)
    assert clip.frame_selection.kept_units == (0,) and clip.indices.tolist() == [0, 1]


def test_the_presets_listing_names_the_frame_selectors_apart(run_cli):
    listing = {row["name"]: row for row in json.loads(run_cli(["presets", "--json"]).stdout)}
    assert listing["dedup"]["selector"] is True and listing["evs"]["selector"] is False
    table = run_cli(["presets"]).stdout
    assert "frame selectors" in table and table.index("dedup") > table.index("frame selectors")
