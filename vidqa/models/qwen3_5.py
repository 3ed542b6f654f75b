"""Qwen3.5 (Qwen3_5ForConditionalGeneration, and the MoE Qwen3_5MoeForConditionalGeneration):
Qwen3-VL's vision side without DeepStack, and a hybrid LLM of Gated DeltaNet (linear attention)
and gated full-attention layers.

Vision side. Processor (Qwen3VLProcessor: `<t seconds>` before every temporal patch), tokens
(2 frames per temporal patch, 16 px patches merged 2x2, one span of `<|video_pad|>` rows per
temporal patch), pixel budget, timestamps and M-RoPE positions (`get_rope_index` splits the video
into one 1-frame grid per temporal patch, as Qwen3-VL's) are Qwen3-VL's: this adapter is
`Qwen3VLAdapter` with DeepStack taken out. The tower returns the merged features only, and the
LLM takes them back as `pooler_output`, as Qwen2.5-VL's does.

LLM. `text_config.layer_types` says, per decoder layer, "linear_attention" (Gated DeltaNet: a
causal conv and a gated delta-rule recurrence, whose cache is a fixed-size state with no token
axis) or "full_attention" (softmax attention with a gate on its output and partial rotary, whose
cache holds one key and value per token). The released checkpoints put one full-attention layer
after every three linear ones (`full_attention_interval` 4). Every pre-LLM preset runs unchanged:
it acts on the visual features before layer 0, so every layer, of either kind, sees the same
kept tokens. Presets with a stage inside the LLM or during decoding are refused in one line
(`in_llm_stages`): their hooks read attention rows and KV-cache entries in every layer after
their layer K, which a linear-attention layer does not have (docs/models.md, "Qwen3.5").

Thinking. The released chat templates open a `<think>` block unless `enable_thinking` is false
(the larger checkpoints think by default); vidqa asks for direct answers (`chat_template_kwargs`),
as for the other families. A template without the switch ignores it.
"""

from __future__ import annotations

from typing import ClassVar

from vidqa.models.qwen3_vl import Qwen3VLAdapter
from vidqa.models.qwen_vl import QwenVLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    model_types = ("qwen3_5", "qwen3_5_moe")
    family = "Qwen3.5"
    model_class = "Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration"
    checkpoints = (
        "Qwen/Qwen3.5-0.8B",
        "Qwen/Qwen3.5-2B",
        "Qwen/Qwen3.5-4B",
        "Qwen/Qwen3.5-9B",
        "Qwen/Qwen3.5-27B",
        "Qwen/Qwen3.5-35B-A3B",
    )
    deepstack_layers = 0  # the tower has no DeepStack mergers
    chat_template_kwargs: ClassVar[dict] = {"enable_thinking": False}
    in_llm_stages = False
    in_llm_stages_reason = (
        "its Gated DeltaNet layers keep a recurrent state, with no per-token KV entries to drop or skip, "
        "and only its full-attention layers have attention scores"
    )

    def deepstack_features(self, output) -> None:
        """None: no DeepStack, `get_video_features` returns the merged features only."""

    def video_encoder_output(self, features, deepstack: list):
        """The pruned features in sequence order, as `pooler_output` (no DeepStack rows)."""
        return QwenVLAdapter.video_encoder_output(self, features, deepstack)
