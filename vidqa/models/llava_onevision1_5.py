"""LLaVA-OneVision-1.5 (LlavaOnevision15ForConditionalGeneration, transformers >= 5.25): the RICE
vision tower + Qwen3, 1-D RoPE.

Prompt and pixels. The checkpoints' processor is Qwen2-VL's (Exaone4_5_Processor around a
Qwen2VLVideoProcessor with temporal_patch_size 1), and the model card feeds it through
qwen-vl-utils' `process_vision_info`: the frame rule (2 fps, 4..768 frames, an even count) and
the per-frame pixel budget (`qwen_vl_sizing`, 28 px tokens) are Qwen2.5-VL's, and so are the
processor kwargs this adapter hands over (`--max-pixels` replaces the per-frame cap). The chat
template's one `<|vision_start|><|video_pad|><|vision_end|>` becomes T x (H/28) x (W/28)
`<|video_pad|>` rows: one span, no timestamps, nothing fixed in it.

Tokens. No temporal patches: every sampled frame is its own grid (video_grid_thw = (T, H/14,
W/14)). The tower prepends a class token to each frame (a frame, class token included, is one
attention block), drops it after the last block, and merges 2x2 patches (each run of 4 patches in
the processor's order) into (H/28) x (W/28) tokens per frame, row-major. `VisualTokens.frame` is
the sampled-frame index.

Positions. 1-D: the model numbers its rows 0..n-1 itself (RoPE in 2-D is the vision tower's only).
`positions: original` keeps each kept token's row number, `compact` renumbers the shortened
prompt, as for LLaVA-OneVision.

Vision attention (VisionZip, FastVID). Read from a tower block like Qwen's (fused qkv, 2-D RoPE,
one block per frame); each frame's class-token row is dropped before the 2x2 merge, so a frame's
patches share the attention the class token did not take.

transformers < 5.25 has no such model type: `check_transformers` refuses it in one line.
"""

from __future__ import annotations

import torch

from vidqa.models.base import GenerationInputs, Prompt
from vidqa.models.qwen2_5_vl import TOKEN_SIDE, Qwen2_5_VLAdapter
from vidqa.models.qwen_vl import QwenVLAdapter, span_layout
from vidqa.models.vision_attention import VisionProbe, merge_unit_mean, read_qwen_vision_attention, resolve_vision_layer
from vidqa.tensors.tokens import VisualTokens


class LlavaOnevision15Adapter(QwenVLAdapter):
    model_types = ("llava_onevision1_5",)
    family = "LLaVA-OneVision-1.5"
    model_class = "LlavaOnevision15ForConditionalGeneration"
    checkpoints = ("Deep-VLM/LLaVA-OneVision-1.5-4B-Instruct-hf",)  # transformers' own example checkpoint
    transformers_module = "transformers.models.llava_onevision1_5"
    since_transformers = "5.25"
    token_side = TOKEN_SIDE
    stop_tokens = ("<|im_end|>", "<|endoftext|>")  # Qwen3 chat markup
    # why EarlyTom's in-encoder stage is refused here (PresetPruner's one line)
    inside_encoder_reason = ("its tower runs all frames as one packed sequence with a class token per frame, "
                             "not the per-frame batch the in-encoder hooks merge")

    # qwen-vl-utils' resize, then the processor kwargs for our frames: Qwen2.5-VL's, the same pipeline
    processor_video = Qwen2_5_VLAdapter.processor_video
    video_kwargs = Qwen2_5_VLAdapter.video_kwargs

    # --- streamed requests: Qwen-VL's layout (one stand-in token a frame, widened to the real
    # frame's tokens), chunks of any frame count (no temporal patches: nothing to pad)
    streams = True  # prompt_layout + chunk_prompt hold (tests/test_streaming.py)
    stream_frame_multiple = 1

    def chunk_prompt(self, chunk, total_frames: int) -> Prompt:
        """The chunk's pixels, resized within the WHOLE clip's pixel budget; every frame is its own grid."""
        return self.build_prompt(chunk.frames, chunk.timestamps, "?", sample_fps=chunk.sample_fps,
                                 budget_frames=total_frames)

    def generation_inputs(self, prompt: Prompt, tokens: VisualTokens, positions: str) -> GenerationInputs:
        """Text rows stay; the kept tokens fill the one video span; 1-D positions."""
        ids = prompt.input_ids[0]
        seq_index, visual_rows, order = span_layout(ids.shape[0], prompt.visual_index.cpu(), tokens.seq_index.cpu())
        features = tokens.features[order.to(tokens.features.device)]  # the model scatters them in row order
        new_ids = ids[seq_index][None]
        position_ids = seq_index if positions == "original" else torch.arange(seq_index.shape[0])
        device = self.model.device
        kwargs = {
            "input_ids": new_ids.to(device),
            "attention_mask": torch.ones_like(new_ids).to(device),
            "position_ids": position_ids[None].to(device),
            "mm_encoder_outputs": {"video": self.video_encoder_output(features, [])},
        }
        last_visual = int(prompt.visual_index.max()) if len(prompt.visual_index) else -1
        text_start = int((seq_index <= last_visual).sum())
        return GenerationInputs(kwargs=kwargs, seq_index=seq_index, visual_rows=visual_rows, text_start=text_start)

    def observe_vision_layer(self, prompt: Prompt, layer: int) -> VisionProbe:
        """Tower block `layer` (-1: the last, which the merger reads). Each frame's block starts with
        its class token: that row is dropped, then each run of 2x2 patches is averaged."""
        visual = self.model.model.visual
        index = resolve_vision_layer(layer, len(visual.blocks))
        num_frames, height, width = (int(v) for v in prompt.inputs["video_grid_thw"][0])
        patches = height * width
        unit = self.spatial_merge_size ** 2
        units = torch.arange(num_frames * patches // unit)  # the merger reads the units in order

        def to_tokens(received, keys):
            is_patch = torch.arange(received.shape[0], device=received.device) % (patches + 1) != 0
            return merge_unit_mean(received[is_patch], units, unit), merge_unit_mean(keys[is_patch], units, unit)

        return VisionProbe(visual.blocks[index].attn, index, read_qwen_vision_attention, to_tokens)
