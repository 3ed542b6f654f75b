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

Positions. 3-D M-RoPE, gathered from the unpruned prompt as `qwen_vl` describes. Here
`get_rope_index` reads input_ids, mm_token_type_ids, video_grid_thw and second_per_grid_ts
(without the last two it silently falls back to 1-D positions). `positions: compact` (PruneVid's
preset) gives the same positions as `original`.

Timing. The sampling rate handed to the processor as video metadata sets second_per_grid_ts =
2 / fps, the M-RoPE time step between temporal patches. With the reference frame rule
(`QwenVLFrames`, the default) it is the rate qwen-vl-utils reports, T / total * video_fps; with
`--frames`/`--fps` it is the frames' own, (T - 1) / (t_last - t_first) (2/F for `--fps F`).
"""

from __future__ import annotations

import json
from typing import ClassVar

import torch

from vidqa.models import qwen_vl_sizing
from vidqa.models.base import Prompt
from vidqa.models.qwen_vl import QwenVLAdapter

TOKEN_SIDE = 28  # 14 px patches merged 2x2
MIN_PIXELS = TOKEN_SIDE * TOKEN_SIDE  # one merged token


def sampled_fps(timestamps) -> float | None:
    """Frames per second of the sampled frames (mean spacing), None for a single frame."""
    times = [float(t) for t in timestamps]
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_types = ("qwen2_5_vl",)
    family = "Qwen2.5-VL"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    checkpoints = ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
    token_side = TOKEN_SIDE
    streams = True  # prompt_layout + chunk_prompt hold (tests/test_streaming.py)
    mrope = True
    # without second_per_grid_ts get_rope_index silently falls back to 1-D positions
    rope_index_inputs = (*QwenVLAdapter.rope_index_inputs, "second_per_grid_ts")
    stop_tokens = ("<|im_end|>", "<|endoftext|>")  # its generation_config lists both; forks often only one

    # image processor names in forks' preprocessor_config.json that transformers 5 does not know
    # (written by the pre-release transformers some forks were saved with) -> the class to read it
    image_processor_aliases: ClassVar[dict[str, str]] = {"Qwen2_5_VLImageProcessor": "Qwen2VLImageProcessor"}

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

    def video_kwargs(self, timestamps, num_frames: int, sample_fps: float | None = None,
                     budget_frames: int | None = None) -> dict:
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

    def processor_video(self, frames, budget_frames: int | None = None) -> torch.Tensor:
        """The frames resized as qwen-vl-utils does (`qwen_vl_sizing`): float [T, 3, h, w]."""
        return qwen_vl_sizing.resize_frames(frames, self.max_pixels, budget_frames)

    def merge_unit_order(self, prompt: Prompt) -> torch.Tensor:
        """Windowed blocks attend within windows, full-attention blocks within one temporal patch:
        all of them see the merge units in window order."""
        return qwen_window_index(self.model.model.visual, prompt.inputs["video_grid_thw"])


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
