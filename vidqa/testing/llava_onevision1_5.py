"""Tiny random LLaVA-OneVision-1.5 checkpoints, for tests (transformers >= 5.25).

As in `vidqa.testing.families`: the real model class with random weights, the Qwen-VL word-level
tokenizer and chat template of the other tiny Qwen checkpoints, the family's REAL processor
classes (Exaone4_5_Processor around Qwen2-VL's image and video processors with
temporal_patch_size 1, as the checkpoints ship them), saved with `save_pretrained` so they load
through the `from_pretrained` path users take. Nothing downloads.

Sizes: 112 px frames -> 8x8 patches of 14 px (a class token prepended per frame inside the
tower) -> 2x2 merge = 4x4 = 16 tokens per FRAME (no temporal patches); 4 frames -> 64 video
tokens in one span. Qwen3 LLM of 4 layers, head_dim 16.
"""

from __future__ import annotations

from pathlib import Path

from vidqa.testing.builders import init_random_model, scale_weight_matrices
from vidqa.testing.families import QWEN_CHAT_TEMPLATE, qwen_tokenizer


def build_tiny_llava_onevision1_5(
    path: str | Path,
    *,
    frame_size: int = 112,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
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
    """Save a random LlavaOnevision15ForConditionalGeneration + its processor under `path`.

    The processor's pixel budget is exactly one `frame_size` x `frame_size` frame, so a square
    video of that size keeps 4x4 tokens per frame whatever vidqa's reference resize does first.
    """
    from transformers import (
        Exaone4_5_Processor,
        LlavaOnevision15Config,
        LlavaOnevision15ForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    tokenizer = qwen_tokenizer(words)
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "model_type": "qwen3",
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden,
        "intermediate_size": text_intermediate,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "num_key_value_heads": text_kv_heads,
        "head_dim": text_hidden // text_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "depth": vision_layers,
        "hidden_size": vision_hidden,  # divisible by 4 x heads (its 2-D RoPE)
        "intermediate_size": vision_hidden * 2,
        "num_heads": vision_heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "out_hidden_size": text_hidden,
    }
    config = LlavaOnevision15Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    model = init_random_model(LlavaOnevision15ForConditionalGeneration, config, tokenizer, seed=seed,
                              attn_implementation=attn_implementation).eval()
    scale_weight_matrices(model, weight_scale)
    model.save_pretrained(path)

    pixels = frame_size * frame_size
    size = {"shortest_edge": min(56 * 56, pixels), "longest_edge": pixels}
    patches = {"patch_size": 14, "temporal_patch_size": 1, "merge_size": 2}
    processor = Exaone4_5_Processor(
        image_processor=Qwen2VLImageProcessor(size=size, **patches),
        video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=False, **patches),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path
