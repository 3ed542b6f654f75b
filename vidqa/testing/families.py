"""Tiny random Qwen2.5-VL and SmolVLM2 checkpoints, for tests and CPU benchmarks.

Like `vidqa.testing.builders` (LLaVA-OneVision, and the shared tokenizer/init helpers): the real model classes with random weights, a word-level
tokenizer built in code, the family's REAL processor classes, saved with `save_pretrained` so
they load through the same `from_pretrained` path users take. Nothing here downloads.

- Qwen2.5-VL: 112 px frames -> 8x8 patches of 14 px -> 2x2 merge = 4x4 = 16 tokens per temporal
  patch (2 frames); 8 frames -> 64 video tokens. M-RoPE sections [2, 3, 3] for head_dim 16.
- SmolVLM2: 64 px frames -> 8x8 patches of 8 px -> pixel shuffle (scale 2) = 4x4 = 16 tokens per
  frame, one image split per frame, each frame wrapped in its timestamp text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vidqa.testing.builders import build_word_level_tokenizer, init_random_model, scale_weight_matrices

# Qwen2.5-VL's chat markup, reduced to what a word-level tokenizer round-trips. The real template
# writes "<|vision_start|><|video_pad|><|vision_end|>" for a video entry, as this one does.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% elif content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif content['type'] == 'text' %}{{ content['text'] }} {% endif %}"
    "{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
QWEN_SPECIAL_TOKENS = [
    "<pad>", "<unk>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# SmolVLM2's processor expands "<video>" itself ("You are provided the following series of four
# frames ... Frame from 00:02:<fake_token_around_image><global-img><image>...") and, for videos,
# uses its own default chat template; these specials are the ones that text contains.
SMOLVLM_SPECIAL_TOKENS = [
    "<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>",
    "<fake_token_around_image>", "<global-img>", "<image>", "<video>",
]

DEFAULT_WORDS = (
    "user assistant User Assistant system what happens in this video the a is it of and to which colour "
    "color square circle red green blue yellow white black left right up down moving moves start end "
    "background does change there yes no answer with option letter first last frame scene You are "
    "provided following series one two three four five six seven eight frames from H MM SS Frame "
    "00 01 02 03 04 05 ? . , : [ ] A B C D"
).split()


def qwen_tokenizer(words: list[str] | None = None, extra_words: Sequence[str] = ()):
    """The word-level tokenizer of the tiny Qwen-VL checkpoints (Qwen2.5-VL and Qwen3-VL)."""
    return build_word_level_tokenizer(
        QWEN_SPECIAL_TOKENS, "<|im_end|>", list(words or DEFAULT_WORDS) + list(extra_words),
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def qwen_text_config(tokenizer, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                     mrope_section: tuple[int, int, int], **rope_extra) -> dict:
    """The tiny Qwen-VL LLM's config dict; M-RoPE's sections must cover head_dim / 2."""
    head_dim = hidden // heads
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section),
                            **rope_extra},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_qwen2_5_vl(
    path: str | Path,
    *,
    frame_size: int = 112,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    tokens_per_second: int = 2,
    words: list[str] | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    weight_scale: float = 15.0,
    window_size: int = 112,
) -> Path:
    """Save a random Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor under `path`.

    window_size: the vision tower's attention window in px (112 = one window per frame); every
    block but the last attends within windows.

    The video processor's pixel budget is exactly one `frame_size` x `frame_size` frame, so a
    112 px clip stays 112 px: 8x8 patches of 14 px, 2x2 merged to 4x4 tokens per temporal patch.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    tokenizer = qwen_tokenizer(words)
    ids = tokenizer.convert_tokens_to_ids
    text_config = qwen_text_config(tokenizer, hidden=text_hidden, layers=text_layers, heads=text_heads,
                                   kv_heads=text_kv_heads, intermediate=text_intermediate,
                                   mrope_section=mrope_section)
    text_config["bos_token_id"] = None
    vision_config = {
        "depth": vision_layers,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": tokens_per_second,
        "window_size": window_size,
        "out_hidden_size": text_hidden,
        "fullatt_block_indexes": [vision_layers - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    model = init_random_model(
        Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed=seed, attn_implementation=attn_implementation
    ).eval()
    scale_weight_matrices(model, weight_scale)
    model.save_pretrained(path)

    pixels = frame_size * frame_size
    size = {"shortest_edge": min(56 * 56, pixels), "longest_edge": pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=False),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


def build_tiny_smolvlm(
    path: str | Path,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    scale_factor: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    words: list[str] | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    weight_scale: float = 15.0,
) -> Path:
    """Save a random SmolVLMForConditionalGeneration + SmolVLMProcessor under `path`.

    With the defaults every frame is resized to 64 x 64 (the video path never splits a frame):
    8x8 SigLIP patches, pixel-shuffled by 2 into 4x4 = 16 image tokens per frame.
    """
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    path = Path(path)
    tokenizer = build_word_level_tokenizer(
        SMOLVLM_SPECIAL_TOKENS, "<end_of_utterance>", words or DEFAULT_WORDS,
        extra_special_tokens={
            "image_token": "<image>", "video_token": "<video>", "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    vision_config = {
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 4,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    config = SmolVLMConfig(
        text_config=text_config,
        vision_config=vision_config,
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
    )
    model = init_random_model(
        SmolVLMForConditionalGeneration, config, tokenizer, seed=seed, attn_implementation=attn_implementation
    ).eval()
    scale_weight_matrices(model, weight_scale)
    model.save_pretrained(path)

    edge = {"longest_edge": image_size}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=edge, max_image_size=edge, do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size=edge, max_image_size=edge),
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size // scale_factor) ** 2,
    )
    processor.save_pretrained(path)
    return path
