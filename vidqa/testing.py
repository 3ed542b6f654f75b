"""Tiny random checkpoints built from configs, for tests and CPU benchmarks.

Nothing here downloads. A checkpoint is a real model class with random weights, a word-level
tokenizer built in code, and the model family's own processor classes, saved with
`save_pretrained` so it loads through exactly the `from_pretrained` path users take.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Chat template in the shape of LLaVA-OneVision's (Qwen2 chat markup), reduced to what a
# word-level tokenizer can round-trip: "<|im_start|> user <video> question <|im_end|> ...".
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<video> "
    "{% elif content['type'] == 'image' %}<image> "
    "{% elif content['type'] == 'text' %}{{ content['text'] }} {% endif %}"
    "{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

DEFAULT_WORDS = (
    "user assistant system what happens in this video the a is it of and to which colour color "
    "square circle red green blue yellow white black left right up down moving moves start end "
    "background does change there yes no answer with option letter first last frame scene "
    "? . , : A B C D"
).split()


def build_word_tokenizer(words: list[str] | None = None):
    """A fast word-level tokenizer: whitespace/punctuation split, specials matched first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + list(dict.fromkeys(words or DEFAULT_WORDS)):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>", "<video>"]})
    return tokenizer


def build_tiny_llava_onevision(
    path: str | Path,
    *,
    image_size: int = 112,
    patch_size: int = 14,
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
    """Save a random LlavaOnevisionForConditionalGeneration + processor under `path`.

    With the defaults a frame is 112 px -> 8x8 SigLIP patches -> 4x4 = 16 pooled video tokens.
    weight_scale multiplies every weight matrix after the default (std 0.02) init: at 1.0 a random
    model emits the same token whatever it sees, so a parity test could not fail; at 15 its
    answer depends on the video and the question.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    path = Path(path)
    tokenizer = build_word_tokenizer(words)
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[image_size, image_size]],
        tie_word_embeddings=True,
    )
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(weight_scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)

    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[image_size, image_size]]),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=LLAVA_OV_CHAT_TEMPLATE,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
    )
    processor.save_pretrained(path)
    return path
