"""FlashVID: ADTS, TSTM and the per-frame DPC-kNN merge reproduce the authors' released code
(fixtures), planted attention / diversity / static-region signals, the --keep mapping (their
expansion), parity with `none`, and the preset end to end on every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILY_BUILDERS, ask_json, assert_one_line_error
from helpers import fake_adapter, grid_tokens, request_state

from vidqa.errors import BadInput
from vidqa.pruning.core.presets import load_preset
from vidqa.pruning.core.pruner import PresetPruner
from vidqa.pruning.methods.fastvid import DySegStage
from vidqa.pruning.methods.flashvid import ADTSTreeMerge, adts_select, compress_segment, frame_budgets, tstm
from vidqa.pruning.ops.dyseg import dyseg_segments

FIXTURES = torch.load(Path(__file__).parent / "fixtures" / "flashvid" / "flashvid.pt")


# --- the authors' released code ---------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(FIXTURES["compression"]))
def test_compression_reproduces_the_released_code(case):
    fixture = FIXTURES["compression"][case]
    features, attention, params = fixture["features"], fixture["attention"], fixture["params"]
    segments = dyseg_segments(features.mean(1), params["min_segment_num"], params["segment_threshold"])
    assert [end - start for start, end in segments] == fixture["segment_lengths"].tolist()
    selected, context = frame_budgets(features.shape[1], fixture["ratio"], params["alpha"])
    assert (selected, context) == (fixture["num_selected"], fixture["num_context"])
    representatives, merged = [], []
    for start, end in segments:
        plan = compress_segment(features[start:end], attention[start:end], selected, context,
                                params["temporal_threshold"], params["token_selection_method"])
        representatives.append(plan.representative + start * features.shape[1])
        merged.append(plan.features)
    assert torch.equal(torch.cat(representatives), fixture["indices"])
    torch.testing.assert_close(torch.cat(merged), fixture["tokens"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["defaults", "qwen_v1_deep_trees"])
def test_stage_reproduces_the_released_code(case):
    """The same through DySegStage + ADTSTreeMerge on VisualTokens: rows at the released global
    indices (as sequence positions), with the released features."""
    fixture = FIXTURES["compression"][case]
    features, params = fixture["features"], fixture["params"]
    tokens = grid_tokens(features, fixture["attention"])
    st = request_state()
    tokens = DySegStage(min_segments=params["min_segment_num"], tau=params["segment_threshold"]).apply(tokens, st)
    stage = ADTSTreeMerge(ratio=fixture["ratio"], alpha=params["alpha"], temporal_threshold=params["temporal_threshold"],
                          selection=params["token_selection_method"])
    out = stage.apply(tokens, st)
    assert torch.equal(out.seq_index, fixture["indices"] + 3)
    per_frame = features.shape[1]
    assert torch.equal(out.frame * per_frame + out.row * 8 + out.col, fixture["indices"])
    torch.testing.assert_close(out.features, fixture["tokens"], rtol=0, atol=1e-5)
    # per-token rows that must follow the merge (Qwen3-VL's DeepStack) get the same arithmetic as
    # coefficient sums, 1 / (tree divisor x cluster size), depth-2 trees included (the qwen case)
    mirrored = stage.apply(tokens.replace(deepstack=tokens.features[None].clone()), request_state())
    torch.testing.assert_close(mirrored.deepstack[0], fixture["tokens"], rtol=0, atol=1e-5)
    frames = features.shape[0]
    assert st.details["flashvid"]["selected"] == frames * fixture["num_selected"]
    assert st.details["flashvid"]["selected"] + st.details["flashvid"]["contextual"] == len(out)


@pytest.mark.parametrize("case", sorted(FIXTURES["selection"]))
def test_adts_reproduces_the_released_selection(case):
    fixture = FIXTURES["selection"][case]
    picks = adts_select(fixture["features"], fixture["attention"], fixture["count"], fixture["selection"])
    assert torch.equal(picks, fixture["picks"])


# --- planted signals ---------------------------------------------------------------------------


def test_adts_takes_the_attended_token_first_then_one_per_cluster():
    """Four groups of near-duplicate tokens in each frame, one token of group 2 the encoder's hot
    spot: four picks take the hot spot and one token of every other group (diversity), never
    two near-duplicates."""
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=generator) + 2.0
    group = torch.arange(16) % 4
    features = (centres[group] + 0.01 * torch.randn(2, 16, 16, generator=generator))  # (F=2, P=16, C)
    attention = torch.full((2, 16), 1.0 / 16)
    attention[:, 6] = 0.5  # token 6 (group 2)
    for selection in ("attn_div", "attn_div_v2"):
        picks = adts_select(features, attention, 4, selection)
        for frame in range(2):
            assert 6 in picks[frame].tolist()
            assert sorted(group[picks[frame]].tolist()) == [0, 1, 2, 3]


def test_tstm_merges_static_tokens_into_their_first_frame_with_the_released_arithmetic():
    """Half the positions are static across 3 frames (identical features), the other half new
    every frame: the static ones form chains rooted in frame 0; the dynamic ones stay. A chain
    x <- x <- x folds to (x + x + x) / 2 = 1.5 x: the released code divides a root by 1 + its
    direct children, not by its tree size."""
    generator = torch.Generator().manual_seed(1)
    static = torch.randn(8, 12, generator=generator)
    features = torch.randn(3, 16, 12, generator=generator)
    features[:, :8] = static
    free = torch.ones(3, 16, dtype=torch.bool)
    tree = tstm(features, free, threshold=0.8, lower_bound=0)
    assert tree.kept[0].all()
    assert not tree.kept[1:, :8].any() and tree.kept[1:, 8:].all()
    assert torch.equal(tree.root[2, :8], torch.arange(8))  # frame 2's static tokens end in frame 0's
    torch.testing.assert_close(tree.features[0, :8], 1.5 * static)
    torch.testing.assert_close(tree.features[1:, 8:], features[1:, 8:])


def test_tstm_lower_bound_raises_the_threshold():
    """A slowly drifting clip where every token links above 0.8: with a lower bound of 20 of the
    32 tokens the threshold becomes the 12th strongest link and, compared strictly as in the
    release, the 11 stronger ones merge: one token more than the bound stays."""
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(1, 8, 6, generator=generator) + 0.05 * torch.randn(4, 8, 6, generator=generator).cumsum(0)
    free = torch.ones(4, 8, dtype=torch.bool)
    assert int(tstm(features, free, 0.8, lower_bound=0).kept.sum()) == 8
    assert int(tstm(features, free, 0.8, lower_bound=20).kept.sum()) == 21
    assert int(tstm(features, free, 0.8, lower_bound=32).kept.sum()) == 32  # the full budget: nothing merges


def test_selected_tokens_never_anchor_a_merge():
    features = torch.eye(4, 6).expand(2, 4, 6)  # orthogonal tokens, so each matches only its own copy
    free = torch.ones(2, 4, dtype=torch.bool)
    free[0, 1] = False  # frame 0's token 1 was selected by ADTS: frame 1's copy must not merge into it
    tree = tstm(features, free, 0.8, lower_bound=0)
    assert tree.kept[1, 1] and not tree.kept[1, [0, 2, 3]].any()


def test_segment_plan_covers_every_token_once():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(4, 25, 8, generator=generator) + 0.5
    features[1:] = features[:1] + 0.1 * torch.randn(3, 25, 8, generator=generator)
    attention = torch.rand(4, 25, generator=generator)
    plan = compress_segment(features, attention, num_selected=4, num_context=3)
    assert (plan.rows >= 0).all()  # nothing dropped: every token belongs to a kept row
    assert torch.equal(torch.unique(plan.rows), torch.arange(len(plan.representative)))
    assert torch.equal(plan.representative, torch.sort(plan.representative).values)
    assert torch.equal(plan.rows[plan.representative], torch.arange(len(plan.representative)))
    assert int(plan.selected.sum()) == 16
    # selected rows carry their own token's features unchanged
    flat = features.reshape(100, -1)
    assert torch.equal(plan.features[plan.selected], flat[plan.representative[plan.selected]])


def test_without_contextual_budget_only_the_selected_tokens_remain():
    features, attention = torch.randn(3, 16, 8), torch.rand(3, 16)
    for plan in (compress_segment(features, attention, 4, 0), compress_segment(features, attention, 4, 2, threshold=1.0)):
        assert len(plan.representative) == 12 and int((plan.rows >= 0).sum()) == 12


def test_single_frame_segment_clusters_only_the_unselected_tokens():
    """(A deviation: the released single-frame branch clusters the whole frame, selected tokens
    included, so they count twice.) Here every token is in exactly one row."""
    features, attention = torch.randn(1, 16, 8), torch.rand(1, 16)
    plan = compress_segment(features, attention, num_selected=3, num_context=2)
    assert len(plan.representative) == 5 and (plan.rows >= 0).all()
    assert len(torch.unique(plan.representative)) == 5


def test_adts_v2_never_picks_a_token_twice():
    """v2 multiplies distances by relevance, which is negative for tokens pointing away from the
    segment's mean; the release then re-picks a chosen token (its distance 0 beats the
    negatives: the fixture's picks repeat); vidqa excludes chosen tokens as v1 does."""
    fixture = FIXTURES["repeats"]
    released = fixture["picks"][0].tolist()
    assert len(set(released)) < len(released)
    picks = adts_select(fixture["features"], fixture["attention"], fixture["count"], "attn_div_v2")[0].tolist()
    assert len(set(picks)) == len(picks) == fixture["count"]
    assert released[0] in picks  # the first pick is the same


def test_budgets_round_like_the_release():
    assert frame_budgets(196, 0.25 * 1.25, 0.7) == (44, 18)  # ceil(61.25) = 62, ceil(43.4) = 44
    assert frame_budgets(196, 0.1 * 1.25, 0.7) == (18, 7)  # ceil(24.5) = 25
    assert frame_budgets(64, 0.3125, 0.7) == (14, 6)  # exactly 20, not 21 from float error
    assert frame_budgets(16, 0.0, 0.7) == (1, 0)  # at least one token per frame


def test_stage_errors_name_what_is_missing():
    with pytest.raises(BadInput, match="vision-encoder attention"):
        tokens = grid_tokens(torch.randn(2, 4, 3), torch.rand(2, 4))
        tokens.meta.pop("vision_attention")
        ADTSTreeMerge().apply(tokens, request_state())
    with pytest.raises(BadInput, match="full 2x2x2 token grid"):
        ADTSTreeMerge().apply(grid_tokens(torch.randn(2, 4, 3), torch.rand(2, 4)).select(torch.arange(5)), request_state())
    with pytest.raises(BadInput, match="selection 'attn'"):
        load_preset("flashvid", ["selection=attn"])


# --- the preset and its budget ------------------------------------------------------------------


def test_preset_defaults_are_the_authors_config():
    preset = load_preset("flashvid")
    params = preset.parameters()
    assert params["dyseg"] == {"min_segments": 8, "tau": 0.9}
    assert params["merge"] == {"ratio": 0.3125, "alpha": 0.7, "temporal_threshold": 0.8, "selection": "attn_div_v2",
                               "vision_layer": -1}
    assert params["select"] == {"layer": 23, "ratio": 0.3}
    assert preset.typical_keep == 0.25 and preset.positions == "compact"


def test_keep_scales_the_pre_llm_ratio_by_their_expansion():
    """On their 28-layer models the in-LLM stage sits at layer 20 and keeps 30%, leaving a
    layer-averaged share of (20 + 8 * 0.3) / 28 = 0.8: --keep R asks 1.25 R before the LLM,
    their retention_ratio x expansion."""
    pruner = PresetPruner(load_preset("flashvid"), fake_adapter(28), keep=0.25)
    assert pruner.budget_stage == "merge" and [layer for layer, _ in pruner.bound] == [20]
    assert pruner._inner_share() == pytest.approx(0.8)
    pruner = PresetPruner(load_preset("flashvid"), fake_adapter(36), keep=0.25)  # Qwen3-VL-8B depth
    assert [layer for layer, _ in pruner.bound] == [26]


# --- every family, end to end -----------------------------------------------------------------

QUESTION = "what happens in this video ?"
BUILDERS = FAMILY_BUILDERS
UNITS = {"llava": 8, "qwen": 4, "smol": 8}  # frame units at --frames 8 (Qwen: 2-frame temporal patches), 16 tokens each


@pytest.fixture(scope="module")
def checkpoints(family_checkpoints):
    return family_checkpoints


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_identity_settings_match_none(run_cli, checkpoints, square_video, family):
    reference = ask_json(run_cli, checkpoints[family], square_video)
    for extra in (["--keep", "1"], ["-P", "merge.ratio=1", "-P", "select.ratio=1"]):
        pruned = ask_json(run_cli, checkpoints[family], square_video, "--prune", "flashvid", *extra)
        assert pruned["stats"]["tokens"]["layer_avg_retention"] == 1.0
        assert pruned["answer"] == reference["answer"]
        assert pruned["stats"]["tokens"]["generated_tokens"] == reference["stats"]["tokens"]["generated_tokens"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_defaults_and_keep_on_every_family(run_cli, checkpoints, square_video, family):
    units = UNITS[family]
    # the tiny models have 4 layers: layer 23/32 -> 3, share (3 + 0.3) / 4 = 0.825
    record = ask_json(run_cli, checkpoints[family], square_video, "--prune", "flashvid")
    tokens = record["stats"]["tokens"]
    # ceil(16 * 0.3125) = 5 per unit (4 ADTS + 1 contextual); 30% of them from layer 3
    assert tokens["visual_tokens_per_stage"] == {"vision encoder": units * 16, "dyseg": units * 16, "merge": units * 5}
    assert record["pruning"]["budget"]["layers"] == {"3": round(0.3 * units * 5)}
    assert record["pruning"]["flashvid"]["per_frame"] == {"selected": 4, "contextual": 1}
    assert record["pruning"]["dyseg"]["segments"] == [[t, t + 1] for t in range(units)]  # min_segments 8 >= units
    record = ask_json(run_cli, checkpoints[family], square_video, "--prune", "flashvid", "--keep", "0.33",
                      "-P", "min_segments=1", "-P", "tau=0")
    budget = record["pruning"]["budget"]
    assert budget["stage"] == "merge" and budget["inner_share"] == 0.825
    assert budget["ratio"] == pytest.approx(0.4, abs=1e-6)  # 0.33 / 0.825
    assert record["pruning"]["flashvid"]["segments"] == [[0, units]]
    per_stage = record["stats"]["tokens"]["visual_tokens_per_stage"]
    assert units * 7 - units <= per_stage["merge"] <= units * 7 + units  # ceil(6.4) = 7 per unit, clusters round up
    assert abs(record["stats"]["tokens"]["layer_avg_retention"] - 0.33) < 0.33 * 0.2


def test_flops_and_keep_beyond_the_in_llm_share(run_cli, checkpoints, square_video):
    """--flops solves the pre-LLM ratio with the in-LLM stage at its 30%; a --keep above the share
    that stage leaves (0.825 on 4 layers) sends every token into the LLM and solves the in-LLM
    ratio: (3 + 1 * r) / 4 = 0.9 -> r = 0.6."""
    record = ask_json(run_cli, checkpoints["llava"], square_video, "--prune", "flashvid", "--flops", "0.3")
    flops = record["stats"]["flops"]
    assert record["pruning"]["budget"]["stage"] == "merge"
    assert abs(flops["paper_fraction"] - 0.3) < 0.08  # a step of one token per frame (1/16), plus the in-LLM rounding
    record = ask_json(run_cli, checkpoints["llava"], square_video, "--prune", "flashvid", "--keep", "0.9")
    tokens = record["stats"]["tokens"]
    assert tokens["visual_tokens_per_stage"]["merge"] == 128
    assert record["pruning"]["budget"]["layers"] == {"3": round(0.6 * 128)}
    assert tokens["layer_avg_retention"] == pytest.approx(0.9, abs=1 / 512)
    assert not any("more than" in note for note in record["notes"])  # no "asks for more than ..." note


def test_listed_with_its_reference(run_cli):
    result = run_cli(["presets", "show", "flashvid"])
    assert result.exit_code == 0 and "Fanziyang-v/FlashVID" in result.stdout
    assert "flashvid" in run_cli(["presets"]).stdout


def test_keep_below_one_token_per_frame_is_refused(run_cli, checkpoints, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", checkpoints["llava"], "--frames", "8",
                      "--prune", "flashvid", "--keep", "0.01"])
    assert_one_line_error(result, "--keep 0.01", "at least 0.052")  # 1/16 x 0.825


def test_a_model_without_vision_attention_is_refused_in_one_line():
    tokens = grid_tokens(torch.randn(2, 4, 3), torch.rand(2, 4))
    tokens.meta.pop("vision_attention")
    with pytest.raises(BadInput, match="vision-encoder attention"):
        ADTSTreeMerge().apply(tokens, request_state())
