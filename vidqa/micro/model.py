"""The micro LLaVA-OneVision: the real architecture at ~1.3 M parameters, built in memory.

SigLIP vision tower (hidden 96, 2 layers, 4 heads, MLP 384, 112 px, patch 14 -> 8x8 patches,
pooled to 4x4 = 16 tokens per frame) + Qwen2 (hidden 128, 4 layers, 4 heads, 2 KV heads,
MLP 512, rope_theta 1e4) + a word-level tokenizer over world.VOCABULARY and the
LLaVA-OneVision-shaped chat template of vidqa.testing. Saved with `save_pretrained`, it loads
through the same AutoModelForImageTextToText / AutoProcessor path real checkpoints take.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vidqa.testing import LLAVA_OV_CHAT_TEMPLATE, build_word_tokenizer

from .world import SIZE, VOCABULARY


@dataclass(frozen=True)
class MicroSize:
    image_size: int = SIZE
    patch_size: int = 14
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 384
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 512
    rope_theta: float = 10000.0


def build_processor(size: MicroSize = MicroSize()):
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    pixels = {"height": size.image_size, "width": size.image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=pixels, image_grid_pinpoints=[[size.image_size, size.image_size]]
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=pixels),
        tokenizer=build_word_tokenizer(list(VOCABULARY)),
        chat_template=LLAVA_OV_CHAT_TEMPLATE,
        num_image_tokens=(size.image_size // size.patch_size) ** 2,
        vision_feature_select_strategy="full",
    )


def build_micro_model(
    seed: int = 0, size: MicroSize = MicroSize(), attn_implementation: str = "sdpa", position_std: float = 1.0
):
    """-> (model, processor): a freshly initialised micro model in float32.

    Transformers' default init, except the SigLIP position embeddings: N(0, position_std) instead
    of N(0, 1/sqrt(hidden)) ~ 0.1. At 0.1 a patch's position is drowned by its colour (the patch
    embedding of a saturated colour is ~15x larger) and the model never learned *where* the
    square is (so never "which way does it move"); at 1.0 it learns it on single frames in
    ~700 steps.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    processor = build_processor(size)
    tokenizer = processor.tokenizer
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=4096,
        rope_theta=size.rope_theta,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        vision_use_head=False,  # LLaVA-OneVision reads hidden states; the pooling head is unused
    )
    config = LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[size.image_size, size.image_size]],
        tie_word_embeddings=True,
    )
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():
        torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=position_std)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def save_checkpoint(model, processor, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """save_pretrained model (cast to `dtype` on a copy) + processor under `path`."""
    import copy

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(model).to(dtype)
    saved.config.dtype = dtype
    saved.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def size_dict(size: MicroSize = MicroSize()) -> dict:
    return asdict(size)
