"""FastVID: DySeg and STPrune reproduce the authors' released code (fixtures), planted scene
changes and attention hot spots, budgets, and the preset's --keep/--flops mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILY_BUILDERS, ask_json, assert_one_line_error
from helpers import grid_tokens, request_state

from vidqa.errors import BadInput
from vidqa.pruning.core.presets import load_preset
from vidqa.pruning.methods.fastvid import DySegStage, STPruneStage, merge_into_centres, stprune, stprune_plan
from vidqa.pruning.ops.dyseg import dyseg_cuts, dyseg_segments
from vidqa.pruning.ops.segments import similarity_segments

FIXTURES = Path(__file__).parent / "fixtures" / "fastvid"


def scene_features(scenes: list[int], dim: int = 16, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """(T, dim) per-frame features: one random direction per scene id, tiny noise per frame."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(max(scenes) + 1, dim, generator=generator)
    return directions[scenes] + noise * torch.randn(len(scenes), dim, generator=generator)


# --- the authors' released code ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["defaults", "long_segments", "every_frame_anchor", "published_10pct"])
def test_llava_ov_path_reproduces_the_released_code(case):
    fixture = torch.load(FIXTURES / "llava_ov_stprune.pt")[case]
    inputs, p = fixture["inputs"], fixture["params"]
    segments = dyseg_segments(inputs["global_features"], min_segments=p["c"], tau=p["tau"])
    assert [end - start for start, end in segments] == fixture["segment_sizes"].tolist()
    result = stprune(inputs["features"], inputs["attention"], segments, ratio=p["ratio"],
                     context_share=p["d"], anchor_every=p["p"], beta=p["beta"])
    assert torch.equal(result.index, fixture["kept_index"])
    torch.testing.assert_close(result.features, fixture["kept_features"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["qwen_defaults", "qwen_threshold_heavy"])
def test_dyseg_reproduces_the_released_qwen_path(case):
    fixture = torch.load(FIXTURES / "qwen_dyseg.pt")[case]
    segments = dyseg_segments(fixture["global_features"], min_segments=fixture["c"], tau=fixture["tau"])
    assert [end - start for start, end in segments] == fixture["segment_sizes"].tolist()


# --- DySeg ----------------------------------------------------------------------------------------


def test_dyseg_cuts_at_an_abrupt_scene_change_and_nowhere_else():
    features = scene_features([0] * 5 + [1] * 7)
    assert dyseg_cuts(features, min_segments=1, tau=0.9) == [5]
    assert dyseg_cuts(features, min_segments=2, tau=0.9) == [5]  # the forced cut is the same one


def test_dyseg_min_segments_forces_the_lowest_similarity_cuts_on_a_smooth_clip():
    # one scene drifting slowly: no pair below tau, so only the forced cuts remain (the 3 largest steps)
    generator = torch.Generator().manual_seed(3)
    steps = torch.tensor([0.01, 0.01, 0.3, 0.01, 0.2, 0.01, 0.01, 0.25, 0.01])
    base = torch.randn(16, generator=generator)
    drift = torch.randn(len(steps), 16, generator=generator)
    features = torch.cat([base[None], base + torch.cumsum(steps[:, None] * drift, dim=0)])
    assert dyseg_cuts(features, min_segments=4, tau=0.0) == [3, 5, 8]
    # AdaTP's segmentation reads the count as a maximum: the same clip at tau=0 is one segment
    assert similarity_segments(features, tau=0.0, max_segments=4) == [(0, 10)]


def test_dyseg_threshold_cuts_are_not_capped_by_min_segments():
    features = scene_features([0, 1, 2, 3, 4, 5])  # every frame a new scene
    assert dyseg_cuts(features, min_segments=2, tau=0.9) == [1, 2, 3, 4, 5]
    assert similarity_segments(features, tau=0.9, max_segments=2) != dyseg_segments(features, 2, 0.9)


def test_dyseg_short_clips():
    assert dyseg_cuts(scene_features([0]), min_segments=8) == []
    assert dyseg_cuts(scene_features([0, 0, 0]), min_segments=8, tau=0.0) == [1, 2]  # all T - 1 cuts


def test_dyseg_stage_annotates_segments_and_drops_nothing():
    scenes = [0] * 3 + [1] * 5
    features = scene_features(scenes, dim=8)[:, None, :].repeat(1, 4, 1)  # (T, 4, C)
    tokens = grid_tokens(features)
    out = DySegStage(min_segments=1, tau=0.9).apply(tokens, st := request_state())
    assert len(out) == len(tokens) and torch.equal(out.features, tokens.features)
    assert out.meta["segment"].tolist() == [0] * 12 + [1] * 20
    assert st.details["dyseg"]["segments"] == [[0, 3], [3, 8]]


# --- STPrune ----------------------------------------------------------------------------------------


def test_plan_matches_the_papers_budget_split():
    plan = stprune_plan([(0, 5), (5, 6), (6, 14)], per_frame=196, ratio=0.1, context_share=0.4, anchor_every=4)
    # retain = 19, c = 7, s = 12. Segment of 5: ceil(5/4) = 2 anchors (frames 4 and 0, counted from
    # its end) with 5*7//2 = 17 each; the 1-frame segment: its own frame, 7, merged locally;
    # segment of 8: anchors at its 4th and 8th frames with 8*7//2 = 28 each.
    assert plan.salient.tolist() == [12] * 14
    assert plan.context.tolist() == [17, 0, 0, 0, 17, 7, 0, 0, 0, 28, 0, 0, 0, 28]
    assert plan.local.tolist() == [False] * 5 + [True] + [False] * 8
    assert int(plan.salient.sum() + plan.context.sum()) == 14 * 19 - 1  # 5*7 = 35 split as 2*17


def test_plan_beyond_the_authors_range_moves_the_surplus_to_other_frames():
    plan = stprune_plan([(0, 8)], per_frame=16, ratio=1.0, context_share=0.4, anchor_every=4)
    assert (plan.salient + plan.context).tolist() == [16] * 8  # every token kept
    plan = stprune_plan([(0, 8)], per_frame=16, ratio=0.75, context_share=0.4, anchor_every=4)
    assert int((plan.salient + plan.context).sum()) == 8 * 12 and int((plan.salient + plan.context).max()) <= 16


def test_merge_weights_the_peak_by_beta():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[1.0, 0.0], [3.0, 0.2], [2.0, 0.1], [0.0, 1.0]])
    merged = merge_into_centres(centres, pool, beta=0.6)
    members = pool[:3].mean(dim=0)  # the peak itself and the two tokens closest to it
    torch.testing.assert_close(merged[0], 0.6 * centres[0] + 0.4 * members)
    torch.testing.assert_close(merged[1], centres[1])  # only itself: 0.6 x + 0.4 x


def test_scene_change_hot_spot_and_static_merge():
    """Two static scenes of 4 frames, each frame two blobs of 8 near-identical tokens: DySeg cuts
    between the scenes; every frame keeps the hot-spot token; each segment's last frame (its
    anchor) keeps one density peak per blob, into which the blob's tokens from all 4 frames merge."""
    frames, per_frame, dim = 8, 16, 12
    generator = torch.Generator().manual_seed(0)
    blobs = 3 * torch.randn(2, 2, dim, generator=generator)  # (scene, blob, C)
    frame_content = blobs.repeat_interleave(8, dim=1) + 0.05 * torch.randn(2, per_frame, dim, generator=generator)
    features = frame_content.repeat_interleave(4, dim=0) + 1e-3 * torch.randn(frames, per_frame, dim, generator=generator)
    attention = torch.rand(frames, per_frame, generator=generator) * 0.1
    attention[:, 5] = 1.0  # the vision encoder's hot spot
    tokens = DySegStage(min_segments=1, tau=0.9).apply(grid_tokens(features, attention), st := request_state())
    assert st.details["dyseg"]["segments"] == [[0, 4], [4, 8]]
    out = STPruneStage(ratio=0.25, context_share=0.5).apply(tokens, st)  # retain 4: 2 salient + 2 context
    position = (out.row * 4 + out.col).tolist()
    kept_frame = out.frame.tolist()
    assert [kept_frame.count(f) for f in range(frames)] == [2, 2, 2, 10, 2, 2, 2, 10]  # anchors: 2 + 2*4/1
    assert all((f, 5) in zip(kept_frame, position) for f in range(frames))
    assert torch.equal(out.seq_index, tokens.seq_index[out.frame * per_frame + out.row * 4 + out.col])
    assert out.meta["segment"].tolist() == [0] * 16 + [1] * 16
    assert st.details["stprune"] == {"segments": [[0, 4], [4, 8]], "salient": 16, "context": 16}
    # each anchor's context tokens summarise its segment's blobs (4 frames x 8 tokens each): both
    # blobs are represented, and every kept token is close to its blob's centre
    for anchor, scene in ((3, 0), (7, 1)):
        rows = [i for i, f in enumerate(kept_frame) if f == anchor]
        context = [i for i in rows if position[i] != 5]  # 8 peaks + 1 salient blob member
        blob_of = [min(range(2), key=lambda b: float((out.features[i] - blobs[scene, b]).norm())) for i in context]
        assert set(blob_of) == {0, 1}
        for i, b in zip(context, blob_of):
            assert float((out.features[i] - blobs[scene, b]).norm()) < 0.5 < float((blobs[scene, 0] - blobs[scene, 1]).norm())


def test_ratio_one_keeps_every_token_unchanged():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(8, 16, 12, generator=generator)
    tokens = grid_tokens(features, torch.rand(8, 16, generator=generator))
    tokens = DySegStage(min_segments=3).apply(tokens, request_state())
    out = STPruneStage(ratio=1.0).apply(tokens, request_state())
    assert len(out) == len(tokens)
    assert torch.equal(out.seq_index, tokens.seq_index) and torch.equal(out.features, tokens.features)


def test_stprune_errors_name_what_is_missing():
    features = torch.randn(4, 16, 8)
    with pytest.raises(BadInput, match="vision-encoder attention"):
        STPruneStage().apply(grid_tokens(features), request_state())
    partial = grid_tokens(features, torch.rand(4, 16)).select(torch.arange(10))
    with pytest.raises(BadInput, match="full 4x4x4 token grid"):
        STPruneStage().apply(partial, request_state())


def test_preset_defaults_are_the_authors_llava_ov_script():
    preset = load_preset("fastvid")
    params = preset.parameters()
    assert params["dyseg"] == {"min_segments": 8, "tau": 0.9}
    assert params["stprune"] == {"ratio": 0.1, "context_share": 0.4, "anchor_every": 4, "beta": 0.6, "vision_layer": -1}
    assert preset.positions == "original" and preset.where == "before LLM"


# --- every family, end to end -----------------------------------------------------------------

QUESTION = "what happens in this video ?"
BUILDERS = FAMILY_BUILDERS
UNITS = {"llava": 8, "qwen": 4, "smol": 8}  # frame units at --frames 8 (Qwen: 2-frame temporal patches), 16 tokens each


@pytest.fixture(scope="module")
def checkpoints(family_checkpoints):
    return family_checkpoints


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_keep_one_matches_none(run_cli, checkpoints, square_video, family):
    reference = ask_json(run_cli, checkpoints[family], square_video)
    pruned = ask_json(run_cli, checkpoints[family], square_video, "--prune", "fastvid", "--keep", "1")
    assert pruned["stats"]["tokens"]["layer_avg_retention"] == 1.0
    assert pruned["answer"] == reference["answer"]
    assert pruned["stats"]["tokens"]["generated_tokens"] == reference["stats"]["tokens"]["generated_tokens"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_keep_flops_and_defaults_on_every_family(run_cli, checkpoints, square_video, family):
    units = UNITS[family]
    record = ask_json(run_cli, checkpoints[family], square_video, "--prune", "fastvid", "--keep", "0.25")
    tokens = record["stats"]["tokens"]
    assert tokens["visual_tokens_per_stage"] == {"vision encoder": units * 16, "dyseg": units * 16, "stprune": units * 4}
    assert tokens["layer_avg_retention"] == 0.25  # 4 of 16 per frame unit; every unit its own segment here
    assert record["pruning"]["dyseg"]["segments"] == [[t, t + 1] for t in range(units)]  # min_segments 8 >= units
    # one segment: anchors every 4th unit from the end hold the merged tokens; the total is the same
    record = ask_json(run_cli, checkpoints[family], square_video, "--prune", "fastvid", "--keep", "0.25",
                      "-P", "min_segments=1", "-P", "tau=0")
    assert record["pruning"]["dyseg"]["segments"] == [[0, units]]
    assert record["pruning"]["stprune"] == {"segments": [[0, units]], "salient": units * 3, "context": units}
    record = ask_json(run_cli, checkpoints[family], square_video, "--prune", "fastvid", "--flops", "0.3")
    flops = record["stats"]["flops"]
    one_token_per_unit = flops["paper_vanilla_macs"] / 16 * 1.2  # a step of the per-unit count, with slack for n^2
    assert abs(flops["paper_fraction"] - 0.3) * flops["paper_vanilla_macs"] <= one_token_per_unit
    record = ask_json(run_cli, checkpoints[family], square_video, "--prune", "fastvid")
    assert record["stats"]["tokens"]["visual_tokens_after"] == units  # int(16 * 0.10) = 1 salient token per unit


def test_listed_with_its_reference(run_cli):
    result = run_cli(["presets", "show", "fastvid"])
    assert result.exit_code == 0 and "LunarShen/FastVID" in result.stdout
    assert "fastvid" in run_cli(["presets"]).stdout


def test_keep_below_one_token_per_frame_is_refused(run_cli, checkpoints, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", checkpoints["llava"], "--frames", "8",
                      "--prune", "fastvid", "--keep", "0.01"])
    assert_one_line_error(result, "--keep 0.01", "at least 0.062")
