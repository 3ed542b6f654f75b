"""SmolVLM2 (SmolVLMForConditionalGeneration): SigLIP + pixel-shuffle connector + Llama, 1-D RoPE.

Prompt. SmolVLM2 sees a video as timestamped images. Its processor expands the chat template's
`<video>` into an intro line and, per sampled frame, "Frame from MM:SS:" followed by
`<fake_token_around_image><global-img>` + one `<image>` per visual token + `<fake_token_around_image>`.
The visual tokens are therefore T spans separated by text. Only the `<image>` rows are prunable
visual tokens; the wrapper tokens and the timestamp text between frames are text, never pruned,
and stay in place (a frame whose tokens are all pruned keeps its timestamp line). For the methods
that read the question, the text is what follows the LAST frame's span.

Tokens. The video path never splits a frame: each frame is resized to the vision tower's square
input (`max_image_size`, e.g. 512 px for the 256M/500M checkpoints), SigLIP cuts it into
(S/p) x (S/p) patches and the connector's pixel shuffle folds scale x scale neighbours into one
token: (S/p/scale)^2 tokens per frame (512/16/4 = 8x8 = 64), row-major in the frame.
`frame` = sampled-frame index, `row`/`col` = position in that 8x8 grid.

Timestamps. The processor writes each frame's timestamp from our sampler's timestamps (passed as
video metadata) and the intro's duration from the video's length, as it does when it reads the
file itself. Frames: by default the processor's own rule (`SmolVLMFrames`: 1 fps, at most 64).
Positions are 1-D: a kept token keeps its original position.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vidqa.errors import RuntimeFailure
from vidqa.models.base import GenerationInputs, ModelAdapter, Prompt
from vidqa.models.encoder_stages import FrameStageRun
from vidqa.models.vision_attention import VisionProbe, block_mean, read_siglip_attention, resolve_vision_layer
from vidqa.tensors.frames import EncoderTrace, frame_tokens
from vidqa.tensors.tokens import VisualTokens
from vidqa.video.frame_rules import SmolVLMFrames


def span_starts(rows: torch.Tensor) -> torch.Tensor:
    """First row of each run of consecutive rows in sorted `rows` (one run per frame)."""
    if len(rows) == 0:
        return rows
    breaks = (rows[1:] != rows[:-1] + 1).nonzero().flatten() + 1
    return rows[torch.cat([torch.zeros(1, dtype=torch.long), breaks])]


class SmolVLMAdapter(ModelAdapter):
    model_types = ("smolvlm",)
    family = "SmolVLM2"
    model_class = "SmolVLMForConditionalGeneration"
    checkpoints = (
        "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
        "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    )

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    # --- prompt and vision -------------------------------------------------------------
    frame_rule = SmolVLMFrames()  # its processor's sampling: 1 fps, at most 64 frames
    stop_tokens = ("<end_of_utterance>",)

    @classmethod
    def reference_frame_rule(cls, source: str) -> SmolVLMFrames:
        """fps and frame cap from the checkpoint's `video_sampling` (1 and 64 in the SmolVLM2
        checkpoints); the class defaults when its video processor config has none or cannot load."""
        try:
            from transformers import AutoVideoProcessor

            video_processor = AutoVideoProcessor.from_pretrained(source)
        except Exception:  # noqa: BLE001 - any failure here resurfaces when the model loads
            return cls.frame_rule
        fps = getattr(video_processor, "fps", None) or cls.frame_rule.fps
        max_frames = getattr(video_processor, "num_frames", None) or cls.frame_rule.max_frames
        return SmolVLMFrames(fps=float(fps), max_frames=int(max_frames))

    streams = True

    def prompt_for_clip(self, clip, question: str, history: tuple = (), processor_kwargs: dict | None = None) -> Prompt:
        return self.build_prompt(clip.frames, clip.timestamps, question, history=history, duration=clip.duration,
                                 processor_kwargs=processor_kwargs)

    def build_prompt(self, frames, timestamps, question: str, history: tuple = (), duration: float | None = None,
                     processor_kwargs: dict | None = None) -> Prompt:
        """duration: the video's length in seconds for the intro line, as the processor writes it
        when it reads the file itself; None = the last timestamp (its fallback)."""
        conversation = self.conversation(question, history)
        # with a video entry the processor picks its own video chat template
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        # the processor writes timestamps as frames_indices / fps: give it seconds at fps 1
        metadata = {"total_num_frames": len(frames), "fps": 1.0,
                    "frames_indices": [float(t) for t in timestamps], "duration": duration}
        # videos nested per prompt ([[clip]]): transformers < 5.23 counts len(videos[i]) as that
        # prompt's number of videos, so a flat [clip] read as one video per frame; >= 5.23 takes both
        inputs = self.processor(
            text=text, videos=[[frames]], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt",
            **(processor_kwargs or {}),
        )
        inputs = {key: value for key, value in inputs.items() if key != "video_metadata"}
        image_positions = (inputs["input_ids"][0] == self.image_token_id).nonzero().flatten()
        return Prompt(
            inputs=inputs,
            visual_index=image_positions,
            fixed_visual_index=image_positions[:0],
            text=text,
        )

    def frame_grid(self, pixel_values: torch.Tensor) -> tuple[int, int, int]:
        """(frames, rows, cols) of the LLM's image tokens for (1, T, 3, S, S) pixel values."""
        patch = self.model.config.vision_config.patch_size
        scale = self.model.config.scale_factor
        height, width = pixel_values.shape[-2:]
        return pixel_values.shape[1], height // patch // scale, width // patch // scale

    def encode_video(self, prompt: Prompt) -> VisualTokens:
        device = self.model.device
        pixels = prompt.inputs["pixel_values"].to(device, self.model.dtype)
        mask = prompt.inputs.get("pixel_attention_mask")
        output = self.model.get_image_features(
            pixel_values=pixels, pixel_attention_mask=None if mask is None else mask.to(device), return_dict=True
        )
        pooled = output.pooler_output  # >= 5.21: one (T * rows * cols, hidden) per prompt; 5.18: (T, rows * cols, hidden)
        features = pooled[0] if isinstance(pooled, (list, tuple)) else pooled.reshape(-1, pooled.shape[-1])
        num_frames, rows, cols = self.frame_grid(pixels)
        per_frame = rows * cols
        if features.shape[0] != num_frames * per_frame or features.shape[0] != len(prompt.visual_index):
            raise RuntimeFailure(
                f"SmolVLM gave {features.shape[0]} image features for {num_frames} frames of {rows}x{cols} "
                f"and {len(prompt.visual_index)} image tokens"
            )
        return VisualTokens.from_grid(features, (num_frames, rows, cols), prompt.visual_index)

    def generation_inputs(self, prompt: Prompt, tokens: VisualTokens, positions: str) -> GenerationInputs:
        """Every text row stays; each kept (or merged) token goes into the frame span of its
        `seq_index`, in the order of `tokens` within a span."""
        ids = prompt.input_ids[0]
        visual = prompt.visual_index.cpu()
        is_visual = torch.zeros(ids.shape[0], dtype=torch.bool)
        is_visual[visual] = True
        text_rows = (~is_visual).nonzero().flatten()
        starts = span_starts(visual)
        token_index = tokens.seq_index.cpu()
        span_start = starts[torch.searchsorted(starts, token_index, right=True) - 1]
        # sequence order: text rows by their row, tokens at their span's start, in `tokens` order
        primary = torch.cat([text_rows, span_start])
        secondary = torch.cat([torch.zeros(len(text_rows), dtype=torch.long), torch.arange(len(tokens))])
        order = torch.argsort(primary * (len(tokens) + 1) + secondary)
        seq_index = torch.cat([text_rows, token_index])[order]
        source = order - len(text_rows)  # >= 0: the new row holds tokens[source]
        token_rows = (source >= 0).nonzero().flatten()
        visual_rows = torch.empty(len(tokens), dtype=torch.long)
        visual_rows[source[token_rows]] = token_rows  # row of each token, in `tokens` order
        features = tokens.features[source[token_rows].to(tokens.features.device)]  # in sequence order
        device = self.model.device
        new_ids = ids[seq_index][None].to(device)  # a token's row holds <image>
        position_ids = seq_index if positions == "original" else torch.arange(seq_index.shape[0])
        kwargs = {
            "input_ids": new_ids,
            "attention_mask": torch.ones_like(new_ids),
            "position_ids": position_ids[None].to(device),
            # one (1, n, hidden) block: >= 5.21 scatters it row by row; 5.18 reads it as one image of n tokens
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features[None])},
        }
        last_visual = int(visual.max()) if len(visual) else -1
        text_start = int((seq_index <= last_visual).sum())
        return GenerationInputs(kwargs=kwargs, seq_index=seq_index, visual_rows=visual_rows, text_start=text_start)

    # --- stages inside the vision encoder ------------------------------------------------
    inside_encoder = True

    def encode_video_inside(self, prompt: Prompt, plan) -> tuple[VisualTokens, EncoderTrace]:
        """`get_image_features` step by step around the hooked tower: SigLIP (+ post_layernorm)
        on the frames left -> the connector's pixel shuffle (each frame's whole patch grid) and
        projection, as the model does."""
        device = self.model.device
        pixels = prompt.inputs["pixel_values"].to(device, self.model.dtype)  # (1, T, 3, S, S)
        num_frames = pixels.shape[1]
        frames = pixels.flatten(0, 1)
        padding = (frames == 0.0).flatten(1).all(dim=1)  # the model skips all-zero padding images
        if bool(padding.any()):
            raise RuntimeFailure("SmolVLM: a video frame is an all-zero padding image; stages inside the encoder need every frame")
        mask = prompt.inputs.get("pixel_attention_mask")
        if mask is None:
            mask = torch.ones((num_frames, *frames.shape[2:]), dtype=torch.bool, device=device)
        else:
            mask = mask.to(device).flatten(0, 1)
        patch = self.model.config.vision_config.patch_size
        patch_mask = mask.unfold(1, patch, patch).unfold(2, patch, patch).sum(dim=(-1, -2)) > 0
        layers = self.model.model.vision_model.encoder.layers
        run = FrameStageRun(layers, plan, num_frames, depth=len(layers), read=read_siglip_attention)
        with run:
            hidden = self.model.model.vision_model(pixel_values=frames, patch_attention_mask=patch_mask).last_hidden_state
        features = self.model.model.connector(hidden)  # (M, rows * cols, hidden)
        grid = self.frame_grid(pixels)
        tokens = frame_tokens(features.reshape(-1, features.shape[-1]), grid, prompt.visual_index, run.track)
        if run.received is not None:  # averaged over the pixel-shuffle blocks, as the probe does
            side = pixels.shape[-1] // patch
            received = block_mean(run.received, side, self.model.config.scale_factor)
            tokens.meta["vision_attention"] = received.reshape(-1).to(features.device)
        return tokens, run.trace(features.shape[0])

    # --- vision-encoder attention ----------------------------------------------------------
    def observe_vision_layer(self, prompt: Prompt, layer: int) -> VisionProbe:
        """SigLIP layer `layer` (-1: the last, which the connector reads after post_layernorm);
        each scale x scale block of patches that the pixel shuffle folds into one token is averaged."""
        layers = self.model.model.vision_model.encoder.layers
        index = resolve_vision_layer(layer, len(layers))
        patch = self.model.config.vision_config.patch_size
        scale = self.model.config.scale_factor
        side = prompt.inputs["pixel_values"].shape[-1] // patch

        def to_tokens(received, keys):
            return block_mean(received, side, scale), block_mean(keys, side, scale)

        return VisionProbe(layers[index].self_attn, index, read_siglip_attention, to_tokens)
