"""Tiny random GLM-4.1V and GLM-4.5V (MoE) checkpoints, for tests.

As in `vidqa.testing.families`: the real model classes with random weights, a word-level
tokenizer built in code, the family's REAL processor classes (Glm4vProcessor with its image and
video processors, which write `<|begin_of_image|>` + tokens + `<|end_of_image|>` + the second of
each temporal patch), saved with `save_pretrained` so they load through the `from_pretrained`
path users take. Nothing downloads.

Sizes: 112 px frames -> 8x8 patches of 14 px -> 2x2 merge = 4x4 = 16 tokens per temporal patch
(2 frames); 8 frames -> 64 video tokens in 4 timestamped spans. LLM: 4 layers, head_dim 16, half
of it rotary (partial_rotary_factor 0.5: 8 dims, 3-D sections [2, 1, 1]). The MoE variant has
one dense layer first (first_k_dense_replace 1), then 4 routed experts (2 per token) and one
shared expert per layer.
"""

from __future__ import annotations

from pathlib import Path

from vidqa.testing.builders import build_word_level_tokenizer, init_random_model, scale_weight_matrices
from vidqa.testing.families import DEFAULT_WORDS

GLM_SPECIAL_TOKENS = [
    "<pad>", "<unk>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>",
]
TIMESTAMP_WORDS = [str(n) for n in range(100)]  # the processor writes each temporal patch's whole second

# GLM-4.1V's chat markup ("<|user|>\n...<|assistant|>\n"), reduced to what a word-level tokenizer
# round-trips; a video entry is written as the real template writes it.
GLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|> "
    "{% elif content['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|> "
    "{% elif content['type'] == 'text' %}{{ content['text'] }} {% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def glm_tokenizer(words: list[str] | None = None):
    return build_word_level_tokenizer(
        GLM_SPECIAL_TOKENS, "<|endoftext|>", list(words or DEFAULT_WORDS) + TIMESTAMP_WORDS,
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )


def build_tiny_glm4v(
    path: str | Path,
    *,
    frame_size: int = 112,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    mrope_section: tuple[int, int, int] = (2, 1, 1),
    moe: bool = False,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate: int = 32,
    words: list[str] | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    weight_scale: float = 15.0,
) -> Path:
    """Save a random Glm4vForConditionalGeneration (Glm4vMoeForConditionalGeneration with
    `moe=True`) + Glm4vProcessor under `path`.

    The video processor keeps a `frame_size` square frame as it is (its per-clip budget is far
    above it and it rounds to 28 px), so a square video of that size gives 4x4 tokens per
    temporal patch.
    """
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    path = Path(path)
    tokenizer = glm_tokenizer(words)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = text_hidden // text_heads
    if sum(mrope_section) * 4 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to the rotary dims / 2 = {head_dim // 4}")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden,
        "intermediate_size": text_intermediate,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "num_key_value_heads": text_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section),
                            "partial_rotary_factor": 0.5},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if moe:
        text_config.update(head_dim=head_dim, n_routed_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                           moe_intermediate_size=moe_intermediate, n_shared_experts=1, first_k_dense_replace=1)
    vision_config = {
        "depth": vision_layers,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 2,
        "num_heads": 2,
        "image_size": frame_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text_hidden,
    }
    if moe:
        from transformers import Glm4vMoeConfig as Config
        from transformers import Glm4vMoeForConditionalGeneration as Model
    else:
        from transformers import Glm4vConfig as Config
        from transformers import Glm4vForConditionalGeneration as Model
    config = Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
        tie_word_embeddings=True,
    )
    model = init_random_model(Model, config, tokenizer, seed=seed, attn_implementation=attn_implementation).eval()
    scale_weight_matrices(model, weight_scale)
    model.save_pretrained(path)

    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(patch_size=14),
        video_processor=Glm4vVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=GLM_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path
