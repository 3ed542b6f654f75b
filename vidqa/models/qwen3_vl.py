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
follows the LAST span. A kept (or merged) token goes into the span of its `seq_index`. Up to
transformers 5.24 the whole expansion also sits inside the chat template's own `<|vision_start|>`
... `<|vision_end|>`; 5.25's processor drops that pair. Nothing here depends on it.

DeepStack. The vision tower also returns, for each of D intermediate layers, one feature per
video token; the LLM adds feature l to the visual rows of decoder layer l's output (l < D).
They travel in `VisualTokens.deepstack` (D, N, hidden), so every pre-LLM selection or merge
applies to them exactly as to the main features, and are handed to `generate` with the
(pruned) main features in the same sequence order. In-LLM stages keep them aligned through
`pruning/core/deepstack.py` (`deepstack_layers` tells the decoder hooks how many layers get one).

Positions. M-RoPE gathered from the unpruned prompt as `qwen_vl` describes (each temporal patch
is its own 1-frame grid placed after its timestamp text; the interleaved M-RoPE layout is the
rotary embedding's business, not the positions'). `positions: compact` is the same as original.

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

from vidqa.models.qwen_vl import QwenVLAdapter

# qwen-vl-utils (vision_process.py) constants for videos
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
MODEL_SEQ_LEN = 128000
TOKEN_SIDE = 32  # 16 px patches merged 2x2: one merged token is 32 x 32 px, the smallest --max-pixels


def frame_pixel_budget(num_frames: int, factor: int, max_pixels: int | None = None) -> tuple[int, int]:
    """(min, max) pixels per frame: qwen-vl-utils' video rule for a token of factor x factor px;
    `max_pixels` (vidqa's --max-pixels) replaces the maximum and lowers the minimum to it."""
    min_pixels = VIDEO_MIN_TOKENS * factor * factor
    context_share = MODEL_SEQ_LEN * factor * factor * 0.9 / max(num_frames, 1) * 2
    upper = max(min(VIDEO_MAX_TOKENS * factor * factor, context_share), int(min_pixels * 1.05))
    if max_pixels is not None:
        upper = max_pixels
    return min(min_pixels, int(upper)), int(upper)


class Qwen3VLAdapter(QwenVLAdapter):
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    family = "Qwen3-VL"
    model_class = "Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration"
    checkpoints = (
        "Qwen/Qwen3-VL-2B-Instruct",
        "Qwen/Qwen3-VL-4B-Instruct",
        "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen/Qwen3-VL-30B-A3B-Instruct",
    )
    token_side = TOKEN_SIDE
    streams = True  # prompt_layout + chunk_prompt hold (tests/test_streaming.py)
    mrope = True

    @property
    def deepstack_layers(self) -> int:
        """How many first decoder layers receive a DeepStack feature."""
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    # --- prompt and vision -------------------------------------------------------------
    def video_kwargs(self, timestamps, num_frames: int, sample_fps: float | None = None,
                     budget_frames: int | None = None) -> dict:
        """Processor kwargs for our sampled frames: their times, and the per-frame pixel budget
        of a clip of `budget_frames` (default `num_frames`) frames (`sample_fps` is not needed:
        the processor writes each temporal patch's time)."""
        video_processor = self.processor.video_processor
        factor = video_processor.patch_size * video_processor.merge_size
        self.check_max_pixels(self.max_pixels)
        low, high = frame_pixel_budget(budget_frames or num_frames, factor, self.max_pixels)
        # the processor writes each temporal patch's time as mean(frames_indices / fps): give it seconds at fps 1
        metadata = {"total_num_frames": num_frames, "fps": 1.0, "frames_indices": [float(t) for t in timestamps]}
        return {
            "video_metadata": [metadata],
            "do_sample_frames": False,
            # the processor's budget is for the whole clip: per-frame bounds times the frame count
            "size": {"shortest_edge": low * num_frames, "longest_edge": high * num_frames},
            "cap_pixels_per_frame": False,
        }

    def deepstack_features(self, output) -> torch.Tensor:
        """(D, T' * rows * cols, hidden): one feature per video token for each DeepStack layer."""
        return torch.stack([layer[0] for layer in output.deepstack_features])

    def video_encoder_output(self, features: torch.Tensor, deepstack: list):
        """The pruned main features and their DeepStack rows, both in sequence order."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return BaseModelOutputWithDeepstackFeatures(pooler_output=(features,), deepstack_features=deepstack)
