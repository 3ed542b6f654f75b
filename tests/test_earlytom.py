"""EarlyTom: the released functions' outputs (frame merge inside the encoder, spatial compression,
inner merge), the stage point inside the vision encoder (hooks, frames per layer, the run-time
check, provenance, FLOPs), planted static frames and hot spots, every family (LLaVA-OneVision and
SmolVLM2 run, Qwen2.5-VL and Qwen3-VL refuse in one line), identity settings, --keep and the CLI.

tests/fixtures/earlytom/earlytom_reference.pt was made by the script beside it, which runs the
authors' released functions (viridisGreen/EarlyTom) on seeded inputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from conftest import ask_json, assert_one_line_error
from helpers import QUESTION, answer_clip, layer_context, request_state
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vidqa.engine import request as engine
from vidqa.engine.session import VideoSession
from vidqa.errors import BadInput
from vidqa.flops import VisionShape, macs_to_flops, shapes_from_model_config, vision_encoder_macs
from vidqa.models import load_model
from vidqa.models.encoder_stages import FrameStageRun
from vidqa.models.vision_attention import bilinear_pool
from vidqa.pruning.core.compat import PruningMismatch
from vidqa.pruning.core.encoder import encode_inside
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.core.provenance import KEPT
from vidqa.pruning.methods.earlytom import (
    SEGMENT,
    EarlyTomFrames,
    EarlyTomSpatial,
    compress_frames,
    ema_segments,
    mix_segments,
    segment_meta,
    spatial_keep,
)
from vidqa.pruning.methods.holitom import SimilarityMerge
from vidqa.render.show_kept import MERGED_AWAY, cell_roles
from vidqa.tensors.frames import EncoderTrace, FrameMerge, FrameTrack, frame_tokens
from vidqa.testing.builders import build_tiny_llava_onevision
from vidqa.testing.families import build_tiny_smolvlm
from vidqa.testing.qwen3 import build_tiny_qwen3_vl
from vidqa.testing.videos import write_video
from vidqa.video.decode import load_clip

FIXTURES = Path(__file__).parent / "fixtures" / "earlytom"
IDENTITY = ["frames.tau=1.01", "spatial.ratio=1", "inner.ratio=1"]


def reference(prefix: str) -> dict:
    data = torch.load(FIXTURES / "earlytom_reference.pt")
    return {name.split(".", 1)[1] if "." in name else name: case for name, case in data.items()
            if name.startswith(prefix)}


def half_open(selected: torch.Tensor) -> list[tuple[int, int]]:
    """Their inclusive (start, end) frame ranges as vidqa's half-open ones."""
    return [(start, end + 1) for start, end in selected.tolist()]


# --- the released code's outputs ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(reference("compression.")))
def test_frame_merge_reproduces_the_released_compression(name):
    case = reference("compression.")[name]
    p = case["params"]
    result = compress_frames(case["hidden"], p["tau"], p["ema"], p["M"], p["last"])
    torch.testing.assert_close(result.merge.apply(case["hidden"]), case["frames"], rtol=0, atol=2e-6)
    torch.testing.assert_close(result.merge.apply(case["attention"]), case["mixed_attention"], rtol=0, atol=2e-6)
    segments = result.refined if p["last"] else result.segments  # what their compression returns
    assert segments == half_open(case["selected"])


def test_frame_stage_over_several_layers_reproduces_their_encoder_loop():
    case = reference("chain")["chain"]
    p = case["params"]
    stage = EarlyTomFrames(tau=p["tau"], max_window=p["M"], ema=p["ema"])
    state = request_state()
    hidden, received = case["hidden"], None
    steps = case["prune_steps"]
    for step, weight in enumerate(case["weights"]):
        hidden = torch.tanh(hidden @ weight)
        attention = (hidden @ hidden.transpose(1, 2)).softmax(dim=-1).mean(dim=1)  # received, (F, S)
        if step in steps:
            merge = stage.apply(hidden, step, step == steps[-1], state)
            hidden, received = merge.apply(hidden), merge.apply(attention)
    torch.testing.assert_close(hidden, case["frames"], rtol=0, atol=2e-6)
    torch.testing.assert_close(received, case["mixed_attention"], rtol=0, atol=2e-6)
    details = state.details["earlytom"]
    assert [tuple(s) for s in details["segments"]] == half_open(case["selected"])
    assert [record["layer"] for record in details["frames"]] == steps
    assert merge.meta[SEGMENT].tolist() == segment_meta(half_open(case["selected"]), "cpu")[SEGMENT].tolist()


def spatial_tokens(features, attention, side, init_frames, segments):
    """The tokens `earlytom_frames` hands on for M frames left of `init_frames`: pooled features,
    attention and segment meta on the unpruned grid."""
    pooled = bilinear_pool(features, side)  # (M, P, C), as LLaVA-OV's apply_pooling
    frames_left, per_frame, _ = pooled.shape
    out = -(-side // 2)
    track = FrameTrack(origin=torch.cat([torch.arange(frames_left), torch.full((init_frames - frames_left,), -1)]),
                       representative=torch.arange(frames_left), meta=segment_meta(segments, "cpu"))
    seq_index = torch.arange(init_frames * per_frame) + 3
    tokens = frame_tokens(pooled.reshape(-1, pooled.shape[-1]), (init_frames, out, out), seq_index, track)
    tokens.meta["vision_attention"] = bilinear_pool(attention, side).reshape(-1)
    return tokens


@pytest.mark.parametrize("name", sorted(reference("spatial.")))
def test_spatial_stage_reproduces_the_released_compression(name):
    case = reference("spatial.")[name]
    tokens = spatial_tokens(case["features"], case["attention"], case["side"], case["init_frames"],
                            half_open(case["selected"]))
    state = request_state()
    out = EarlyTomSpatial(ratio=case["ratio"]).apply(tokens, state)
    assert out.features.shape == case["output"].shape  # same tokens, in the released order
    torch.testing.assert_close(out.features, case["output"], rtol=0, atol=1e-6)
    assert torch.all(out.frame[1:] >= out.frame[:-1])  # frame order, raster order within a frame
    spatial = state.details["earlytom"]["spatial"]
    assert spatial["frames"] == len(case["features"])


@pytest.mark.parametrize("name", sorted(reference("inner.")))
def test_inner_merge_is_holitoms_and_reproduces_their_copy_bit_for_bit(name):
    case = reference("inner.")[name]
    hidden = case["hidden"]
    visual = torch.arange(case["start"], case["start"] + case["image"])
    budget = round(case["image"] * (1 - case["r"]))
    probs = torch.zeros(case["last_row_attention"].shape[0], 1, hidden.shape[1])
    probs[:, 0] = case["last_row_attention"]
    context = layer_context(hidden, visual, lambda rows: probs, budget, layer=3)
    selection = SimilarityMerge(ratio=1 - case["r"]).select(context)
    kept = visual[selection.keep]
    assert torch.equal(kept, case["kept"])
    assert torch.equal(selection.kept_hidden, case["merged_hidden"][0, kept])


# --- the algorithm on planted inputs ------------------------------------------------------------


def test_segments_cut_on_change_and_before_m_frames():
    # frames 0-5 alike (cosine 0.95), frames 6-7 unlike anything (0.0)
    similarity = [[0.95 if (i < 6 and j < 6) or i == j else 0.0 for j in range(8)] for i in range(8)]
    assert ema_segments(similarity, tau=0.3, ema=0.9, max_window=6) == [(0, 5), (5, 6), (6, 7), (7, 8)]
    assert ema_segments(similarity, tau=0.3, ema=0.9, max_window=100) == [(0, 6), (6, 7), (7, 8)]
    assert ema_segments(similarity, tau=1.01, ema=0.9, max_window=100) == [(t, t + 1) for t in range(8)]


def test_mixing_pairs_middle_frames_and_drops_the_last_middle_frame():
    # one segment of 6 frames: first and last stay; middle frames 1-4, adjacent cosines
    # c(1,2) = 0.9 > c(2,3) = 0.5 and > tau' = c(0,5) = 0.4: 1 and 2 mix with w = 0.9 / 1.4;
    # then j = 2 (frame 3) is the last pair: c(3,4) = 0.3 < tau', frame 3 alone, frame 4 dropped
    similarity = [[1.0] * 6 for _ in range(6)]
    similarity[0][5] = 0.4
    for (a, b), value in {(1, 2): 0.9, (2, 3): 0.5, (3, 4): 0.3}.items():
        similarity[a][b] = similarity[b][a] = value
    rows, weights, count = mix_segments(similarity, [(0, 6)])
    assert count == 4
    assert rows == [0, 1, 1, 2, -1, 3]
    assert weights[1] == pytest.approx(0.9 / 1.4) and weights[2] == pytest.approx(0.5 / 1.4)
    # short segments stay whole
    assert mix_segments(similarity, [(0, 2), (2, 3), (3, 6)])[0] == [0, 1, 2, 3, 4, 5]


def test_spatial_keep_takes_hot_spots_on_dynamic_frames_and_one_per_window_on_static_ones():
    attention = torch.rand(3, 16, generator=torch.Generator().manual_seed(0))
    attention[0, [3, 12]] = 5.0  # hot spots of a dynamic frame
    attention[1, [0, 9]] = 5.0  # a static frame's hot spots fall in windows 0 and 2 of 4
    keep = spatial_keep(attention, torch.tensor([True, False, True]), retention=0.125)  # ceil(2) / round(2)
    assert keep[0].nonzero().flatten().tolist() == [3, 12]
    assert keep[1].nonzero().flatten().tolist() == [0, 9]  # windows [0-7] and [8-15]: one each
    assert keep.sum(dim=1).tolist() == [2, 2, 2]
    # 5 windows of 16 tokens: 4, 3, 3, 3, 3 (the first 16 mod 5 windows one longer)
    keep = spatial_keep(torch.arange(16.0)[None], torch.tensor([False]), retention=5 / 16)
    assert keep[0].nonzero().flatten().tolist() == [3, 6, 9, 12, 15]


def test_frame_merge_and_track_follow_every_original_frame():
    merge = FrameMerge(torch.tensor([0, 1, 1, -1, 2]), torch.tensor([1.0, 0.25, 0.75, 0.0, 1.0]), 3)
    x = torch.arange(5.0)[:, None].expand(5, 4)
    assert merge.apply(x)[:, 0].tolist() == [0.0, 0.25 * 1 + 0.75 * 2, 4.0]
    track = FrameTrack.start(5).after(merge)
    assert track.origin.tolist() == [0, 1, 1, -1, 2] and track.representative.tolist() == [0, 1, 4]
    second = FrameMerge(torch.tensor([0, 0, 1]), torch.tensor([0.5, 0.5, 1.0]), 2, meta={"s": torch.tensor([7, 8])})
    track = track.after(second)
    assert track.origin.tolist() == [0, 0, 0, -1, 1] and track.representative.tolist() == [0, 4]
    tokens = frame_tokens(torch.zeros(2 * 4, 3), (5, 2, 2), torch.arange(20) + 10, track)
    assert tokens.frame.tolist() == [0] * 4 + [4] * 4 and tokens.seq_index[4:].tolist() == [26, 27, 28, 29]
    assert tokens.origin.view(5, 4)[:, 1].tolist() == [1, 1, 1, -1, 5]
    assert tokens.meta["s"].tolist() == [7] * 4 + [8] * 4


# --- the stage point inside the encoder ----------------------------------------------------------


class PairPlan:
    """Merges frames pairwise (means) after `layer`, as an in-encoder stage would."""

    carries_attention = False

    def __init__(self, layer):
        self.layer = layer

    def layers(self, depth):
        return [self.layer]

    def after_layer(self, hidden, layer):
        frames = hidden.shape[0]
        return FrameMerge(torch.arange(frames) // 2, torch.full((frames,), 0.5), (frames + 1) // 2)


def counted_flops(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_encoder_flops_with_frames_merged_match_flop_counter():
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                             num_attention_heads=4, image_size=56, patch_size=14,
                                             vision_use_head=False, attn_implementation="sdpa")
    model = transformers.SiglipVisionModel(config).eval()
    vshape = VisionShape.from_config(config)
    pixels = torch.randn(6, 3, 56, 56)
    layers = getattr(model, "vision_model", model).encoder.layers
    run = FrameStageRun(layers, PairPlan(1), 6, depth=4)

    def forward():
        with run:
            model(pixel_values=pixels)

    counted = counted_flops(forward)
    trace = run.trace(run.track.num_frames)
    assert trace.frames_per_layer == [6, 6, 3, 3, 3] and trace.fired == [1]
    predicted = macs_to_flops(vision_encoder_macs(vshape, 6, images_per_layer=trace.frames_per_layer))
    assert abs(counted - predicted) <= 0.02 * counted
    assert predicted < macs_to_flops(vision_encoder_macs(vshape, 6))
    with pytest.raises(ValueError, match="entries"):
        vision_encoder_macs(vshape, 6, images_per_layer=[6, 3])


def deep_checkpoint(adapter) -> str:
    """The folder a `deep` model was loaded from."""
    return adapter.model.config._name_or_path


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """LLaVA-OneVision and SmolVLM2 with 4-layer towers (the family models have one layer)."""
    llava = build_tiny_llava_onevision(tmp_path_factory.mktemp("earlytom-llava"), vision_layers=4)
    smol = build_tiny_smolvlm(tmp_path_factory.mktemp("earlytom-smol"), vision_layers=4)
    return {name: load_model(str(path), device="cpu", dtype="float32") for name, path in
            {"llava": llava, "smol": smol}.items()}


@pytest.fixture(scope="module")
def still_then_moving(tmp_path_factory):
    """8 frames: 0-5 one still picture, 6 and 7 new content each."""
    generator = np.random.default_rng(0)
    still = generator.integers(0, 256, (1, 112, 112, 3), dtype=np.uint8)
    frames = np.concatenate([np.repeat(still, 6, axis=0), generator.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)])
    return write_video(tmp_path_factory.mktemp("earlytom-video") / "still.mp4", frames, fps=4.0)


@pytest.mark.parametrize("family", ["llava", "smol"])
def test_identity_plan_gives_the_encoders_own_tokens(deep, square_video, family):
    adapter = deep[family]
    prompt = adapter.prompt_for_clip(load_clip(square_video, num_frames=8 if family == "llava" else 4), QUESTION)
    with torch.inference_mode():
        expected = adapter.encode_video_with_attention(prompt, -1)
        plan = SimpleNamespace(carries_attention=True, layers=lambda depth: [depth - 1],
                               after_layer=lambda hidden, layer: None)
        tokens, trace = adapter.encode_video_inside(prompt, plan)
    assert torch.equal(tokens.features, expected.features) and torch.equal(tokens.fixed_features, expected.fixed_features)
    assert torch.equal(tokens.seq_index, expected.seq_index) and torch.equal(tokens.origin, expected.origin)
    torch.testing.assert_close(tokens.meta["vision_attention"], expected.meta["vision_attention"])
    assert trace.frames_per_layer == [tokens.grid[0]] * 5 and trace.fired == [3]


@pytest.mark.parametrize("family", ["llava", "smol"])
def test_still_frames_merge_inside_the_encoder_and_moving_ones_stay(deep, still_then_moving, family):
    adapter = deep[family]
    clip = load_clip(still_then_moving, num_frames=8)
    preset = load_preset("earlytom", ["frames.layers=8", "frames.tau=0.9", "inner.ratio=1"])
    answer = answer_clip(adapter, clip, build_pruner(preset, adapter))
    frames = answer.details["earlytom"]["frames"]
    assert [record["layer"] for record in frames] == [1]  # 8 of 26 -> round(8 * 4 / 26) = 1
    # the still frames fill a segment of M - 1 = 5; each new frame starts one of its own
    assert frames[0]["segments"] == [[0, 5], [5, 6], [6, 7], [7, 8]]
    left = frames[0]["frames_out"]
    assert 5 <= left < 8
    tokens = answer.stats.tokens
    assert tokens.encoder_frames_per_layer == [8, 8, left, left, left]  # layers 0 and 1 see every frame
    grid = answer.kept.grid
    by_frame = answer.kept.left_at_stage.view(8, grid[1] * grid[2])  # stage 0: "frames"
    assert (by_frame[3] == 0).all()  # the segment's last middle frame never survives alone (as released)
    assert (by_frame[[0, 4, 5, 6, 7]] != 0).all()  # segment ends and the moving frames stay
    assert "vision_encoder" in answer.stats.verified["checks"]


def test_provenance_draws_every_surviving_row_once(deep, still_then_moving, tmp_path, run_cli):
    """Frames mixed inside the encoder share their cells' tokens: kept cells counted once per
    group are the rows reaching the last layer, and the drawing's counts add up."""
    adapter = deep["llava"]
    clip = load_clip(still_then_moving, num_frames=8)
    preset = load_preset("earlytom", ["frames.layers=8", "frames.tau=0.9", "spatial.ratio=0.5"])
    result = answer_clip(adapter, clip, build_pruner(preset, adapter))
    fates, tokens = result.kept, result.stats.tokens
    kept = fates.outcome() == KEPT
    units = int((kept & (fates.group < 0)).sum()) + len(fates.group[kept & (fates.group >= 0)].unique())
    assert units == tokens.visual_tokens_after
    assert len(fates.row[fates.row >= 0].unique()) == tokens.visual_tokens_per_layer[0]
    assert fates.compact()["merge_groups"] > 0  # the still frames mixed pairwise share their tokens
    roles = cell_roles(fates)
    assert sum(roles.tokens_per_frame()) == tokens.visual_tokens_after
    assert [t + m for t, m in zip(roles.tokens_per_frame(), roles.per_frame(MERGED_AWAY))] == \
        fates.compact()["kept_per_frame"]
    out = tmp_path / "kept.png"
    shown = run_cli(["ask", still_then_moving, QUESTION, "--model", deep_checkpoint(adapter), "--frames", "8",
                     "--max-new-tokens", "2", "--prune", "earlytom", "--show-kept", out])
    assert shown.exit_code == 0, shown.stderr
    assert out.stat().st_size > 0


# --- every family -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "smol"])
def test_identity_settings_match_none(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    expected = answer_clip(adapter, clip)
    pruned = answer_clip(adapter, clip, build_pruner(load_preset("earlytom", IDENTITY), adapter))
    assert pruned.stats.tokens.layer_avg_retention == 1.0
    assert pruned.text == expected.text
    assert pruned.stats.tokens.generated_tokens == expected.stats.tokens.generated_tokens
    assert pruned.stats.flops.vision_encoder_macs == expected.stats.flops.vision_encoder_macs


@pytest.mark.parametrize("family", ["llava", "smol"])
def test_defaults_run_with_counts_provenance_flops_and_the_check(deep, square_video, family):
    adapter = deep[family]
    clip = load_clip(square_video, num_frames=8)
    none = answer_clip(adapter, clip)
    answer = answer_clip(adapter, clip, build_pruner(load_preset("earlytom"), adapter))
    tokens = answer.stats.tokens
    stages = tokens.visual_tokens_per_stage
    assert list(stages) == ["vision encoder", "frames", "spatial"]
    grid = answer.kept.grid
    per_frame = grid[1] * grid[2]
    assert stages["vision encoder"] == tokens.visual_tokens_before == 8 * per_frame
    left = answer.details["earlytom"]["frames"][-1]["frames_out"]
    assert stages["frames"] == left * per_frame
    assert tokens.encoder_frames_per_layer[-1] == left
    # the spatial stage keeps about ratio of the clip: dynamic frames ceil, static frames round
    spatial = answer.details["earlytom"]["spatial"]
    dynamic = spatial["dynamic_frames"]
    assert stages["spatial"] == dynamic * spatial["per_dynamic_frame"] + (left - dynamic) * spatial["per_static_frame"]
    assert spatial["frame_retention"] == pytest.approx(min(0.1 * 8 / left, 1), abs=1e-6)
    # the inner merge halves them from its layer on
    layer = SimilarityMerge(layer=21).resolved_layer(len(tokens.visual_tokens_per_layer))
    assert tokens.visual_tokens_per_layer[layer:] == [round(stages["spatial"] * 0.5)] * (len(tokens.visual_tokens_per_layer) - layer)
    # provenance: every original token is kept, merged into a kept one, or dropped somewhere
    kept = answer.kept.compact()
    assert sum(kept["dropped_by_stage"].values()) == sum(kept["dropped_before_llm_per_frame"])
    assert (sum(kept["kept_per_frame"]) + sum(kept["dropped_before_llm_per_frame"])
            + sum(kept["dropped_in_llm_per_frame"])) == 8 * per_frame
    assert kept["cells_per_layer"][0] == int((answer.kept.row >= 0).sum())
    # FLOPs: the encoder's layers after the merge counted for the frames left
    _, vision = shapes_from_model_config(adapter.model.config)
    llm_hidden = adapter.text_config.hidden_size
    assert answer.stats.flops.vision_encoder_macs == vision_encoder_macs(
        vision, 8, projector_hidden=llm_hidden, images_per_layer=tokens.encoder_frames_per_layer)
    if left < 8:
        assert answer.stats.flops.vision_encoder_macs < none.stats.flops.vision_encoder_macs
    assert answer.stats.verified["checks"][0] == "vision_encoder"


@pytest.mark.parametrize("family", ["qwen", "qwen3"])
def test_qwen_towers_refuse_in_one_line(family_adapters, tmp_path_factory, family):
    adapter = family_adapters["qwen"] if family == "qwen" else load_model(
        str(build_tiny_qwen3_vl(tmp_path_factory.mktemp("earlytom-qwen3"))), device="cpu", dtype="float32",
        max_pixels=128 * 128)
    with pytest.raises(BadInput, match="LLaVA-OneVision and SmolVLM2") as error:
        build_pruner(load_preset("earlytom"), adapter)
    assert "\n" not in str(error.value) and adapter.family in str(error.value)


def test_cli_refuses_qwen_and_reports_the_encoder_stage(run_cli, family_checkpoints, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints["qwen"], "--prune", "earlytom"])
    assert_one_line_error(result, "earlytom", "Qwen2.5-VL")
    record = ask_json(run_cli, family_checkpoints["llava"], square_video, "--prune", "earlytom")
    tokens = record["stats"]["tokens"]
    assert list(tokens["visual_tokens_per_stage"]) == ["vision encoder", "frames", "spatial"]
    assert len(tokens["encoder_frames_per_layer"]) == 2  # the family model's 1-layer tower: in, out
    assert record["stats"]["verified"]["checks"][0] == "vision_encoder"
    assert record["pruning"]["earlytom"]["frames"][0]["layer"] == 0
    result = run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints["llava"], "--prune", "earlytom",
                      "-P", "frames.layers=8,x"])
    assert_one_line_error(result, "frames.layers")
    shown = run_cli(["presets", "show", "earlytom"])
    assert shown.exit_code == 0 and "viridisGreen/EarlyTom" in shown.stdout


def test_keep_sets_the_clip_retention_of_the_spatial_stage(deep, square_video):
    adapter = deep["llava"]
    clip = load_clip(square_video, num_frames=8)
    # no inner merge (share 1): --keep 0.25 asks a quarter of the clip's 128 tokens
    answer = answer_clip(adapter, clip, build_pruner(load_preset("earlytom", ["inner.ratio=1"]), adapter, keep=0.25))
    left = answer.details["earlytom"]["frames"][-1]["frames_out"]
    retention = answer.details["earlytom"]["spatial"]["frame_retention"]
    assert retention == pytest.approx(min(0.25 * 8 / left, 1), abs=1e-6)
    assert answer.details["budget"]["ratio"] == pytest.approx(retention, abs=1e-6)  # of the tokens entering it
    assert abs(answer.stats.tokens.visual_tokens_per_stage["spatial"] - 0.25 * 128) <= left  # rounding per frame


# --- the run-time check and the engine paths ---------------------------------------------------


def test_a_stage_whose_hooks_did_not_run_stops_the_request(deep, square_video):
    adapter = deep["llava"]
    prompt = adapter.prompt_for_clip(load_clip(square_video, num_frames=8), QUESTION)
    stage = load_preset("earlytom").stages[0][1]
    real = adapter.encode_video_inside

    def silent(prompt, plan):  # as if transformers ran its layers without our hooks
        plan.layers(4)
        tokens, trace = real(prompt, SimpleNamespace(carries_attention=True, layers=lambda depth: [3],
                                                     after_layer=lambda hidden, layer: None))
        return tokens, EncoderTrace(frames_per_layer=trace.frames_per_layer, fired=[])

    fake = SimpleNamespace(encode_video_inside=silent)
    with torch.inference_mode(), pytest.raises(PruningMismatch, match="did not run after vision-encoder layers"):
        encode_inside(fake, prompt, "frames", stage, request_state(), "earlytom")

    def wrong_count(prompt, plan):
        tokens, trace = real(prompt, plan)
        return tokens, EncoderTrace(frames_per_layer=[8] * 5, fired=trace.fired)

    fake = SimpleNamespace(encode_video_inside=wrong_count)
    with torch.inference_mode(), pytest.raises(PruningMismatch, match="frames, planned"):
        encode_inside(fake, prompt, "frames", stage.__class__(layers="10", tau=0.0, max_window=100), request_state(), "earlytom")


def test_encoding_is_never_shared_across_presets(deep, square_video):
    adapter = deep["llava"]
    clip = load_clip(square_video, num_frames=8)
    cache: dict = {}
    options = engine.GenerationOptions(max_new_tokens=3)
    pruned = engine.answer(adapter, clip, QUESTION, options, pruner=build_pruner(load_preset("earlytom"), adapter),
                           encoded_cache=cache)
    assert cache == {}  # the preset's own encoding
    plain = engine.answer(adapter, clip, QUESTION, options, encoded_cache=cache)
    assert len(cache[id(clip)]) == 128 and plain.stats.tokens.encoder_frames_per_layer == []
    assert pruned.stats.tokens.visual_tokens_per_stage["vision encoder"] == 128


def test_session_reuses_the_prefix_of_a_question_agnostic_variant(deep, square_video, tmp_path):
    preset = (Path(__file__).parents[1] / "presets" / "earlytom.yaml").read_text()
    custom = tmp_path / "earlytom_outer.yaml"
    custom.write_text(preset.replace("name: earlytom", "name: earlytom_outer", 1).split("  - name: inner")[0])
    adapter = deep["smol"]
    clip = load_clip(square_video, num_frames=4)
    session = VideoSession(adapter, clip, build_pruner(load_preset(str(custom)), adapter),
                           engine.GenerationOptions(max_new_tokens=3))
    assert session.reuse
    first, second = session.ask(QUESTION), session.ask("what color is it ?")
    assert second.stats.prefix_reused
    for result in (first, second):
        assert result.stats.tokens.encoder_frames_per_layer == first.stats.tokens.encoder_frames_per_layer
        assert result.stats.flops.vision_encoder_macs == first.stats.flops.vision_encoder_macs
    direct = answer_clip(adapter, clip, build_pruner(load_preset(str(custom)), adapter), max_new_tokens=3)
    assert first.text == direct.text


def test_layers_scale_to_the_tower_depth():
    stage = EarlyTomFrames(layers="8,21,23")
    assert stage.resolved_layers(26) == [8, 21, 23]
    assert stage.resolved_layers(12) == [4, 10, 11]  # SmolVLM2-256M/500M's SigLIP-B
    assert stage.resolved_layers(1) == [0]
    with pytest.raises(BadInput, match="layers"):
        EarlyTomFrames(layers="eight")
    assert math.isclose(load_preset("earlytom").typical_keep, 0.1 * (18 + 10 * 0.5) / 28, abs_tol=1e-3)
