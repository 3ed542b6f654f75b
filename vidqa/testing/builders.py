"""Tiny random checkpoints built from configs, for tests and CPU benchmarks.

Nothing here downloads. A checkpoint is a real model class with random weights, a word-level
tokenizer built in code, and the model family's own processor classes, saved with
`save_pretrained` so it loads through exactly the `from_pretrained` path users take.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def build_word_level_tokenizer(
    specials: list[str], eos: str, words: list[str], extra_special_tokens: dict | None = None
):
    """A fast word-level tokenizer: `specials` first (matched before splitting), then `words`.

    Shared by every family's tiny checkpoint; `extra_special_tokens` names the roles the family's
    processor looks up (image_token, video_token, ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in specials + list(dict.fromkeys(words)):
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
        eos_token=eos,
        extra_special_tokens=extra_special_tokens or {},
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in specials if t not in ("<pad>", "<unk>", eos)]}
    )
    return tokenizer


def build_word_tokenizer(words: list[str] | None = None):
    """The LLaVA-OneVision-shaped word-level tokenizer (Qwen2 chat specials, <image>, <video>)."""
    return build_word_level_tokenizer(
        SPECIAL_TOKENS,
        "<|im_end|>",
        words or DEFAULT_WORDS,
        {"image_token": "<image>", "video_token": "<video>"},
    )


def scale_weight_matrices(model, weight_scale: float) -> None:
    """Multiply every weight matrix: at the default init (std 0.02) a random model answers the
    same token whatever it sees, so a parity test could not fail; at ~15 the answer depends on
    the video and the question."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(weight_scale)


def init_random_model(model_class, config, tokenizer, *, seed: int, attn_implementation: str, device: str = "cpu"):
    """Instantiate `model_class(config)` under `seed` on `device` (a GPU initialises billions of
    weights in seconds), with the tokenizer's eos/pad ids wired into the config and the
    generation config (generate stops on the chat template's end marker)."""
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@dataclass(frozen=True)
class LlavaOnevisionSize:
    """The dimensions of a small LLaVA-OneVision: SigLIP tower + Qwen2 text model.

    A frame of `image_size` px is cut into (image_size / patch_size)^2 patches and pooled 2x2
    into video tokens (112 / 14 -> 8x8 patches -> 16 tokens per frame).
    """

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vision_intermediate: int = 128
    # SigLIP's attention-pooling head: LLaVA-OneVision reads hidden states and never uses it.
    # True by default only so the test models keep their random init (the head's parameters
    # take their share of the seeded RNG stream); the micro model drops it.
    vision_use_head: bool = True
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    rope_theta: float = 10000.0
    max_positions: int = 4096  # the text model's context (llava-onevision-qwen2-0.5b: 32768)


def llava_onevision_config(size: LlavaOnevisionSize, tokenizer):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=size.max_positions,
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
        vision_use_head=size.vision_use_head,
    )
    return LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[size.image_size, size.image_size]],
        tie_word_embeddings=True,
    )


def llava_onevision_processor(size: LlavaOnevisionSize, tokenizer):
    """The family's real processor classes, sized so a frame is exactly one `image_size` tile."""
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
        tokenizer=tokenizer,
        chat_template=LLAVA_OV_CHAT_TEMPLATE,
        num_image_tokens=(size.image_size // size.patch_size) ** 2,
        vision_feature_select_strategy="full",
    )


def build_tiny_llava_onevision(
    path: str | Path,
    *,
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    max_positions: int = 4096,
    words: list[str] | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    weight_scale: float = 15.0,
    init_device: str = "cpu",
    save_dtype: torch.dtype | None = None,
) -> Path:
    """Save a random LlavaOnevisionForConditionalGeneration + processor under `path`.

    With the defaults a frame is 112 px -> 8x8 SigLIP patches -> 4x4 = 16 pooled video tokens.
    vision_intermediate: None = 4 x vision_hidden. weight_scale: see `scale_weight_matrices`.
    init_device / save_dtype: where the weights are drawn and the dtype they are saved in (None:
    float32), for benchmark models of billions of parameters.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    path = Path(path)
    size = LlavaOnevisionSize(
        image_size=image_size,
        patch_size=patch_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        vision_intermediate=vision_intermediate or vision_hidden * 4,
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=text_heads,
        text_kv_heads=text_kv_heads,
        text_intermediate=text_intermediate,
        max_positions=max_positions,
    )
    tokenizer = build_word_tokenizer(words)
    model = init_random_model(
        LlavaOnevisionForConditionalGeneration,
        llava_onevision_config(size, tokenizer),
        tokenizer,
        seed=seed,
        attn_implementation=attn_implementation,
        device=init_device,
    ).eval()
    scale_weight_matrices(model, weight_scale)
    if save_dtype is not None:
        model.to(save_dtype)
    model.save_pretrained(path)
    llava_onevision_processor(size, tokenizer).save_pretrained(path)
    return path
