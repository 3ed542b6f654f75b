"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): SigLIP + Qwen2, 1-D RoPE.

A video becomes T frames x (h x w) pooled tokens (14 x 14 = 196 at 384 px), followed by ONE
`image_newline` token after the whole video. The newline is part of the visual span but is never
pruned: it is not a frame token, and the papers' token counts exclude it.
"""

from __future__ import annotations

import math

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vidqa.errors import BadInput
from vidqa.models.base import GenerationInputs, ModelAdapter, Prompt
from vidqa.models.encoder_stages import FrameStageRun
from vidqa.models.vision_attention import VisionProbe, bilinear_pool, read_siglip_attention, resolve_vision_layer
from vidqa.tensors.frames import EncoderTrace, frame_tokens
from vidqa.tensors.tokens import VisualTokens
from vidqa.video.frame_rules import UniformFrames


class LlavaOnevisionAdapter(ModelAdapter):
    model_types = ("llava_onevision",)
    family = "LLaVA-OneVision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    checkpoints = (
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava-hf/llava-onevision-qwen2-72b-ov-hf",
    )

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    frame_rule = UniformFrames(32)  # the frame count LLaVA-OneVision's video results use
    # LLaVA-NeXT's `qwen_1_5` conversation (llava/conversation.py), which OneVision was trained and
    # evaluated with; the llava-hf chat template adds no system turn of its own.
    default_system_prompt = "You are a helpful assistant."
    stop_tokens = ("<|im_end|>", "<|endoftext|>")  # Qwen2 chat markup

    streams = True

    def build_prompt(self, frames, timestamps, question: str, history: tuple = (),
                     processor_kwargs: dict | None = None) -> Prompt:
        # LLaVA-OneVision's processor takes no timestamps: the model was trained without them.
        conversation = self.conversation(question, history)
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = self.processor(text=text, videos=[frames], return_tensors="pt", **(processor_kwargs or {}))
        video_positions = (inputs["input_ids"][0] == self.video_token_id).nonzero().flatten()
        return Prompt(
            inputs=dict(inputs),
            visual_index=video_positions[:-1],
            fixed_visual_index=video_positions[-1:],
            text=text,
        )

    def pooled_grid(self, num_frames: int) -> tuple[int, int, int]:
        vision = self.model.config.vision_config
        side = math.ceil((vision.image_size // vision.patch_size) / 2)
        return num_frames, side, side

    def encode_video(self, prompt: Prompt) -> VisualTokens:
        pixels = prompt.inputs["pixel_values_videos"].to(self.model.device, self.model.dtype)
        output = self.model.get_video_features(pixel_values_videos=pixels, return_dict=True)
        features = output.pooler_output[0]  # (T*h*w + 1, hidden); last row is image_newline
        grid = self.pooled_grid(pixels.shape[1])
        return VisualTokens.from_grid(features[:-1], grid, prompt.visual_index, fixed_features=features[-1:])

    def generation_inputs(self, prompt: Prompt, tokens: VisualTokens, positions: str):
        ids = prompt.input_ids[0]
        video_positions = torch.cat([prompt.visual_index, prompt.fixed_visual_index])
        start, end = int(video_positions.min()), int(video_positions.max()) + 1
        num_video_rows = len(tokens) + len(prompt.fixed_visual_index)
        device = self.model.device
        new_ids = torch.cat(
            [ids[:start], torch.full((num_video_rows,), self.video_token_id), ids[end:]]
        )[None].to(device)
        seq_index = torch.cat(
            [
                torch.arange(start),
                tokens.seq_index.cpu(),
                prompt.fixed_visual_index.cpu(),
                torch.arange(end, ids.shape[0]),
            ]
        )
        video = torch.cat([tokens.features, tokens.fixed_features.to(tokens.features)], dim=0)[None]
        position_ids = seq_index if positions == "original" else torch.arange(seq_index.shape[0])
        kwargs = {
            "input_ids": new_ids,
            "attention_mask": torch.ones_like(new_ids),
            "position_ids": position_ids[None].to(device),
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=video)},
        }
        visual_rows = torch.arange(start, start + len(tokens))
        return GenerationInputs(
            kwargs=kwargs, seq_index=seq_index, visual_rows=visual_rows, text_start=start + num_video_rows
        )

    # --- stages inside the vision encoder ------------------------------------------------
    inside_encoder = True

    def encoder_layers(self) -> torch.nn.ModuleList:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers  # older transformers nest vision_model

    def feature_layer_index(self) -> int:
        """The last SigLIP layer whose output `vision_feature_layer` reads."""
        feature = self.model.config.vision_feature_layer
        hidden_index = max(feature) if isinstance(feature, (list, tuple)) else feature
        if hidden_index < 0:  # hidden_states[i] is the output of layer i - 1
            hidden_index += len(self.encoder_layers()) + 1
        return hidden_index - 1

    def encode_video_inside(self, prompt: Prompt, plan) -> tuple[VisualTokens, EncoderTrace]:
        """`get_video_features` step by step around the hooked tower: the feature layer's
        output of the frames left -> projector -> `apply_pooling` (each frame's whole 27x27 grid
        to 14x14) -> the one image_newline after the video, as the model does."""
        if isinstance(self.model.config.vision_feature_layer, (list, tuple)):
            raise BadInput("stages inside the vision encoder need a single vision_feature_layer; this checkpoint concatenates several")
        pixels = prompt.inputs["pixel_values_videos"].to(self.model.device, self.model.dtype)
        num_frames = pixels.shape[1]
        feature = self.feature_layer_index()
        run = FrameStageRun(self.encoder_layers(), plan, num_frames, depth=feature + 1, feature_layer=feature,
                            read=read_siglip_attention)
        with run:
            self.model.model.vision_tower(pixels.flatten(0, 1))
        selected = run.features  # (M, patches, vision hidden)
        if self.model.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        video = self.model.model.apply_pooling(self.model.model.multi_modal_projector(selected))  # (M, h*w, hidden)
        newline = self.model.model.image_newline[None].to(video)
        grid = self.pooled_grid(num_frames)
        tokens = frame_tokens(video.reshape(-1, video.shape[-1]), grid, prompt.visual_index, run.track,
                              fixed_features=newline)
        if run.received is not None:  # resized like the features, as the probe does
            vision = self.model.config.vision_config
            tokens.meta["vision_attention"] = bilinear_pool(run.received, vision.image_size // vision.patch_size).reshape(-1).to(video.device)
        return tokens, run.trace(video.shape[0])

    # --- vision-encoder attention ----------------------------------------------------------
    def observe_vision_layer(self, prompt: Prompt, layer: int) -> VisionProbe:
        """SigLIP layer `layer` (-1: the layer `vision_feature_layer` reads); its 27x27 patch
        values are resized to 14x14 exactly as `apply_pooling` resizes the features."""
        layers = self.encoder_layers()
        index = resolve_vision_layer(layer, len(layers), feature_layer=self.feature_layer_index())
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size

        def to_tokens(received, keys):
            return bilinear_pool(received, side), bilinear_pool(keys, side)

        return VisionProbe(layers[index].self_attn, index, read_siglip_attention, to_tokens)
