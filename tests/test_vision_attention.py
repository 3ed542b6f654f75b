"""Vision-encoder attention (models/vision_attention.py): equal to the same layer's eager attention
on every family, mapped to LLM tokens the way each family maps features, zero cost when unused."""

from __future__ import annotations

import pytest
import torch
from helpers import eager_attention_calls, tower_block_attention

from vidqa.errors import BadInput
from vidqa.models import load_model
from vidqa.models.vision_attention import bilinear_pool, block_mean, merge_unit_mean, resolve_vision_layer
from vidqa.pruning.core.runtime import Pruner
from vidqa.testing.builders import build_tiny_llava_onevision
from vidqa.testing.families import build_tiny_qwen2_5_vl, build_tiny_smolvlm
from vidqa.testing.qwen3 import build_tiny_qwen3_vl
from vidqa.video.decode import load_clip

QUESTION = "what happens in this video ?"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two-layer towers, so a non-last layer is tested too; Qwen with 56 px windows (4 per frame)."""
    return {
        "llava": build_tiny_llava_onevision(tmp_path_factory.mktemp("va-llava"), vision_layers=2),
        "qwen": build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("va-qwen"), vision_layers=2, window_size=56),
        "smol": build_tiny_smolvlm(tmp_path_factory.mktemp("va-smol"), vision_layers=2),
        "qwen3": build_tiny_qwen3_vl(tmp_path_factory.mktemp("va-qwen3")),  # 3 blocks, all DeepStack sources
    }

QWEN3_PIXELS = 128 * 128  # 8x8 patches of 16 px per frame -> 4x4 tokens per temporal patch


def _prompt(adapter, square_video, frames=4):
    clip = load_clip(square_video, num_frames=frames)
    return adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)


def _observe(adapter, prompt, layer):
    probe = adapter.observe_vision_layer(prompt, layer)
    with probe, torch.inference_mode():
        tokens = adapter.encode_video(prompt)
    return tokens, probe.result()


def _eager_siglip(model, pixels, index, tower):
    with torch.inference_mode():
        out = tower(pixels, output_attentions=True, return_dict=True)
    return out.attentions[index].mean(dim=(1, 2))  # (frames, patches): mean over heads, queries


@pytest.mark.parametrize("layer", [0, -1])
def test_llava_matches_eager_attention(checkpoints, square_video, layer):
    adapter = load_model(str(checkpoints["llava"]), device="cpu", dtype="float32")
    eager = load_model(str(checkpoints["llava"]), device="cpu", dtype="float32", attn="eager")
    prompt = _prompt(adapter, square_video)
    tokens, observed = _observe(adapter, prompt, layer)
    pixels = prompt.inputs["pixel_values_videos"][0]
    reference = _eager_siglip(eager.model, pixels, observed.layer, eager.model.model.vision_tower)
    assert observed.layer == (0 if layer == 0 else 1)
    torch.testing.assert_close(observed.patch_received, reference, atol=1e-6, rtol=1e-5)
    assert observed.received.shape == (len(tokens),)
    torch.testing.assert_close(observed.received, bilinear_pool(reference, 8).reshape(-1), atol=1e-6, rtol=1e-5)
    # keys: the layer's k_proj of its normed input, mean over heads, pooled like the features
    assert observed.keys.shape == (len(tokens), 16)


@pytest.mark.parametrize("layer", [0, -1])
def test_smolvlm_matches_eager_attention(checkpoints, square_video, layer):
    adapter = load_model(str(checkpoints["smol"]), device="cpu", dtype="float32")
    eager = load_model(str(checkpoints["smol"]), device="cpu", dtype="float32", attn="eager")
    prompt = _prompt(adapter, square_video)
    tokens, observed = _observe(adapter, prompt, layer)
    pixels = prompt.inputs["pixel_values"][0]
    reference = _eager_siglip(eager.model, pixels, observed.layer, eager.model.model.vision_model)
    torch.testing.assert_close(observed.patch_received, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(observed.received, block_mean(reference, 8, 2).reshape(-1), atol=1e-6, rtol=1e-5)
    assert observed.received.shape == (len(tokens),)


@pytest.mark.parametrize("layer", [0, -1])
def test_qwen_matches_eager_attention(checkpoints, square_video, monkeypatch, layer):
    """Block 0 attends in 56 px windows (4 per temporal patch), block 1 over the whole temporal
    patch; the eager reference is the model's own eager softmax, recorded per attention chunk."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen_module

    adapter = load_model(str(checkpoints["qwen"]), device="cpu", dtype="float32")
    eager = load_model(str(checkpoints["qwen"]), device="cpu", dtype="float32", attn="eager")
    prompt = _prompt(adapter, square_video)
    tokens, observed = _observe(adapter, prompt, layer)

    recorded = eager_attention_calls(qwen_module.__name__, monkeypatch)
    with torch.inference_mode():
        eager.encode_video(prompt)
    target = eager.model.model.visual.blocks[observed.layer].attn
    blocks = tower_block_attention(recorded, target)
    expected_blocks = 8 if layer == 0 else 2  # 2 temporal patches x (4 windows | 1 full block)
    assert len(blocks) == expected_blocks
    reference = torch.cat(blocks)  # (patches,) in the tower's window order
    torch.testing.assert_close(observed.patch_received, reference, atol=1e-6, rtol=1e-5)
    assert observed.received.shape == (len(tokens),)


@pytest.mark.parametrize("layer", [0, -1])
def test_qwen3_matches_eager_attention(checkpoints, square_video, monkeypatch, layer):
    """Every Qwen3-VL block attends over one whole temporal patch (no windows): the eager
    reference is one softmax block per temporal patch; tokens are the mean of 4 consecutive patches."""
    adapter = load_model(str(checkpoints["qwen3"]), device="cpu", dtype="float32", max_pixels=QWEN3_PIXELS)
    eager = load_model(str(checkpoints["qwen3"]), device="cpu", dtype="float32", attn="eager", max_pixels=QWEN3_PIXELS)
    prompt = _prompt(adapter, square_video)
    tokens, observed = _observe(adapter, prompt, layer)
    assert observed.layer == (0 if layer == 0 else 2)

    recorded = eager_attention_calls("transformers.models.qwen3_vl.modeling_qwen3_vl", monkeypatch)
    with torch.inference_mode():
        eager.encode_video(prompt)
    target = eager.model.model.visual.blocks[observed.layer].attn
    blocks = tower_block_attention(recorded, target)
    assert len(blocks) == 2 and all(block.shape == (64,) for block in blocks)  # 2 temporal patches of 8x8 patches
    reference = torch.cat(blocks)
    torch.testing.assert_close(observed.patch_received, reference, atol=1e-6, rtol=1e-5)
    assert observed.received.shape == (len(tokens),) == (32,)
    torch.testing.assert_close(observed.received, reference.view(32, 4).mean(dim=1), atol=1e-6, rtol=1e-5)
    assert observed.keys.shape == (32, 16)  # vision hidden 32 / 2 heads


def test_qwen3_mapping_follows_the_processors_merge_units(checkpoints):
    """The processor emits the 4 patches of a 2x2 merge unit consecutively (the merger's view(-1, 4C)):
    frames whose 32x32 px blocks each have their own grey level give patch rows that, 4 at a time,
    hold one block's level, in row-major token order."""
    adapter = load_model(str(checkpoints["qwen3"]), device="cpu", dtype="float32", max_pixels=QWEN3_PIXELS)
    levels = torch.arange(16, dtype=torch.uint8) * 15  # token (r, c) of the 4x4 grid -> grey level
    frame = levels.view(4, 4).repeat_interleave(32, 0).repeat_interleave(32, 1)  # (128, 128)
    frames = frame[None, :, :, None].expand(2, 128, 128, 3).numpy().copy()
    prompt = adapter.build_prompt(frames, [0.0, 0.5], QUESTION)
    patches = prompt.inputs["pixel_values_videos"]  # (64, 3 * 2 * 16 * 16)
    assert patches.shape[0] == 64
    assert torch.allclose(patches, patches[:, :1].expand_as(patches))  # each patch is one grey level
    per_token = patches[:, 0].view(16, 4)
    assert torch.allclose(per_token, per_token[:, :1].expand_as(per_token))
    assert torch.equal(torch.argsort(per_token[:, 0]), torch.arange(16))  # token order = the levels' order


# --- the mapping to LLM tokens, on planted hot spots ---------------------------------------------
def test_llava_bilinear_mapping_puts_a_hot_patch_in_its_pooled_token():
    """27x27 SigLIP patches -> 14x14: a hot patch at (20, 6) is hottest in token (10, 3)."""
    values = torch.zeros(2, 27 * 27)
    values[1, 20 * 27 + 6] = 1.0
    pooled = bilinear_pool(values, 27)
    assert pooled.shape == (2, 196)
    assert pooled[0].abs().max() == 0
    assert int(pooled[1].argmax()) == 10 * 14 + 3
    # the features go through the same resize: pooling is linear and equal to apply_pooling
    features = torch.randn(2, 27 * 27, 5)
    direct = torch.nn.functional.interpolate(
        features.view(2, 27, 27, 5).permute(0, 3, 1, 2), size=(14, 14), mode="bilinear"
    ).permute(0, 2, 3, 1).reshape(2, 196, 5)
    torch.testing.assert_close(bilinear_pool(features, 27), direct)


def test_smolvlm_block_mapping_follows_pixel_shuffle():
    """The connector's own pixel shuffle decides which patches share a token."""
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    side, scale = 8, 2
    values = torch.zeros(1, side * side)
    values[0, 5 * side + 2] = 1.0  # patch (5, 2) -> token (2, 1)
    assert int(block_mean(values, side, scale)[0].argmax()) == 2 * (side // scale) + 1
    shuffle = SmolVLMConnector.pixel_shuffle
    shuffled = shuffle(None, values.view(1, side * side, 1), scale)  # (1, tokens, scale^2)
    torch.testing.assert_close(block_mean(values, side, scale), shuffled.mean(dim=-1))


def test_qwen_mapping_undoes_the_window_permutation():
    """A hot patch in the tower's window order lands on the LLM token of its merge unit."""
    from vidqa.models.qwen2_5_vl import qwen_window_index

    class Tower:
        spatial_merge_size, window_size, patch_size = 2, 56, 14

    grid = torch.tensor([[2, 8, 8]])  # 2 temporal patches of 8x8 patches -> 4x4 tokens each
    window_index = qwen_window_index(Tower, grid)
    # token (t=1, row=2, col=3) is merge unit 16 + 2*4 + 3 = 27; find its place in window order
    unit = 1 * 16 + 2 * 4 + 3
    slot = int((window_index == unit).nonzero())
    values = torch.zeros(2 * 64)
    values[slot * 4 + 1] = 4.0  # one of its four patches
    tokens = merge_unit_mean(values, window_index, 4)
    assert tokens.shape == (32,)
    assert int(tokens.argmax()) == unit and float(tokens[unit]) == 1.0


def test_layer_resolution_and_bad_layers():
    assert resolve_vision_layer(-1, 26) == 25
    assert resolve_vision_layer(-2, 26) == 24
    assert resolve_vision_layer(3, 26) == 3
    assert resolve_vision_layer(-1, 27, feature_layer=25) == 25
    with pytest.raises(BadInput, match="vision_layer 26"):
        resolve_vision_layer(26, 26)
    with pytest.raises(BadInput, match="vision_layer -27"):
        resolve_vision_layer(-27, 26)


def test_encode_with_attention_keeps_features_and_aligns_meta(checkpoints, square_video):
    adapter = load_model(str(checkpoints["qwen"]), device="cpu", dtype="float32")
    prompt = _prompt(adapter, square_video)
    with torch.inference_mode():
        plain = adapter.encode_video(prompt)
        observed = adapter.encode_video_with_attention(prompt, -1)
    torch.testing.assert_close(observed.features, plain.features)
    assert "vision_attention" not in plain.meta and plain.vision_layer is None
    assert observed.vision_layer == 1
    assert observed.meta["vision_attention"].shape == (len(plain),)
    assert observed.meta["vision_keys"].shape[0] == len(plain)
    subset = observed.select(torch.tensor([3, 0, 7]))
    torch.testing.assert_close(subset.meta["vision_attention"], observed.meta["vision_attention"][[3, 0, 7]])
    assert subset.vision_layer == 1


class _Recorder(Pruner):
    """A pruner whose stage reads vision attention from `vision_layer`; keeps what it was given."""

    def __init__(self, vision_layer):
        self.vision_layer, self.seen = vision_layer, []

    def before_llm(self, tokens, state):
        self.seen.append(tokens)
        return tokens


def test_engine_encodes_with_attention_only_when_a_stage_asks(checkpoints, square_video, monkeypatch):
    from vidqa.engine import request as engine

    adapter = load_model(str(checkpoints["smol"]), device="cpu", dtype="float32")
    clip = load_clip(square_video, num_frames=3)
    options = engine.GenerationOptions(max_new_tokens=2)
    asking = _Recorder(-1)
    cache = {}
    engine.answer(adapter, clip, QUESTION, options, pruner=asking, encoded_cache=cache)
    assert asking.seen[0].meta["vision_attention"].shape == (len(asking.seen[0]),)

    def refuse(*args, **kwargs):
        raise AssertionError("vision attention computed although no stage asked for it")

    monkeypatch.setattr(type(adapter), "observe_vision_layer", refuse)
    plain = _Recorder(None)
    engine.answer(adapter, load_clip(square_video, num_frames=3), QUESTION, options, pruner=plain)
    assert "vision_attention" not in plain.seen[0].meta
    monkeypatch.undo()
    # a cached encoding made for another layer is not reused for this one
    other = _Recorder(0)
    engine.answer(adapter, clip, QUESTION, options, pruner=other, encoded_cache=cache)
    assert other.seen[0].vision_layer == 0 and asking.seen[0].vision_layer == 1
