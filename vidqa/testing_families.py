"""Tiny random Qwen2.5-VL and SmolVLM2 checkpoints, for tests and CPU benchmarks.

Like `vidqa.testing` (LLaVA-OneVision): the real model classes with random weights, a word-level
tokenizer built in code, the family's REAL processor classes, saved with `save_pretrained` so
they load through the same `from_pretrained` path users take. Nothing here downloads.

- Qwen2.5-VL: 112 px frames -> 8x8 patches of 14 px -> 2x2 merge = 4x4 = 16 tokens per temporal
  patch (2 frames); 8 frames -> 64 video tokens. M-RoPE sections [2, 3, 3] for head_dim 16.
- SmolVLM2: 64 px frames -> 8x8 patches of 8 px -> pixel shuffle (scale 2) = 4x4 = 16 tokens per
  frame, one image split per frame, each frame wrapped in its timestamp text.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def build_family_tokenizer(specials: list[str], eos: str, words: list[str] | None = None, extra: dict | None = None):
    """A fast word-level tokenizer: `specials` first (matched before splitting), then `words`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in specials + list(dict.fromkeys(words or DEFAULT_WORDS)):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token=eos,
        extra_special_tokens=extra or {},
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in specials if t not in ("<pad>", "<unk>", eos)]}
    )
    return tokenizer


def _scale_weights(model, weight_scale: float) -> None:
    """Multiply every weight matrix: at the default init (std 0.02) a random model answers the
    same token whatever it sees, so a parity test could not fail; at ~15 the answer depends on
    the video and the question."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(weight_scale)


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
) -> Path:
    """Save a random Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor under `path`.

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
    tokenizer = build_family_tokenizer(
        QWEN_SPECIAL_TOKENS, "<|im_end|>", words,
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    ids = tokenizer.convert_tokens_to_ids
    head_dim = text_hidden // text_heads
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden,
        "intermediate_size": text_intermediate,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "num_key_value_heads": text_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    vision_config = {
        "depth": vision_layers,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": tokens_per_second,
        "window_size": 112,
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
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _scale_weights(model, weight_scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
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
    tokenizer = build_family_tokenizer(
        SMOLVLM_SPECIAL_TOKENS, "<end_of_utterance>", words,
        extra={
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
    config.eos_token_id = tokenizer.eos_token_id
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    _scale_weights(model, weight_scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
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
