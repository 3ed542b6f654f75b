"""Tiny random Qwen3-VL checkpoints (dense and MoE), for tests.

As in `vidqa.testing.families`: the real model classes with random weights, a word-level
tokenizer built in code, the family's REAL processor classes (Qwen3VLProcessor with its video
processor, which writes the `<t seconds>` timestamp before every temporal patch), saved with
`save_pretrained` so they load through the `from_pretrained` path users take. Nothing downloads.

Sizes: 128 px frames -> 8x8 patches of 16 px -> 2x2 merge = 4x4 = 16 tokens per temporal patch
(2 frames); 8 frames -> 64 video tokens in 4 timestamped spans. A 3-block vision tower gives
DeepStack features from every block (deepstack_visual_indexes [0, 1, 2]), so the first 3 of the
4 LLM layers receive them, and every in-LLM stage (layer >= 1) prunes before the last of them.
Interleaved M-RoPE with sections [4, 2, 2] for head_dim 16.
"""

from __future__ import annotations

from pathlib import Path

from vidqa.testing.builders import init_random_model, scale_weight_matrices
from vidqa.testing.families import QWEN_CHAT_TEMPLATE, qwen_text_config, qwen_tokenizer

# the timestamp text "<1.2 seconds>" splits into "<", "1", ".", "2", "seconds", ">"
TIMESTAMP_WORDS = ["<", ">", "seconds"] + [str(n) for n in range(100)]


def build_tiny_qwen3_vl(
    path: str | Path,
    *,
    frame_size: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    deepstack_visual_indexes: tuple[int, ...] = (0, 1, 2),
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    mrope_section: tuple[int, int, int] = (4, 2, 2),
    moe: bool = False,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate: int = 32,
    words: list[str] | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    weight_scale: float = 15.0,
) -> Path:
    """Save a random Qwen3VLForConditionalGeneration (Qwen3VLMoeForConditionalGeneration with
    `moe=True`) + Qwen3VLProcessor under `path`.

    The video processor's default pixel budget is one `frame_size` x `frame_size` frame per frame
    (vidqa's adapter replaces it with qwen-vl-utils' budget unless --max-pixels is given: tests
    pass max_pixels = frame_size**2 to keep 4x4 tokens per temporal patch).
    """

    path = Path(path)
    tokenizer = qwen_tokenizer(words, TIMESTAMP_WORDS)
    text_config = qwen_text_config(tokenizer, hidden=text_hidden, layers=text_layers, heads=text_heads,
                                   kv_heads=text_kv_heads, intermediate=text_intermediate,
                                   mrope_section=mrope_section, mrope_interleaved=True)
    text_config["head_dim"] = text_hidden // text_heads
    if moe:
        text_config.update(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                           moe_intermediate_size=moe_intermediate, decoder_sparse_step=1, mlp_only_layers=[])
    patches_per_side = frame_size // 16
    vision_config = {
        "depth": vision_layers,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 2,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text_hidden,
        "num_position_embeddings": patches_per_side**2,
        "deepstack_visual_indexes": list(deepstack_visual_indexes),
    }
    if moe:
        from transformers import Qwen3VLMoeConfig as Config
        from transformers import Qwen3VLMoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model
    return save_qwen3_family_checkpoint(path, Config, Model, text_config, vision_config, tokenizer, seed=seed,
                                        attn_implementation=attn_implementation, weight_scale=weight_scale,
                                        frame_size=frame_size)


def save_qwen3_family_checkpoint(path, config_class, model_class, text_config: dict, vision_config: dict, tokenizer, *,
                                 seed: int, attn_implementation: str, weight_scale: float, frame_size: int):
    """Random weights for a Qwen3-VL-style model (Qwen3-VL, Qwen3.5; dense or MoE) from its text and
    vision configs, saved with a Qwen3-VL processor whose frames are `frame_size` pixels square."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    ids = tokenizer.convert_tokens_to_ids
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    model = init_random_model(model_class, config, tokenizer, seed=seed, attn_implementation=attn_implementation).eval()
    scale_weight_matrices(model, weight_scale)
    model.save_pretrained(path)

    pixels = frame_size * frame_size
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, size={"shortest_edge": pixels, "longest_edge": pixels}),
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels * 768}),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path
