"""Tiny random Qwen3.5 checkpoints (dense and MoE), for tests.

As in `vidqa.testing.qwen3`: the real model classes with random weights, a tokenizer built in
code, the family's REAL processor classes (transformers maps `qwen3_5` to Qwen3VLProcessor with
Qwen3VLVideoProcessor, which writes the `<t seconds>` timestamp before every temporal patch),
saved with `save_pretrained` so they load through the `from_pretrained` path users take.
Nothing downloads.

Tokenizer. AutoTokenizer loads every `qwen3_5` checkpoint as Qwen3_5Tokenizer whatever its
tokenizer_config names (transformers lists the type among hub configs it does not trust), and
that class rebuilds a byte-level BPE from the saved vocab and merges: the word-level tokenizer of
the other tiny checkpoints would not survive the round trip. So this one is a byte-level BPE in
Qwen3_5Tokenizer's own pre-tokenization, trained in code on the test vocabulary (every word is
one token, with and without its leading space; anything else falls back to bytes).

Sizes: 128 px frames -> 8x8 patches of 16 px -> 2x2 merge = 4x4 = 16 tokens per temporal patch
(2 frames); 8 frames -> 64 video tokens in 4 timestamped spans. The vision tower is Qwen3-VL's
without DeepStack. The LLM has both layer kinds: by default 4 layers, Gated DeltaNet
(linear attention) and full attention alternating (`full_attention_interval` 2: layers 1 and 3
are full attention; the real checkpoints use 4, three linear layers before each full one).
Full attention is Qwen3.5's gated attention with partial rotary (factor 0.5 of head_dim 16:
8 rotary dims, interleaved M-RoPE sections [2, 1, 1]).
"""

from __future__ import annotations

from pathlib import Path

from vidqa.testing.families import DEFAULT_WORDS, QWEN_SPECIAL_TOKENS
from vidqa.testing.qwen3 import TIMESTAMP_WORDS, save_qwen3_family_checkpoint

EOS = "<|im_end|>"


def qwen3_5_tokenizer(words: list[str] | None = None):
    """A Qwen3_5Tokenizer (byte-level BPE) whose merges make each of `words` (default: the
    shared test vocabulary plus the timestamp words) one token, and the Qwen-VL specials."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen3_5Tokenizer

    vocabulary = list(dict.fromkeys(list(words or DEFAULT_WORDS) + TIMESTAMP_WORDS))
    reference = Qwen3_5Tokenizer()  # its normalizer and pre-tokenizer, so the merges match them
    backend = Tokenizer(models.BPE())
    backend.normalizer = reference.backend_tokenizer.normalizer
    backend.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=100_000, special_tokens=QWEN_SPECIAL_TOKENS, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(vocabulary), *vocabulary], trainer)  # each word with and without a space
    trained = json.loads(backend.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in trained["merges"]]
    tokenizer = Qwen3_5Tokenizer(
        vocab=trained["vocab"], merges=merges, unk_token="<unk>", eos_token=EOS, pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t not in ("<pad>", "<unk>", EOS)]})
    return tokenizer


def build_tiny_qwen3_5(
    path: str | Path,
    *,
    frame_size: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 4,
    full_attention_interval: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    partial_rotary_factor: float = 0.5,
    mrope_section: tuple[int, int, int] = (2, 1, 1),
    linear_key_heads: int = 2,
    linear_value_heads: int = 4,
    linear_head_dim: int = 16,
    linear_conv_kernel: int = 4,
    moe: bool = False,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate: int = 32,
    shared_expert_intermediate: int = 32,
    words: list[str] | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    weight_scale: float = 15.0,
) -> Path:
    """Save a random Qwen3_5ForConditionalGeneration (Qwen3_5MoeForConditionalGeneration with
    `moe=True`) + Qwen3VLProcessor under `path`.

    Layer l is full attention when (l + 1) % full_attention_interval == 0, else Gated DeltaNet.
    The video processor's default pixel budget is one `frame_size` x `frame_size` frame per frame
    (tests pass max_pixels = frame_size**2 to keep 4x4 tokens per temporal patch).
    """

    path = Path(path)
    head_dim = text_hidden // text_heads
    if sum(mrope_section) * 2 != int(head_dim * partial_rotary_factor):
        raise ValueError(f"mrope_section {mrope_section} must sum to the rotary dims / 2 = "
                         f"{int(head_dim * partial_rotary_factor) // 2}")
    tokenizer = qwen3_5_tokenizer(words)
    layer_types = ["full_attention" if (layer + 1) % full_attention_interval == 0 else "linear_attention"
                   for layer in range(text_layers)]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden,
        "num_hidden_layers": text_layers,
        "layer_types": layer_types,
        "num_attention_heads": text_heads,
        "num_key_value_heads": text_kv_heads,
        "head_dim": head_dim,
        "linear_num_key_heads": linear_key_heads,
        "linear_num_value_heads": linear_value_heads,
        "linear_key_head_dim": linear_head_dim,
        "linear_value_head_dim": linear_head_dim,
        "linear_conv_kernel_dim": linear_conv_kernel,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section),
                            "mrope_interleaved": True, "partial_rotary_factor": partial_rotary_factor},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if moe:
        text_config.update(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                           moe_intermediate_size=moe_intermediate,
                           shared_expert_intermediate_size=shared_expert_intermediate)
    else:
        text_config["intermediate_size"] = text_intermediate
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
    }
    if moe:
        from transformers import Qwen3_5MoeConfig as Config
        from transformers import Qwen3_5MoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3_5Config as Config
        from transformers import Qwen3_5ForConditionalGeneration as Model
    return save_qwen3_family_checkpoint(path, Config, Model, text_config, vision_config, tokenizer, seed=seed,
                                        attn_implementation=attn_implementation, weight_scale=weight_scale,
                                        frame_size=frame_size)
