"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): dynamic-resolution ViT + Qwen2, 3-D M-RoPE.

Tokens. Frames are first resized as the reference pipeline (qwen-vl-utils) does: multiples of
28 px inside 100,352..602,112 pixels per frame, lowered by a total budget across frames
(`qwen_vl_sizing`; `--max-pixels` replaces the per-frame cap). The checkpoint's processor then
applies its own budget (a no-op for the official checkpoints), pairs consecutive frames into
temporal patches (when T is odd the last frame is repeated), and cuts 14 px patches; the vision
tower merges 2x2 patches.
So a temporal patch of two frames gives (H/28) x (W/28) tokens, ordered temporal patch first,
then row-major over that merged grid. `VisualTokens.frame` is the TEMPORAL-PATCH index: token
frame f covers sampled frames 2f and 2f+1 (grid = (ceil(T/2), H/28, W/28)). There is no
image_newline: nothing in the visual span is fixed, `fixed_features` is an empty (0, hidden).

Positions. Qwen2.5-VL uses M-RoPE: every row has a (temporal, height, width) position.
`get_rope_index` computes them from input_ids, mm_token_type_ids, video_grid_thw and
second_per_grid_ts (without the last two it silently falls back to 1-D positions). It is only
ever called on the FULL, unpruned prompt; kept rows gather their columns, so a kept token keeps
its exact 3-D position and the text after the video keeps its own. The gathered positions go to
`generate` explicitly as (4, 1, n) = (1-D text row, temporal, height, width), the layout
`generate` builds itself, and `generate` continues each row by +1 per decoded token: decode steps
continue the UNPRUNED sequence (its last prompt row is text, equal in all three sections). The
model's cached `rope_deltas` is reset for every request to the delta of the pruned cache
(max position + 1 - pruned length), so nothing can reuse a previous request's.
`positions: compact` (PruneVid's preset) gives the same positions as `original` here: under
M-RoPE a position is a (time, row, col) coordinate, not a count of tokens, so pruning leaves no
gap to close.

Timing. The sampling rate handed to the processor as video metadata sets second_per_grid_ts =
2 / fps, the M-RoPE time step between temporal patches. With the reference frame rule
(`QwenVLFrames`, the default) it is the rate qwen-vl-utils reports, T / total * video_fps; with
`--frames`/`--fps` it is the frames' own, (T - 1) / (t_last - t_first) (2/F for `--fps F`).
"""

from __future__ import annotations

import json

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vidqa.errors import BadInput, RuntimeFailure
from vidqa.models import qwen_vl_sizing
from vidqa.models.base import GenerationInputs, ModelAdapter, Prompt
from vidqa.models.mrope import gathered_positions
from vidqa.models.vision_attention import VisionProbe, merge_unit_mean, read_qwen_vision_attention, resolve_vision_layer
from vidqa.tensors.tokens import VisualTokens
from vidqa.video.frame_rules import QwenVLFrames

MIN_PIXELS = 28 * 28  # one merged token


def sampled_fps(timestamps) -> float | None:
    """Frames per second of the sampled frames (mean spacing), None for a single frame."""
    times = [float(t) for t in timestamps]
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


class Qwen2_5_VLAdapter(ModelAdapter):
    model_types = ("qwen2_5_vl",)
    family = "Qwen2.5-VL"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    checkpoints = ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
    supports_max_pixels = True
    stop_tokens = ("<|im_end|>", "<|endoftext|>")  # its generation_config lists both; forks often only one

    # image processor names in forks' preprocessor_config.json that transformers 5 does not know
    # (written by the pre-release transformers some forks were saved with) -> the class to read it
    image_processor_aliases = {"Qwen2_5_VLImageProcessor": "Qwen2VLImageProcessor"}

    @classmethod
    def assemble_processor(cls, source: str):
        """Build the processor from its parts when AutoProcessor cannot resolve the fork's
        image processor name: same config files, the current class for that name."""
        import transformers
        from transformers.utils import cached_file

        config_file = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        name = None
        if config_file is not None:
            with open(config_file, encoding="utf-8") as handle:
                name = json.load(handle).get("image_processor_type")
        if name not in cls.image_processor_aliases:
            return None
        image_processor = getattr(transformers, cls.image_processor_aliases[name]).from_pretrained(source)
        video_processor = transformers.AutoVideoProcessor.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        processor_class = transformers.Qwen2_5_VLProcessor
        settings, _ = processor_class.get_processor_dict(source)
        chat_template = settings.get("chat_template") or tokenizer.chat_template
        return processor_class(image_processor=image_processor, video_processor=video_processor,
                               tokenizer=tokenizer, chat_template=chat_template)

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def spatial_merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    @classmethod
    def check_max_pixels(cls, max_pixels: int | None) -> None:
        if max_pixels is not None and max_pixels < MIN_PIXELS:
            raise BadInput(f"--max-pixels must be at least {MIN_PIXELS} (one 28x28 token per frame pair), got {max_pixels}")

    # --- prompt and vision -------------------------------------------------------------
    frame_rule = QwenVLFrames()  # qwen-vl-utils: fps 2, 4..768 frames, an even count

    def video_kwargs(self, timestamps, num_frames: int, sample_fps: float | None = None) -> dict:
        """Processor kwargs for our already sampled (and reference-resized) frames: their timing,
        and the checkpoint's own pixel budget unless `--max-pixels` replaces it."""
        fps = sample_fps if sample_fps is not None else sampled_fps(timestamps)
        metadata = {"total_num_frames": num_frames, "fps": fps, "frames_indices": list(range(num_frames))}
        kwargs = {"video_metadata": [metadata], "do_sample_frames": False}
        if hasattr(self.processor.video_processor, "cap_pixels_per_frame"):
            kwargs["cap_pixels_per_frame"] = False  # the total budget is applied in resize_frames
        if self.max_pixels is not None:
            self.check_max_pixels(self.max_pixels)
            shortest = self.processor.video_processor.size.shortest_edge or MIN_PIXELS
            kwargs["size"] = {"shortest_edge": min(shortest, self.max_pixels), "longest_edge": self.max_pixels}
        return kwargs

    def prompt_for_clip(self, clip, question: str, history: tuple = ()) -> Prompt:
        return self.build_prompt(clip.frames, clip.timestamps, question, history=history, sample_fps=clip.sample_fps)

    def build_prompt(self, frames, timestamps, question: str, history: tuple = (), sample_fps: float | None = None) -> Prompt:
        conversation = self.conversation(question, history)
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        video = qwen_vl_sizing.resize_frames(frames, self.max_pixels)
        inputs = self.processor(
            text=text, videos=[video], return_tensors="pt",
            **self.video_kwargs(timestamps, len(frames), sample_fps),
        )
        inputs = {key: value for key, value in inputs.items() if key != "video_metadata"}
        video_positions = (inputs["input_ids"][0] == self.video_token_id).nonzero().flatten()
        return Prompt(
            inputs=inputs,
            visual_index=video_positions,
            fixed_visual_index=video_positions[:0],
            text=text,
        )

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
        num_frames, rows, cols = self.token_grid(prompt)
        per_frame = rows * cols
        if features.shape[0] != num_frames * per_frame or features.shape[0] != len(prompt.visual_index):
            raise RuntimeFailure(
                f"Qwen2.5-VL gave {features.shape[0]} video features for a {num_frames}x{rows}x{cols} grid "
                f"and {len(prompt.visual_index)} video tokens"
            )
        return VisualTokens.from_grid(features, (num_frames, rows, cols), prompt.visual_index)

    # --- positions ---------------------------------------------------------------------
    def full_positions(self, prompt: Prompt) -> torch.Tensor:
        """(3, seq) M-RoPE positions of the UNPRUNED prompt, from the model's own get_rope_index."""
        inputs = prompt.inputs
        position_ids, _ = self.model.model.get_rope_index(
            input_ids=inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs["second_per_grid_ts"],
            attention_mask=inputs["attention_mask"],
        )
        return position_ids[:, 0].cpu()

    def generation_inputs(self, prompt: Prompt, tokens: VisualTokens, positions: str) -> GenerationInputs:
        # positions="compact" closes the gaps pruning leaves in 1-D positions. Under M-RoPE a
        # token's position is its (time, row, col) coordinate and the text after the video starts
        # after the largest coordinate, not after N tokens: pruning leaves no gap, and compact is
        # the same as original.
        ids = prompt.input_ids[0]
        video = prompt.visual_index
        start, end = int(video.min()), int(video.max()) + 1
        if end - start != len(video):
            raise RuntimeFailure("Qwen2.5-VL prompt: the video tokens are not one contiguous span")
        seq_index = torch.cat([torch.arange(start), tokens.seq_index.cpu(), torch.arange(end, ids.shape[0])])
        position_ids = gathered_positions(self.model, self.full_positions(prompt), seq_index)  # (4, 1, n)
        device = self.model.device
        new_ids = ids[seq_index][None]  # a merged token sits on one of its members' rows: a video token
        kwargs = {
            "input_ids": new_ids.to(device),
            "attention_mask": torch.ones_like(new_ids).to(device),
            "mm_token_type_ids": prompt.inputs["mm_token_type_ids"][0][seq_index][None].to(device),
            "position_ids": position_ids.to(device),
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=(tokens.features,))},
        }
        visual_rows = torch.arange(start, start + len(tokens))
        return GenerationInputs(kwargs=kwargs, seq_index=seq_index, visual_rows=visual_rows,
                                text_start=start + len(tokens))

    # --- vision-encoder attention ----------------------------------------------------------
    def observe_vision_layer(self, prompt: Prompt, layer: int) -> VisionProbe:
        """Vision block `layer` (-1: the last, which the merger reads). Windowed blocks attend
        within windows, full-attention blocks within one temporal patch (two frames, one token
        each already); values are un-permuted from window order and averaged over each 2x2 unit."""
        visual = self.model.model.visual
        index = resolve_vision_layer(layer, len(visual.blocks))
        window_index = qwen_window_index(visual, prompt.inputs["video_grid_thw"])
        unit = self.spatial_merge_size ** 2

        def to_tokens(received, keys):
            return merge_unit_mean(received, window_index, unit), merge_unit_mean(keys, window_index, unit)

        return VisionProbe(visual.blocks[index].attn, index, read_qwen_vision_attention, to_tokens)


def qwen_window_index(visual, grid_thw: torch.Tensor) -> torch.Tensor:
    """(merge units,) the order the vision tower permutes merge units into for window attention."""
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # transformers before the vision_utils module: the tower's own method
        return visual.get_window_index(grid_thw)[0]
    window_index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    return window_index
