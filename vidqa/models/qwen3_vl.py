"""Qwen3-VL (Qwen3VLForConditionalGeneration, and the MoE Qwen3VLMoeForConditionalGeneration):
dynamic-resolution ViT with DeepStack + Qwen3, interleaved M-RoPE, timestamped frames.

Tokens. As in Qwen2.5-VL, two consecutive frames make one temporal patch (an odd last frame is
repeated) and the tower merges 2x2 patches of 16 px: (H/32) x (W/32) tokens per temporal patch,
temporal patch first, then row-major. `VisualTokens.frame` is the TEMPORAL-PATCH index (grid =
(ceil(T/2), H/32, W/32)); nothing in the visual span is fixed.

Timestamps. The processor writes `<t seconds>` and a `<|vision_start|> ... <|vision_end|>` span
before/around every temporal patch, t the mean time of its two frames. The times are our
sampler's own (handed over as frame indices at fps 1, so a `--start` window keeps its real
times). The video tokens are therefore one span per temporal patch, separated by text: only the
`<|video_pad|>` rows are prunable; the timestamp text stays in place whatever is pruned (a
temporal patch whose tokens are all dropped keeps its timestamp), and the question is what
follows the LAST span. A kept (or merged) token goes into the span of its `seq_index`.

DeepStack. The vision tower also returns, for each of D intermediate layers, one feature per
video token; the LLM adds feature l to the visual rows of decoder layer l's output (l < D).
They travel in `VisualTokens.deepstack` (D, N, hidden), so every pre-LLM selection or merge
applies to them exactly as to the main features, and are handed to `generate` with the
(pruned) main features in the same sequence order. In-LLM stages keep them aligned through
`pruning/core/deepstack.py` (`deepstack_layers` tells the decoder hooks how many layers get one).

Positions. `get_rope_index` on the FULL prompt (each temporal patch is its own 1-frame grid
placed after its timestamp text; the interleaved M-RoPE layout is the rotary embedding's
business, not the positions'); kept rows gather their columns and go to `generate` as (4, 1, n)
(1-D row, temporal, height, width); `rope_deltas` is reset per request to the pruned cache's
delta, so decoding continues the unpruned sequence. `positions: compact` is the same as
original (a position is a coordinate, pruning leaves no gap), as for Qwen2.5-VL.

Vision attention (VisionZip, FastVID). Every block of the tower attends over one whole temporal
patch (no windows, unlike Qwen2.5-VL), in the merger's order: each run of 2x2 = 4 consecutive
patches is one LLM token. `vision_layer` -1 is the last block, the one the merger reads; the
DeepStack mergers read intermediate blocks (`deepstack_visual_indexes`), which a preset may name
by their index.

Pixel budget. qwen-vl-utils' rule for Qwen3-VL videos, per frame: at least 128 and at most 768
tokens' worth of pixels (x (16*2)^2), the maximum also capped by a 128k-token context shared by
the clip (0.9 * 128000 tokens * 2 / frames). `--max-pixels` replaces the per-frame maximum. The
frame sampling itself is vidqa's (`--frames`/`--fps`), not qwen-vl-utils' 2 fps default.
"""

from __future__ import annotations

import torch

from vidqa.errors import BadInput, RuntimeFailure
from vidqa.models.base import GenerationInputs, ModelAdapter, Prompt
from vidqa.models.mrope import gathered_positions
from vidqa.models.vision_attention import VisionProbe, merge_unit_mean, read_qwen_vision_attention, resolve_vision_layer
from vidqa.tensors.tokens import VisualTokens
from vidqa.video.frame_rules import QwenVLFrames

# qwen-vl-utils (vision_process.py) constants for videos
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
MODEL_SEQ_LEN = 128000
MIN_PIXELS = 32 * 32  # one merged token of 16 px patches


def frame_pixel_budget(num_frames: int, factor: int, max_pixels: int | None = None) -> tuple[int, int]:
    """(min, max) pixels per frame: qwen-vl-utils' video rule for a token of factor x factor px;
    `max_pixels` (vidqa's --max-pixels) replaces the maximum and lowers the minimum to it."""
    min_pixels = VIDEO_MIN_TOKENS * factor * factor
    context_share = MODEL_SEQ_LEN * factor * factor * 0.9 / max(num_frames, 1) * 2
    upper = max(min(VIDEO_MAX_TOKENS * factor * factor, context_share), int(min_pixels * 1.05))
    if max_pixels is not None:
        upper = max_pixels
    return min(min_pixels, int(upper)), int(upper)


def span_layout(num_rows: int, visual_index: torch.Tensor, token_index: torch.Tensor):
    """Where tokens go in a prompt whose visual rows form several spans separated by text.

    num_rows: length of the unpruned prompt; visual_index: (N,) sorted rows of its prunable
    visual tokens; token_index: (k,) the unpruned row (`seq_index`) of each token to feed.
    Every text row stays; each token goes into the span holding its row, in the given order
    within a span. Returns (seq_index (n,) unpruned row of each new row, visual_rows (k,) new row
    of each token, order (k,) the tokens in sequence order).
    """
    is_visual = torch.zeros(num_rows, dtype=torch.bool)
    is_visual[visual_index] = True
    text_rows = (~is_visual).nonzero().flatten()
    breaks = (visual_index[1:] != visual_index[:-1] + 1).nonzero().flatten() + 1
    starts = visual_index[torch.cat([torch.zeros(1, dtype=torch.long), breaks])]
    span_start = starts[torch.searchsorted(starts, token_index, right=True) - 1]
    # sequence order: text rows by their row, tokens at their span's start, in the given order
    primary = torch.cat([text_rows, span_start])
    secondary = torch.cat([torch.zeros(len(text_rows), dtype=torch.long), torch.arange(len(token_index))])
    order = torch.argsort(primary * (len(token_index) + 1) + secondary)
    seq_index = torch.cat([text_rows, token_index])[order]
    source = order - len(text_rows)  # >= 0: the new row holds token `source`
    token_rows = (source >= 0).nonzero().flatten()
    visual_rows = torch.empty(len(token_index), dtype=torch.long)
    visual_rows[source[token_rows]] = token_rows
    return seq_index, visual_rows, source[token_rows]


class Qwen3VLAdapter(ModelAdapter):
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    family = "Qwen3-VL"
    model_class = "Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration"
    checkpoints = (
        "Qwen/Qwen3-VL-2B-Instruct",
        "Qwen/Qwen3-VL-4B-Instruct",
        "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen/Qwen3-VL-30B-A3B-Instruct",
    )
    supports_max_pixels = True
    frame_rule = QwenVLFrames()  # qwen-vl-utils: the same 2 fps, 4-768 frames rule as for Qwen2.5-VL

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def spatial_merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    @property
    def deepstack_layers(self) -> int:
        """How many first decoder layers receive a DeepStack feature."""
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    @classmethod
    def check_max_pixels(cls, max_pixels: int | None) -> None:
        if max_pixels is not None and max_pixels < MIN_PIXELS:
            raise BadInput(f"--max-pixels must be at least {MIN_PIXELS} (one 32x32 token per frame pair), got {max_pixels}")

    # --- prompt and vision -------------------------------------------------------------
    def video_kwargs(self, timestamps, num_frames: int) -> dict:
        """Processor kwargs for our sampled frames: their times, and the per-frame pixel budget."""
        video_processor = self.processor.video_processor
        factor = video_processor.patch_size * video_processor.merge_size
        self.check_max_pixels(self.max_pixels)
        low, high = frame_pixel_budget(num_frames, factor, self.max_pixels)
        # the processor writes each temporal patch's time as mean(frames_indices / fps): give it seconds at fps 1
        metadata = {"total_num_frames": num_frames, "fps": 1.0, "frames_indices": [float(t) for t in timestamps]}
        return {
            "video_metadata": [metadata],
            "do_sample_frames": False,
            # the processor's budget is for the whole clip: per-frame bounds times the frame count
            "size": {"shortest_edge": low * num_frames, "longest_edge": high * num_frames},
            "cap_pixels_per_frame": False,
        }

    def build_prompt(self, frames, timestamps, question: str, history: tuple = ()) -> Prompt:
        conversation = self.conversation(question, history)
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = self.processor(
            text=text, videos=[frames], return_tensors="pt", **self.video_kwargs(timestamps, len(frames))
        )
        inputs = {key: value for key, value in inputs.items() if key != "video_metadata"}
        video_positions = (inputs["input_ids"][0] == self.video_token_id).nonzero().flatten()
        return Prompt(inputs=inputs, visual_index=video_positions, fixed_visual_index=video_positions[:0], text=text)

    def token_grid(self, prompt: Prompt) -> tuple[int, int, int]:
        """(temporal patches, rows, cols) of the LLM's video tokens."""
        grid_t, grid_h, grid_w = (int(v) for v in prompt.inputs["video_grid_thw"][0])
        merge = self.spatial_merge_size
        return grid_t, grid_h // merge, grid_w // merge

    def encode_video(self, prompt: Prompt) -> VisualTokens:
        device = self.model.device
        pixels = prompt.inputs["pixel_values_videos"].to(device, self.model.dtype)
        grid_thw = prompt.inputs["video_grid_thw"].to(device)
        output = self.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid_thw, return_dict=True)
        features = output.pooler_output[0]  # (T' * rows * cols, hidden), temporal patch then row-major
        deepstack = torch.stack([layer[0] for layer in output.deepstack_features])  # (D, T' * rows * cols, hidden)
        num_frames, rows, cols = self.token_grid(prompt)
        count = num_frames * rows * cols
        if features.shape[0] != count or deepstack.shape[1] != count or count != len(prompt.visual_index):
            raise RuntimeFailure(
                f"Qwen3-VL gave {features.shape[0]} video features ({deepstack.shape[1]} DeepStack rows) for a "
                f"{num_frames}x{rows}x{cols} grid and {len(prompt.visual_index)} video tokens"
            )
        return VisualTokens.from_grid(features, (num_frames, rows, cols), prompt.visual_index, deepstack=deepstack)

    # --- positions ---------------------------------------------------------------------
    def full_positions(self, prompt: Prompt) -> torch.Tensor:
        """(3, seq) M-RoPE positions of the UNPRUNED prompt, from the model's own get_rope_index."""
        inputs = prompt.inputs
        position_ids, _ = self.model.model.get_rope_index(
            input_ids=inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return position_ids[:, 0].cpu()

    def generation_inputs(self, prompt: Prompt, tokens: VisualTokens, positions: str) -> GenerationInputs:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        ids = prompt.input_ids[0]
        seq_index, visual_rows, order = span_layout(ids.shape[0], prompt.visual_index.cpu(), tokens.seq_index.cpu())
        position_ids = gathered_positions(self.model, self.full_positions(prompt), seq_index)  # (4, 1, n)
        device = self.model.device
        # the LLM scatters features (and adds DeepStack rows) in sequence order
        in_sequence = order.to(tokens.features.device)
        features = tokens.features[in_sequence]
        deepstack = [(layer[in_sequence],) for layer in tokens.deepstack] if tokens.deepstack is not None else []
        new_ids = ids[seq_index][None]  # a token's row holds <|video_pad|>
        kwargs = {
            "input_ids": new_ids.to(device),
            "attention_mask": torch.ones_like(new_ids).to(device),
            "mm_token_type_ids": prompt.inputs["mm_token_type_ids"][0][seq_index][None].to(device),
            "position_ids": position_ids.to(device),
            "mm_encoder_outputs": {
                "video": BaseModelOutputWithDeepstackFeatures(pooler_output=(features,), deepstack_features=deepstack)
            },
        }
        last_visual = int(prompt.visual_index.max()) if len(prompt.visual_index) else -1
        text_start = int((seq_index <= last_visual).sum())
        return GenerationInputs(kwargs=kwargs, seq_index=seq_index, visual_rows=visual_rows, text_start=text_start)

    # --- vision-encoder attention ----------------------------------------------------------
    def observe_vision_layer(self, prompt: Prompt, layer: int) -> VisionProbe:
        """Vision block `layer` (-1: the last, which the merger reads). Every block attends within
        one temporal patch (two frames, one token each already); patches come in merge-unit order,
        so each run of spatial_merge_size^2 patches is averaged into its token."""
        visual = self.model.model.visual
        index = resolve_vision_layer(layer, len(visual.blocks))
        unit = self.spatial_merge_size ** 2
        num_patches = int(prompt.inputs["video_grid_thw"][0].prod())
        in_order = torch.arange(num_patches // unit)  # no window permutation in this tower

        def to_tokens(received, keys):
            return merge_unit_mean(received, in_order, unit), merge_unit_mean(keys, in_order, unit)

        return VisionProbe(visual.blocks[index].attn, index, read_qwen_vision_attention, to_tokens)
