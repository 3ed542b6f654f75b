"""Tests for vidqa.flops: published LLaVA-OneVision-7B figures and FlopCounterMode agreement."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vidqa.flops import (
    LLMShape,
    VisionShape,
    format_flops,
    layer_macs,
    macs_to_flops,
    prompt_prefill_macs,
    shapes_from_model_config,
    vision_encoder_macs,
    visual_prefill_macs,
)
from vidqa.pruning.core.compat import cache_keyword

# LLaVA-OneVision-7B (Qwen2-7B LLM), 32 frames x 196 tokens.
OV7B = LLMShape(
    num_layers=28,
    hidden=3584,
    intermediate=18944,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    vocab_size=152064,
)
VANILLA_TOKENS = 32 * 196  # 6272
KEPT_TOKENS = VANILLA_TOKENS // 4  # 1568


def _tera(macs: int) -> float:
    return round(macs / 1e12, 2)


def _published_figures(shape: LLMShape) -> tuple[int, int, int]:
    layers = shape.num_layers
    vanilla = visual_prefill_macs(shape, [VANILLA_TOKENS] * layers)
    pre_llm = visual_prefill_macs(shape, [KEPT_TOKENS] * layers)
    fastv = visual_prefill_macs(shape, [VANILLA_TOKENS] * 2 + [KEPT_TOKENS] * (layers - 2))
    return vanilla, pre_llm, fastv


OV7B_CONFIG = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
)


@pytest.mark.parametrize(
    "shape",
    [OV7B, LLMShape.from_config(transformers.Qwen2Config(**OV7B_CONFIG))],
    ids=["direct", "from_qwen2_config"],
)
def test_llava_onevision_7b_published_figures(shape: LLMShape) -> None:
    vanilla, pre_llm, fastv = _published_figures(shape)
    assert _tera(vanilla) == 48.82
    assert _tera(pre_llm) == 10.73
    assert _tera(fastv) == 13.45
    assert round(100 * pre_llm / vanilla, 1) == 22.0


def test_from_config_reads_qwen2_and_llama() -> None:
    qwen = LLMShape.from_config(transformers.Qwen2Config(**OV7B_CONFIG))
    assert qwen.head_dim == 128  # Qwen2Config has no head_dim: hidden // heads
    assert qwen.num_kv_heads == 4
    assert qwen.num_layers == 28

    llama = LLMShape.from_config(
        transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=None,
            head_dim=32,
            vocab_size=50,
        )
    )
    assert llama.num_kv_heads == 4
    assert llama.head_dim == 32  # q width 128 != hidden 64
    assert llama.q_width == 128
    # q/o projections use h_q * d_h, not D.
    assert layer_macs(llama, 1) == 2 * 64 * 128 + 2 * 64 * 128 + 2 * 128 + 3 * 64 * 128


# 28 px / patch 14 -> 2x2 patches -> 4 tokens per image
SMALL_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
)


def test_shapes_from_model_config() -> None:
    config = transformers.LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2",
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        ),
        vision_config=dict(SMALL_SIGLIP),
    )
    llm, vision = shapes_from_model_config(config)
    assert llm == LLMShape(2, 48, 96, 4, 2, 12, 100)
    assert vision == VisionShape(2, 32, 64, 4, tokens_per_image=4, patch_size=14)

    # A plain text config is its own text part and has no vision part.
    llm_only, no_vision = shapes_from_model_config(config.text_config)
    assert llm_only == llm
    assert no_vision is None


def test_tokens_per_layer_length_is_checked() -> None:
    with pytest.raises(ValueError):
        visual_prefill_macs(OV7B, [VANILLA_TOKENS] * 27)
    with pytest.raises(ValueError):
        prompt_prefill_macs(OV7B, [VANILLA_TOKENS] * 29)


def test_lm_head_counts_last_token_only() -> None:
    lengths = [100] * OV7B.num_layers
    diff = prompt_prefill_macs(OV7B, lengths) - prompt_prefill_macs(
        OV7B, lengths, include_lm_head=False
    )
    assert diff == OV7B.hidden * OV7B.vocab_size


# --- agreement with torch's FlopCounterMode -------------------------------------------------


def _counted_flops(fn) -> int:
    # FlopCounterMode only counts SDPA on CPU when the math backend is forced.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny_qwen2() -> tuple[transformers.Qwen2Model, transformers.Qwen2Config]:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        attn_implementation="sdpa",
    )
    return transformers.Qwen2Model(config).eval(), config


def _assert_close(counted: int, predicted: int, rel: float) -> None:
    assert counted > 0
    assert abs(counted - predicted) <= rel * counted, (counted, predicted)


def test_prompt_prefill_matches_flop_counter(tiny_qwen2) -> None:
    model, config = tiny_qwen2
    shape = LLMShape.from_config(config)
    seq_len = 150
    embeds = torch.randn(1, seq_len, config.hidden_size)
    counted = _counted_flops(lambda: model(inputs_embeds=embeds))
    predicted = macs_to_flops(
        prompt_prefill_macs(shape, [seq_len] * config.num_hidden_layers, include_lm_head=False)
    )
    _assert_close(counted, predicted, rel=0.01)


def test_pruned_per_layer_lengths_match_flop_counter(tiny_qwen2) -> None:
    """Drop tokens between decoder layers (as in-LLM pruning does) and compare."""
    model, config = tiny_qwen2
    shape = LLMShape.from_config(config)
    lengths = [150, 120, 60]
    hidden = torch.randn(1, lengths[0], config.hidden_size)

    def run() -> None:
        states = hidden
        for layer, seq_len in zip(model.layers, lengths):
            states = states[:, :seq_len]
            positions = torch.arange(seq_len)[None]
            rotary = model.rotary_emb(states, positions)
            out = layer(states, attention_mask=None, position_embeddings=rotary, position_ids=positions)
            states = out[0] if isinstance(out, tuple) else out

    counted = _counted_flops(run)
    predicted = macs_to_flops(prompt_prefill_macs(shape, lengths, include_lm_head=False))
    _assert_close(counted, predicted, rel=0.01)


def test_layer_macs_with_kv_cache_matches_flop_counter(tiny_qwen2) -> None:
    """n_query new tokens attending to n_kv = past + new keys."""
    model, config = tiny_qwen2
    shape = LLMShape.from_config(config)
    past_len, new_len = 100, 20
    cache = transformers.DynamicCache(config=config)
    keyword = cache_keyword(model)  # `cache` from transformers 5.24, `past_key_values` before
    with torch.no_grad():
        model(inputs_embeds=torch.randn(1, past_len, config.hidden_size), **{keyword: cache})
    new_embeds = torch.randn(1, new_len, config.hidden_size)
    counted = _counted_flops(lambda: model(inputs_embeds=new_embeds, **{keyword: cache}))
    predicted = macs_to_flops(
        config.num_hidden_layers * layer_macs(shape, new_len, past_len + new_len)
    )
    _assert_close(counted, predicted, rel=0.01)


def test_vision_encoder_matches_flop_counter() -> None:
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        vision_use_head=False,  # LLaVA uses patch features, not the pooling head
        attn_implementation="sdpa",
    )
    model = transformers.SiglipVisionModel(config).eval()
    vshape = VisionShape.from_config(config)
    assert vshape.tokens_per_image == 4 and not vshape.has_class_token
    num_images = 3
    pixels = torch.randn(num_images, 3, 28, 28)
    counted = _counted_flops(lambda: model(pixel_values=pixels))
    _assert_close(counted, macs_to_flops(vision_encoder_macs(vshape, num_images)), rel=0.02)


def test_vision_projector_matches_flop_counter() -> None:
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionMultiModalProjector,
    )

    config = transformers.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", hidden_size=48),
        vision_config=dict(SMALL_SIGLIP),
    )
    _, vshape = shapes_from_model_config(config)
    projector = LlavaOnevisionMultiModalProjector(config).eval()
    num_images = 3
    features = torch.randn(num_images, vshape.tokens_per_image, vshape.hidden)
    counted = _counted_flops(lambda: projector(features))
    with_projector = vision_encoder_macs(vshape, num_images, projector_hidden=48)
    encoder_only = vision_encoder_macs(vshape, num_images)
    assert macs_to_flops(with_projector - encoder_only) == counted


# --- formatting ------------------------------------------------------------------------------


def test_macs_to_flops() -> None:
    assert macs_to_flops(21) == 42


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (48.821899886592e12, "48.82 T"),
        (10.72510795776e12, "10.73 T"),
        (10.7e9, "10.7 G"),
        (1.5e6, "1.5 M"),
        (123456, "123.5 K"),
        (999.96e9, "1 T"),
        (512, "512"),
        (0, "0"),
        (2.5e15, "2.5 P"),
    ],
)
def test_format_flops(value: float, expected: str) -> None:
    assert format_flops(value) == expected
