"""HoliTom: the released functions' outputs (outer and inner merge), planted static windows,
hot spots and near-copies, the decoder's kept-row update, every family at identity settings and
at the defaults, the --keep/--flops mapping, and the CLI.

tests/fixtures/holitom/holitom_reference.pt was made by the script beside it, which runs the
authors' released methods (cokeshao/HoliTom) on seeded inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILY_FRAMES, ask_json, assert_one_line_error
from helpers import answer_clip, grid_tokens, layer_context, request_state, run_stage

from vidqa.models import load_model
from vidqa.pruning.core.decoder import DecoderPruning, Prefill, Selection
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.methods.holitom import (
    HoliTomMergeStage,
    SimilarityMerge,
    holitom_merge,
    removable_counts,
    sequential_average,
    static_windows,
)
from vidqa.tensors.tokens import weighted_row_means
from vidqa.testing.qwen3 import build_tiny_qwen3_vl
from vidqa.video.decode import load_clip

FIXTURES = Path(__file__).parent / "fixtures" / "holitom"
QUESTION = "what happens in this video ?"
IDENTITY = ["outer.ratio=1", "outer.tau=1.01", "inner.ratio=1"]


def reference(prefix: str) -> dict:
    data = torch.load(FIXTURES / "holitom_reference.pt")
    return {name.split(".", 1)[1]: case for name, case in data.items() if name.startswith(prefix)}


def last_row_context(hidden, visual, last_row_attention, budget, state):
    """What the decoder hands an in-LLM stage at layer 3, with the last row's attention given."""
    probs = torch.zeros(last_row_attention.shape[0], 1, hidden.shape[1])
    probs[:, 0] = last_row_attention

    def attend(rows):
        assert rows.tolist() == [hidden.shape[1] - 1]  # the last prompt row, exactly
        return probs

    return layer_context(hidden, visual, attend, budget, state=state, layer=3)


# --- the released code's outputs ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(reference("outer.")))
def test_outer_merge_reproduces_the_released_functions(name):
    case = reference("outer.")[name]
    p = case["params"]
    features = case["features"]
    result = holitom_merge(features, case["attention"], ratio=p["ratio"], tau=p["tau"], beta=p["beta"], k=p["k"])
    assert [(start, end - 1) for start, end in result.windows] == [tuple(w) for w in case["windows"].tolist()]
    assert result.removed == case["reduced"]
    frames, per_frame, channels = features.shape
    merged = weighted_row_means(features.reshape(-1, channels), result.rows, result.num_rows, result.weight)
    assert merged.shape == case["output"].shape  # same rows, in the released order
    torch.testing.assert_close(merged, case["output"], rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", sorted(reference("inner.")))
def test_inner_merge_reproduces_the_released_loop_bit_for_bit(name):
    case = reference("inner.")[name]
    visual = torch.arange(case["start"], case["start"] + case["image"])
    state = request_state()
    budget = round(case["image"] * (1 - case["r"]))
    selection = SimilarityMerge(ratio=1 - case["r"]).select(
        last_row_context(case["hidden"], visual, case["last_row_attention"], budget, state))
    kept = visual[selection.keep]
    assert torch.equal(kept, case["kept"])
    assert torch.equal(selection.kept_hidden, case["merged_hidden"][0, kept])  # same dtype, same rounding
    inner = state.details["holitom"]["inner"]
    assert inner["kept"] == budget and inner["merged"] == case["image"] - budget
    assert set(inner["into_rows"]) <= set(kept.tolist())
    members, into = state.layer_merges[3]  # what --show-kept draws
    assert members.tolist() == inner["merged_rows"] and into.tolist() == inner["into_rows"]


# --- the segmentation -----------------------------------------------------------------------


def test_windows_follow_the_static_runs_and_respect_max_window():
    # 10 frames, 4 locations: frames 0-3 static at 3 locations, 4-9 static at all 4
    similarity = torch.zeros(9, 4)
    similarity[0:3, :3] = 0.9
    similarity[4:9] = 0.9
    assert removable_counts(similarity, 0.8)[0, 3] == 3 * 3 and removable_counts(similarity, 0.8)[4, 9] == 5 * 4
    assert static_windows(similarity, 0.8, 1024) == ([(0, 4), (4, 10)], 9 + 20)
    windows, removed = static_windows(similarity, 0.8, 3)
    assert max(end - start for start, end in windows) <= 3 and removed == 2 * 3 + 2 * 4 + 2 * 4
    assert static_windows(similarity, 0.95, 1024) == ([(t, t + 1) for t in range(10)], 0)  # nothing static


# --- planted signals ------------------------------------------------------------------------


def planted_clip():
    """8 frames of 16 locations: frames 0-3 a still background with locations 5 and 10 changing,
    frames 4-7 new random content each frame. Location 10 is the attention hot spot."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 16, 12, generator=generator)
    features[1:4] = features[0] + 0.001 * torch.randn(3, 16, 12, generator=generator)
    features[1:4, [5, 10]] = torch.randn(3, 2, 12, generator=generator)
    attention = torch.rand(8, 16, generator=generator)
    attention[:, 10] += 1.0
    return features, attention


def test_static_background_merges_and_hot_spots_survive():
    features, attention = planted_clip()
    out, state = run_stage(HoliTomMergeStage(ratio=0.3, tau=0.65), grid_tokens(features, attention))
    outer = state.details["holitom"]["outer"]
    assert outer["windows"] == [[0, 4], [4, 5], [5, 6], [6, 7], [7, 8]]
    assert outer["static_removed"] == 14 * 3  # 14 still locations merged over 4 frames
    retention = 0.3 / ((128 - 42) / 128)
    assert outer["window_retention"] == pytest.approx(retention, abs=1e-6)
    static_rows = round(14 * retention)
    assert outer["static_rows"] == static_rows
    # the still window: its static clusters sit in its first frame, then each frame keeps the hot spot
    first = out.frame[:static_rows]
    assert first.tolist() == [0] * static_rows
    dynamic = out.select(torch.arange(static_rows, static_rows + 4))
    assert dynamic.frame.tolist() == [0, 1, 2, 3] and (dynamic.row * 4 + dynamic.col).tolist() == [10] * 4
    torch.testing.assert_close(dynamic.features, features[0:4, 10])  # kept tokens unchanged
    # the moving frames keep ceil(16 * retention) tokens each, the most attended ones
    per_frame = -(-16 * retention // 1)
    for frame in range(4, 8):
        locations = (out.row * 4 + out.col)[out.frame == frame]
        assert len(locations) == per_frame
        assert set(locations.tolist()) == set(torch.topk(attention[frame], int(per_frame)).indices.tolist())
    assert len(out) == static_rows + 4 + 4 * per_frame


def test_context_share_clusters_part_of_each_frames_dynamic_budget():
    features, attention = planted_clip()
    result = holitom_merge(features, attention, ratio=0.3, tau=0.65, context_share=0.5)
    budget = -(-16 * result.retention // 1)  # ceil(16 r') per moving frame
    for frame in range(4, 8):
        members = result.rows.view(8, 16)[frame]
        assert int((members >= 0).sum()) == 16  # every token joins a row: half kept, the rest merged
        assert len(members.unique()) == budget
    merged = weighted_row_means(features.reshape(128, -1), result.rows, result.num_rows, result.weight)
    assert merged.shape[0] == result.num_rows and torch.isfinite(merged).all()


def test_a_merged_static_token_is_beta_centre_plus_mean_of_its_members():
    features, attention = planted_clip()
    out, state = run_stage(HoliTomMergeStage(ratio=0.05, tau=0.65, beta=0.6), grid_tokens(features, attention))
    assert state.details["holitom"]["outer"]["static_rows"] == round(14 * 0.05 / (86 / 128)) == 1
    still = [location for location in range(16) if location not in (5, 10)]
    averaged = features[0:4, still].mean(dim=0)  # (14, C)
    centre = still.index(int(out.row[0] * 4 + out.col[0]))
    others = torch.cat([averaged[:centre], averaged[centre + 1:]])
    torch.testing.assert_close(out.features[0], 0.6 * averaged[centre] + 0.4 * others.mean(dim=0), rtol=0, atol=1e-5)


def test_inner_merge_sends_a_near_copy_to_its_original():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 12, 8, generator=generator)
    visual = torch.arange(2, 10)  # 8 visual rows
    hidden[0, 7] = hidden[0, 3] + 0.01 * torch.randn(8, generator=generator)  # a near-copy of row 3
    attention = torch.full((2, 12), 0.01)
    attention[:, [3, 4, 5, 8]] = 0.2  # the last row attends to rows 3, 4, 5, 8
    state = request_state()
    selection = SimilarityMerge(ratio=0.5).select(last_row_context(hidden, visual, attention, 4, state))
    assert visual[selection.keep].tolist() == [3, 4, 5, 8]
    inner = state.details["holitom"]["inner"]
    assert dict(zip(inner["merged_rows"], inner["into_rows"]))[7] == 3
    members = [row for row, into in zip(inner["merged_rows"], inner["into_rows"]) if into == 3]
    expected = hidden[0, 3]
    for row in members:  # averaged in one at a time, in sequence order
        expected = (expected + hidden[0, row]) / 2
    torch.testing.assert_close(selection.kept_hidden[0], expected)


def test_sequential_average_matches_the_one_at_a_time_loop():
    generator = torch.Generator().manual_seed(2)
    kept, pruned = torch.randn(4, 6, generator=generator), torch.randn(9, 6, generator=generator)
    target = torch.tensor([2, 0, 2, 2, 1, 0, 2, 3, 2])
    expected = kept.clone()
    for i, t in enumerate(target.tolist()):
        expected[t] = (expected[t] + pruned[i]) / 2
    assert torch.equal(sequential_average(kept, pruned, target), expected)


def test_decoder_writes_the_merged_states_of_the_kept_rows():
    hidden = torch.arange(6 * 3, dtype=torch.float32).view(1, 6, 3)
    is_visual = torch.tensor([False, True, True, True, False, False])
    pruning = DecoderPruning.__new__(DecoderPruning)
    cos = sin = torch.zeros(1, 6, 4)
    pruning._prefill = Prefill(row_source=torch.arange(6), is_visual=is_visual, visual_meta={},
                                full_position_embeddings=(cos, sin))
    new_states = torch.full((2, 3), -1.0)
    out = pruning._apply(Selection(keep=torch.tensor([0, 2]), kept_hidden=new_states), hidden, is_visual.nonzero().flatten())
    assert out.shape == (1, 5, 3)
    assert torch.equal(out[0, [1, 2]], new_states)  # visual rows 1 and 3 hold the merged states
    assert torch.equal(out[0, [0, 3, 4]], hidden[0, [0, 4, 5]])
    assert pruning._prefill.row_source.tolist() == [0, 1, 3, 4, 5]


# --- every family ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_identity_settings_match_none(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    expected = answer_clip(adapter, clip)
    pruned = answer_clip(adapter, clip, build_pruner(load_preset("holitom", IDENTITY), adapter))
    assert pruned.stats.tokens.layer_avg_retention == 1.0
    assert pruned.text == expected.text
    assert pruned.stats.tokens.generated_tokens == expected.stats.tokens.generated_tokens


@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_defaults_merge_outside_and_halve_inside(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    answer = answer_clip(adapter, clip, build_pruner(load_preset("holitom"), adapter))
    per_layer = answer.stats.tokens.visual_tokens_per_layer
    entering = answer.stats.tokens.visual_tokens_per_stage["outer"]
    layer = SimilarityMerge().resolved_layer(len(per_layer))  # 3 of the tiny models' 4
    assert per_layer == [entering] * layer + [round(entering * 0.5)] * (len(per_layer) - layer)
    details = answer.details["holitom"]
    assert details["outer"]["static_rows"] + details["outer"]["dynamic_rows"] == entering
    assert details["inner"]["layer"] == layer and len(details["inner"]["merged_rows"]) == entering - per_layer[-1]
    assert answer.stats.tokens.generated_tokens > 0


def test_outer_merge_carries_deepstack_rows_with_the_same_weights():
    features, attention = planted_clip()
    tokens = grid_tokens(features, attention)
    deepstack = torch.randn(3, len(tokens), 12, generator=torch.Generator().manual_seed(4))
    tokens = tokens.replace(deepstack=deepstack)
    out, _ = run_stage(HoliTomMergeStage(ratio=0.3, tau=0.65), tokens)
    result = holitom_merge(features, attention, ratio=0.3, tau=0.65)
    for layer in range(3):
        torch.testing.assert_close(out.deepstack[layer],
                                   weighted_row_means(deepstack[layer], result.rows, result.num_rows, result.weight))


def test_qwen3_vl_runs_both_merges(tmp_path_factory, square_video):
    """On Qwen3-VL (vision attention from its last block, DeepStack rows merged with the same
    weights) the full preset merges before the LLM and halves what is left from layer K."""
    adapter = load_model(str(build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3_vl"))), device="cpu",
                         dtype="float32", max_pixels=128 * 128)
    clip = load_clip(square_video, num_frames=8)
    answer = answer_clip(adapter, clip, build_pruner(load_preset("holitom", ["outer.ratio=0.5"]), adapter))
    entering = answer.stats.tokens.visual_tokens_per_layer
    assert entering[0] < 64 and entering[3] == round(entering[0] * 0.5)
    assert answer.details["holitom"]["inner"]["merged"] == entering[0] - entering[3]
    assert answer.stats.tokens.generated_tokens > 0


# --- budgets and the CLI --------------------------------------------------------------------


def test_keep_is_layer_averaged_and_sets_the_outer_ratio(run_cli, family_checkpoints, square_video):
    # no static windows (tau 1.01): every frame keeps ceil(16 * r) tokens, r = keep / f with
    # f = (3 + 1 * 0.5) / 4 on the tiny 4-layer model (inner merge from layer 3)
    record = ask_json(run_cli, family_checkpoints["llava"], square_video, "--prune", "holitom", "--keep", "0.3",
                      "-P", "outer.tau=1.01")
    assert record["pruning"]["budget"]["ratio"] == pytest.approx(0.3 / 0.875, abs=1e-6)
    tokens = record["stats"]["tokens"]
    assert tokens["visual_tokens_per_layer"] == [48, 48, 48, 24]  # 8 frames x ceil(16 * 0.343) = 6
    record = ask_json(run_cli, family_checkpoints["llava"], square_video, "--prune", "holitom", "--flops", "0.3",
                      "-P", "outer.tau=1.01")
    flops = record["stats"]["flops"]
    one_token_per_frame = flops["paper_vanilla_macs"] / 16 * 1.2  # ceil per frame: steps of 8 tokens
    assert abs(flops["paper_fraction"] - 0.3) * flops["paper_vanilla_macs"] <= one_token_per_frame


def test_cli_end_to_end_reports_windows_and_merges(run_cli, family_checkpoints, square_video):
    record = ask_json(run_cli, family_checkpoints["llava"], square_video, "--prune", "holitom")
    outer, inner = record["pruning"]["holitom"]["outer"], record["pruning"]["holitom"]["inner"]
    assert outer["windows"][0][0] == 0 and outer["windows"][-1][1] == 8
    assert len(inner["merged_rows"]) == len(inner["into_rows"]) == inner["merged"]
    assert record["answer"] is not None
    result = run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints["llava"], "--prune", "holitom",
                      "-P", "outer.tau=2"])
    assert_one_line_error(result, "tau")
    shown = run_cli(["presets", "show", "holitom"])
    assert shown.exit_code == 0 and "cokeshao/HoliTom" in shown.stdout
