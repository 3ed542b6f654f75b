"""VisionZip: the released functions' outputs reproduced, parity with `none`, a planted
vision-attention hot spot kept, --keep/--flops, and CLI runs on every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from helpers import grid_tokens, request_state

from vidqa.models import load_model
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.methods.visionzip import VisionZip, zip_tokens
from vidqa.testing.builders import build_tiny_llava_onevision
from vidqa.testing.families import build_tiny_qwen2_5_vl, build_tiny_smolvlm
from vidqa.video.decode import load_clip

FIXTURES = Path(__file__).parent / "fixtures" / "visionzip"
QUESTION = "what happens in this video ?"
BUILDERS = {"llava": build_tiny_llava_onevision, "qwen": build_tiny_qwen2_5_vl, "smol": build_tiny_smolvlm}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(f"vz-{name}")) for name, build in BUILDERS.items()}


# --- the released functions, reproduced ------------------------------------------------------
def test_reproduces_the_siglip_video_port():
    """LLaVA-OneVision port (no CLS): mean attention received picks the dominant tokens; the
    contextual rows (target + mean of joiners) are equal to the released function's."""
    for case in torch.load(FIXTURES / "siglip_video.pt")["cases"]:
        ours = zip_tokens(case["hidden"], case["attention"], case["metric"], case["dominant"], case["contextual"])
        dominant = case["dominant"]
        if case["output"] is None:  # the port cannot run without contextual tokens; we keep the dominant ones
            assert ours.features.shape == (3, dominant, 16)
            continue
        torch.testing.assert_close(ours.features, case["output"], atol=1e-6, rtol=1e-6)
        # the kept set: the released output's dominant rows are exactly the inputs we keep, in order
        kept_rows = case["hidden"].gather(1, ours.dominant[..., None].expand(-1, -1, 16))
        assert torch.equal(case["output"][:, :dominant], kept_rows)
        top = case["attention"].topk(dominant, dim=1).indices.sort(dim=1).values
        assert torch.equal(ours.dominant, top)


def test_reproduces_the_authors_clip_function():
    """The authors' CLIP code: CLS + the patches its row attends to most (summed over heads), then
    the same contextual merging of the rest. Our zip on the patches, with the CLS prepended as
    they do, gives their output and their kept set."""
    for case in torch.load(FIXTURES / "clip_cls.pt")["cases"]:
        attentions, hidden, metric = case["attentions"], case["hidden"], case["metric"]
        cls_scores = attentions[:, :, 0, 1:].sum(dim=1)  # (B, patches)
        ours = zip_tokens(hidden[:, 1:], cls_scores, metric[:, 1:], case["dominant"], case["contextual"])
        expected = case["output"]
        torch.testing.assert_close(torch.cat([hidden[:, :1], ours.features], dim=1), expected, atol=1e-6, rtol=1e-6)
        cls = torch.zeros(hidden.shape[0], 1, dtype=torch.long)
        assert torch.equal(case["all_indices"].sort(dim=1).values, torch.cat([cls, ours.dominant + 1], dim=1))


def test_assignment_covers_every_token():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 20, 4, generator=generator)
    zipped = zip_tokens(features, torch.rand(2, 20, generator=generator), torch.randn(2, 20, 3, generator=generator), 5, 3)
    assert zipped.features.shape == (2, 8, 4)
    assert ((zipped.assignment >= 0) & (zipped.assignment < 8)).all()
    for frame in range(2):  # contextual row = its target + mean of the others assigned to it
        for slot in range(3):
            members = (zipped.assignment[frame] == 5 + slot).nonzero().flatten()
            target = int(zipped.targets[frame, slot])
            others = members[members != target]
            expected = features[frame, target] + (features[frame, others].mean(0) if len(others) else 0)
            torch.testing.assert_close(zipped.features[frame, 5 + slot], expected)


def test_counts_follow_the_authors_split():
    stage = VisionZip()
    assert stage.counts(576, 64 / 576) == (54, 10)
    assert stage.counts(576, 128 / 576) == (108, 20)
    assert stage.counts(576, 192 / 576) == (162, 30)
    assert stage.counts(196, 0.25) == (41, 8)
    assert stage.counts(16, 0.0) == (0, 1)  # at least one token per frame
    assert stage.kept_at_retention(3 * 196, (3, 14, 14), 0.25) == 3 * 49


# --- parity, planted signal, budgets ----------------------------------------------------------
def _ask(run_cli, checkpoint, video, *extra):
    result = run_cli(["ask", video, QUESTION, "--model", checkpoint, "--frames", "8", "--max-new-tokens", "6",
                      "--json", *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_identity_settings_match_none(run_cli, checkpoints, square_video, family):
    reference = _ask(run_cli, checkpoints[family], square_video)
    zipped = _ask(run_cli, checkpoints[family], square_video,
                  "--prune", "visionzip", "-P", "ratio=1", "-P", "dominant_share=1")
    assert zipped["stats"]["tokens"]["layer_avg_retention"] == 1.0
    assert zipped["answer"] == reference["answer"]
    assert zipped["stats"]["tokens"]["generated_tokens"] == reference["stats"]["tokens"]["generated_tokens"]


@pytest.mark.parametrize("family,keep", [("llava", 0.25), ("qwen", 0.5), ("smol", 0.125)])
def test_keep_and_flops_on_every_family(run_cli, checkpoints, square_video, family, keep):
    record = _ask(run_cli, checkpoints[family], square_video, "--prune", "visionzip", "--keep", str(keep))
    tokens = record["stats"]["tokens"]
    assert tokens["layer_avg_retention"] == pytest.approx(keep)  # 16 tokens per frame: exact
    assert tokens["visual_tokens_per_layer"] == [tokens["visual_tokens_after"]] * len(tokens["visual_tokens_per_layer"])
    record = _ask(run_cli, checkpoints[family], square_video, "--prune", "visionzip", "--flops", "0.3")
    flops = record["stats"]["flops"]
    per_frame = flops["paper_vanilla_macs"] / record["stats"]["tokens"]["visual_tokens_before"] * 8
    assert abs(flops["paper_fraction"] - 0.3) * flops["paper_vanilla_macs"] <= per_frame


def test_default_and_unreachable_keep(run_cli, checkpoints, square_video):
    record = _ask(run_cli, checkpoints["llava"], square_video, "--prune", "visionzip")
    # 64/576 of 16 tokens per frame rounds to 2: 1 dominant + 1 contextual
    assert record["stats"]["tokens"]["visual_tokens_after"] == 8 * 2
    result = run_cli(["ask", square_video, QUESTION, "--model", checkpoints["llava"], "--frames", "8",
                      "--prune", "visionzip", "--keep", "0.01"])
    assert_one_line_error(result, "--keep 0.01", "at least 0.062")


def _layer_input(adapter, prompt):
    probe = adapter.observe_vision_layer(prompt, -1)
    with probe, torch.inference_mode():
        adapter.encode_video(prompt)
    args, kwargs = probe.calls[0]
    return kwargs.get("hidden_states", args[0] if args else None)  # (frames, patches, dim)


@pytest.mark.parametrize("family", ["llava", "smol"])
def test_planted_vision_attention_hot_spot_is_kept(checkpoints, square_video, family):
    adapter = load_model(str(checkpoints[family]), device="cpu", dtype="float32")
    if family == "llava":
        tower = adapter.model.model.vision_tower
        encoder = getattr(tower, "vision_model", tower)
        patch, hot_token = 5 * 8 + 2, 2 * 4 + 1  # 8x8 patches -> 4x4 tokens (bilinear = 2x2 mean here)
    else:
        encoder = adapter.model.model.vision_model
        patch, hot_token = 6 * 8 + 7, 3 * 4 + 3  # 8x8 patches -> pixel shuffle 2 -> 4x4 tokens
    attention = encoder.encoder.layers[-1].self_attn
    with torch.no_grad():
        table = encoder.embeddings.position_embedding.weight
        table[patch] += 20 * torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
    clip = load_clip(square_video, num_frames=8)
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    hidden = _layer_input(adapter, prompt)  # the layer's real (normed) input
    direction = hidden[:, patch].mean(0) - hidden[:, [p for p in range(64) if p != patch]].mean(dim=(0, 1))
    direction = direction / direction.norm()
    with torch.no_grad():
        unit = torch.zeros(attention.q_proj.out_features)
        unit[:: attention.head_dim] = 1.0  # one channel per head
        attention.q_proj.weight.zero_()
        attention.q_proj.bias.copy_(unit * 4)
        attention.k_proj.weight.copy_(unit[:, None] * direction[None, :] * 4)
        attention.k_proj.bias.zero_()
    tokens = adapter.encode_video_with_attention(prompt, -1)
    scores = tokens.meta["vision_attention"].view(8, 16)
    assert (scores.argmax(dim=1) == hot_token).all()  # the facility sees the planted spot

    pruner = build_pruner(load_preset("visionzip", ["ratio=0.125", "dominant_share=0.5"]), adapter)
    state = request_state(adapter, prompt, clip, QUESTION)
    state.record_stage("vision encoder", len(tokens))
    out = pruner.before_llm(tokens, state)
    assert len(out) == 8 * 2  # per frame: 1 dominant + 1 contextual
    dominant = torch.arange(8) * 2  # each frame's first row is its dominant token
    assert torch.equal(out.frame[dominant], torch.arange(8))
    assert (out.row[dominant] * 4 + out.col[dominant] == hot_token).all()
    assert torch.equal(out.features[dominant], tokens.features.view(8, 16, -1)[:, hot_token])


def test_stage_zips_each_qwen_temporal_patch(checkpoints, square_video):
    """Qwen2.5-VL: frames are temporal patches; a planted attention peak per temporal patch is kept,
    and every kept token keeps its own (or its target's) grid place and sequence index."""
    adapter = load_model(str(checkpoints["qwen"]), device="cpu", dtype="float32")
    clip = load_clip(square_video, num_frames=8)
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    with torch.inference_mode():
        tokens = adapter.encode_video_with_attention(prompt, -1)
    assert tokens.grid == (4, 4, 4)
    attention = torch.full((4, 16), 0.01)
    hot = torch.tensor([3, 9, 0, 15])
    attention[torch.arange(4), hot] = 1.0
    tokens.meta["vision_attention"] = attention.reshape(-1)
    state = request_state(adapter, prompt, clip, QUESTION)
    out = VisionZip(ratio=0.25, dominant_share=0.25).apply(tokens, state)  # 4 per patch: 1 dominant + 3 contextual
    assert len(out) == 16
    first = torch.arange(4) * 4
    assert torch.equal(out.frame[first], torch.arange(4))
    assert torch.equal(out.row[first] * 4 + out.col[first], hot)
    assert torch.equal(out.seq_index, tokens.seq_index[out.frame * 16 + out.row * 4 + out.col])
    assert state.details["visionzip"] == {"dominant_per_frame": 1, "contextual_per_frame": 3, "vision_layer": 0}


def test_stage_refuses_tokens_without_vision_attention():
    from vidqa.errors import BadInput

    tokens = grid_tokens(torch.randn(2, 4, 3))
    with pytest.raises(BadInput, match="vision-encoder attention"):
        VisionZip().apply(tokens, None)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_end_to_end_cli(run_cli, checkpoints, square_video, family):
    result = run_cli(["ask", square_video, QUESTION, "--model", checkpoints[family], "--frames", "8",
                      "--max-new-tokens", "3", "--prune", "visionzip", "--stats"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert "preset visionzip" in result.stderr and "pruning overhead" in result.stderr


def test_listed_with_its_reference(run_cli):
    listing = json.loads(run_cli(["presets", "--json"]).stdout)
    row = next(row for row in listing if row["name"] == "visionzip")
    assert "before LLM" in json.dumps(row) and "CVPR 2025" in json.dumps(row)


def test_a_vision_layer_outside_the_encoder_is_one_line(run_cli, checkpoints, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", checkpoints["llava"], "--frames", "8",
                      "--prune", "visionzip", "-P", "vision_layer=5"])
    assert_one_line_error(result, "vision_layer 5", "[-1, 0]")
