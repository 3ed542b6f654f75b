"""GLM-4.1V-Thinking and GLM-4.5V (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration):
a dynamic-resolution ViT + GLM-4 (dense, or MoE for 4.5V), full attention, 3-D RoPE, timestamps.

Prompt. The chat template writes `<|begin_of_video|><|video|><|end_of_video|>`; the processor
expands `<|video|>` into, per temporal patch of two frames, `<|begin_of_image|>`, (H/28) x (W/28)
`<|image|>` rows, `<|end_of_image|>` and the integer second of the patch's first frame. The video
tokens are therefore IMAGE-token rows (mm_token_type_ids 2 marks them as video), one span per
temporal patch separated by the markers and the timestamp: only those rows are prunable, the
rest stays in place whatever is pruned, and the question is what follows the last span.
The times are our sampler's own (handed over as frame indices at fps 1).

Tokens. Two consecutive frames make one temporal patch (an odd last frame is repeated by the
processor), 14 px patches, and the tower merges 2x2 of them (a 2x2 conv over each run of 4
patches in the processor's order): (H/28) x (W/28) tokens per temporal patch, row-major.
`VisualTokens.frame` is the TEMPORAL-PATCH index (grid = (ceil(T/2), H/28, W/28)). Every tower
block attends within one temporal patch, so vision attention maps like Qwen3-VL's.

Positions. GLM's own 3-D RoPE: `get_rope_index` places each temporal patch as a one-frame grid
after its timestamp text (temporal index = the text position before it, then height and width
offsets), computed on the FULL prompt and gathered at the kept rows (`qwen_vl`, `mrope`): a kept
token keeps its exact (t, h, w), decode continues the unpruned sequence. `positions: compact` is
the same as original.

Rotary inside the LLM (what the in-LLM stages recompute): only the first half of each head
rotates (`partial_rotary_factor` 0.5). GLM-4.1V rotates adjacent pairs (dims 2i, 2i+1, its
`rotate_half_llm`); GLM-4.5V (the MoE) rotates halves, as Llama does. `apply_rotary` follows the
checkpoint's layout, so recomputed attention rows match the layer's own.

Frames. The reference is the checkpoint's video processor (`Glm4vVideoProcessor.sample_frames`,
which the model card's `apply_chat_template` path runs): `fps` frames a second (2), over at most
`max_duration` seconds (300; a longer video gets max_duration x fps frames spread over it).
The per-clip pixel budget is the processor's own (`size`: shortest_edge / longest_edge are
bounds on T x H x W); `--max-pixels N` sets it to N per frame.

Streaming (a long video a chunk at a time). The layout is Qwen-VL's (one stand-in token per
temporal patch, widened to the real patch's tokens). A chunk's pixels: the budget bounds the
WHOLE clip's T x H x W, so a chunk handed to the processor alone would get larger frames; the
chunk's frames are instead resized to the whole clip's size (the processor's own `smart_resize`
for the clip's frame count, then its own per-frame resize, on its device) and handed over with
`do_resize=False`: the pixels the one-shot processor gives those frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from vidqa.models.base import Prompt
from vidqa.models.qwen_vl import QwenVLAdapter
from vidqa.video.frame_rules import FramePlan

TOKEN_SIDE = 28  # 14 px patches merged 2x2
FRAME_FACTOR = 2  # two frames per temporal patch


@dataclass(frozen=True)
class Glm4vFrames:
    """transformers' `Glm4vVideoProcessor.sample_frames` (fps 2, max_duration 300 in the class and
    the checkpoints): floor(duration x fps) frames (at least 1), frame ceil(i x video_fps / fps);
    a video longer than max_duration gets max_duration x fps frames at np.linspace(0, duration)
    seconds. Duplicates dropped. The processor's own padding to an even count (the last frame
    repeated) happens in its patchify step, which vidqa's frames go through as well."""

    fps: float = 2.0
    max_duration: float = 300.0

    def describe(self) -> str:
        return f"{self.fps:g} fps, over at most {self.max_duration:g} s (GLM-4.1V processor)"

    def plan(self, total: int, video_fps: float) -> FramePlan:
        duration = total / video_fps
        last = total - 1
        if duration <= self.max_duration:
            count = max(math.floor(duration * self.fps), 1)
            offsets = [min(last, math.ceil(i * video_fps / self.fps)) for i in range(count)]
        else:
            count = int(self.max_duration * self.fps)
            if count >= total:
                offsets = list(range(total))
            else:
                offsets = [min(last, math.ceil(t * video_fps)) for t in np.linspace(0, duration, count)]
        return FramePlan(np.unique(np.asarray(offsets, dtype=int)))


class Glm4vAdapter(QwenVLAdapter):
    model_types = ("glm4v", "glm4v_moe")
    family = "GLM-4.1V/4.5V"
    model_class = "Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration"
    checkpoints = ("zai-org/GLM-4.1V-9B-Thinking", "zai-org/GLM-4.1V-9B-Base", "zai-org/GLM-4.5V")
    token_side = TOKEN_SIDE
    frame_rule = Glm4vFrames()
    # the chat templates' end markers (generation_config eos: <|endoftext|>, <|user|>, <|observation|>)
    stop_tokens = ("<|endoftext|>", "<|user|>", "<|observation|>")
    # GLM-4.5V's template answers directly with it (an empty think block); GLM-4.1V-Thinking's ignores it
    chat_template_kwargs: ClassVar[dict] = {"enable_thinking": False}

    @classmethod
    def reference_frame_rule(cls, source: str) -> Glm4vFrames:
        """fps and max_duration from the checkpoint's video processor (the class defaults when it
        has none or cannot load)."""
        try:
            from transformers import AutoVideoProcessor

            video_processor = AutoVideoProcessor.from_pretrained(source)
        except Exception:  # noqa: BLE001 - any failure here resurfaces when the model loads
            return cls.frame_rule
        fps = getattr(video_processor, "fps", None) or cls.frame_rule.fps
        max_duration = getattr(video_processor, "max_duration", None) or cls.frame_rule.max_duration
        return Glm4vFrames(fps=float(fps), max_duration=float(max_duration))

    streams = True  # prompt_layout + chunk_prompt hold (tests/test_streaming.py)
    mrope = True

    @property
    def video_token_id(self) -> int:
        """The processor writes a video's tokens as `<|image|>` rows (inside the video markers)."""
        return self.model.config.image_token_id

    def build_prompt(self, frames, timestamps, question: str, history: tuple = (), **options):
        if len(frames) == 1:  # the processor's resize needs a whole temporal patch: the frame twice
            frames, timestamps = np.concatenate([frames, frames]), [timestamps[0], timestamps[0]]
        return super().build_prompt(frames, timestamps, question, history=history, **options)

    def video_kwargs(self, timestamps, num_frames: int, sample_fps: float | None = None,
                     budget_frames: int | None = None) -> dict:
        """Our frames' times (the processor writes the integer second of each temporal patch's
        first frame: seconds at fps 1) and, with `--max-pixels`, its per-frame budget as the
        processor's per-clip bounds (T x H x W, T rounded to whole temporal patches; T =
        `budget_frames`, default `num_frames`)."""
        metadata = {"total_num_frames": num_frames, "fps": 1.0, "frames_indices": [float(t) for t in timestamps]}
        kwargs = {"video_metadata": [metadata], "do_sample_frames": False}
        if self.max_pixels is not None:
            self.check_max_pixels(self.max_pixels)
            frames = max(round((budget_frames or num_frames) / FRAME_FACTOR), 1) * FRAME_FACTOR
            shortest = self.processor.video_processor.size.shortest_edge or TOKEN_SIDE * TOKEN_SIDE
            clip = self.max_pixels * frames
            kwargs["size"] = {"shortest_edge": min(shortest, clip), "longest_edge": clip}
        return kwargs

    # --- streamed requests ------------------------------------------------------------------
    def chunk_prompt(self, chunk, total_frames: int) -> Prompt:
        """The chunk's pixels as the whole clip's prompt holds them: its frames resized to the
        clip's frame size (`resized_as_clip`), the processor then not resizing; an odd last chunk
        gets its last frame twice, as the processor pads an odd clip."""
        frames, times = chunk.frames, chunk.timestamps
        if len(frames) % 2:
            frames, times = np.concatenate([frames, frames[-1:]]), np.concatenate([times, times[-1:]])
        return self.build_prompt(self.resized_as_clip(frames, total_frames), times, "?", sample_fps=chunk.sample_fps,
                                 budget_frames=total_frames, processor_kwargs={"do_resize": False})

    def resized_as_clip(self, frames: np.ndarray, total_frames: int) -> np.ndarray:
        """uint8 (t, H, W, 3) frames of a clip of `total_frames` frames -> uint8 (t, h, w, 3) at the
        size the processor resizes the whole clip to: its `smart_resize` of the clip's T x H x W
        (T at least one temporal patch, as `build_prompt` doubles a lone frame) within the bounds
        this request hands it, then its per-frame resize on its own device."""
        from transformers.image_utils import SizeDict
        from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor, smart_resize

        video_processor = self.processor.video_processor
        asked = self.video_kwargs(range(total_frames), total_frames).get("size")
        low, high = ((asked["shortest_edge"], asked["longest_edge"]) if asked is not None
                     else (video_processor.size.shortest_edge, video_processor.size.longest_edge))
        height, width = frames.shape[1:3]
        size = smart_resize(num_frames=max(total_frames, FRAME_FACTOR), height=height, width=width,
                            temporal_factor=video_processor.temporal_patch_size,
                            factor=video_processor.patch_size * video_processor.merge_size, min_pixels=low, max_pixels=high)
        device = getattr(video_processor, "device", None) or "cpu"
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None].to(device)  # (1, t, 3, H, W)
        # the resize Glm4vVideoProcessor.resize runs after its smart_resize (its base class's)
        resized = super(Glm4vVideoProcessor, video_processor).resize(
            image=video, size=SizeDict(height=size[0], width=size[1]), resample=video_processor.resample)
        return resized[0].permute(0, 2, 3, 1).cpu().numpy()

    # --- decoder internals ---------------------------------------------------------------
    @property
    def rotates_pairs(self) -> bool:
        """GLM-4.1V rotates adjacent pairs of dims; GLM-4.5V (MoE) rotates halves."""
        return self.model.config.model_type == "glm4v"

    def apply_rotary(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first cos.shape[-1] dims of (batch, heads, rows, head_dim) states; the rest
        passes unrotated (partial rotary), as the GLM attention layers apply it."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        width = cos.shape[-1]
        rotary, passthrough = states[..., :width], states[..., width:]
        if self.rotates_pairs:
            pairs = rotary.unflatten(-1, (-1, 2))  # (..., width/2, 2)
            rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        else:
            half = width // 2
            rotated = torch.cat((-rotary[..., half:], rotary[..., :half]), dim=-1)
        return torch.cat((rotary * cos + rotated * sin, passthrough), dim=-1)
