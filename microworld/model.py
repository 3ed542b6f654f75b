"""The micro LLaVA-OneVision: the real architecture at ~1.3 M parameters, built in memory.

SigLIP vision tower (hidden 96, 2 layers, 4 heads, MLP 384, 112 px, patch 14 -> 8x8 patches,
pooled to 4x4 = 16 tokens per frame) + Qwen2 (hidden 128, 4 layers, 4 heads, 2 KV heads,
MLP 512, rope_theta 1e4) + a word-level tokenizer over world.VOCABULARY and the
LLaVA-OneVision-shaped chat template of vidqa.testing.builders. Saved with `save_pretrained`, it loads
through the same AutoModelForImageTextToText / AutoProcessor path real checkpoints take.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from microworld.world import SIZE, VOCABULARY
from vidqa.testing.builders import (
    LlavaOnevisionSize,
    build_word_tokenizer,
    init_random_model,
    llava_onevision_config,
    llava_onevision_processor,
)

MICRO_SIZE = LlavaOnevisionSize(
    image_size=SIZE,
    patch_size=14,
    vision_hidden=96,
    vision_layers=2,
    vision_heads=4,
    vision_intermediate=384,
    vision_use_head=False,
    text_hidden=128,
    text_layers=4,
    text_heads=4,
    text_kv_heads=2,
    text_intermediate=512,
)


def build_processor(size: LlavaOnevisionSize = MICRO_SIZE):
    from tokenizers import normalizers

    tokenizer = build_word_tokenizer(list(VOCABULARY))
    # The vocabulary is lowercase: "Which way does the square move?" reads as the world's question.
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    return llava_onevision_processor(size, tokenizer)


def build_micro_model(
    seed: int = 0,
    size: LlavaOnevisionSize = MICRO_SIZE,
    attn_implementation: str = "sdpa",
    position_std: float = 1.0,
):
    """-> (model, processor): a freshly initialised micro model in float32.

    Transformers' default init, except the SigLIP position embeddings: N(0, position_std) instead
    of N(0, 1/sqrt(hidden)) ~ 0.1. At 0.1 a patch's position is drowned by its colour (the patch
    embedding of a saturated colour is ~15x larger) and the model never learned *where* the
    square is (so never "which way does it move"); at 1.0 it learns it on single frames in
    ~700 steps.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    processor = build_processor(size)
    model = init_random_model(
        LlavaOnevisionForConditionalGeneration,
        llava_onevision_config(size, processor.tokenizer),
        processor.tokenizer,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    with torch.no_grad():
        torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=position_std)
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


def size_dict(size: LlavaOnevisionSize = MICRO_SIZE) -> dict:
    return asdict(size)
