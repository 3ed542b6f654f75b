"""What the Qwen-VL families (Qwen2.5-VL, Qwen3-VL) share: one `QwenVLAdapter` base class.

Tokens. Both pair consecutive frames into temporal patches (an odd last frame is repeated) and
merge 2x2 patches into one LLM token: the processor reports `video_grid_thw` = (T', H, W) in
patches, the LLM sees (T', H/2, W/2) tokens, temporal patch first, then row-major.
`VisualTokens.frame` is the TEMPORAL-PATCH index. The prunable rows are the `<|video_pad|>` rows
(`video_token_id`); nothing in the visual span is fixed. They form one span (Qwen2.5-VL) or one
span per temporal patch separated by timestamp text (Qwen3-VL): `span_layout` serves both, every
text row stays and each kept (or merged) token goes into the span of its `seq_index`.

Positions. M-RoPE: every row has a (temporal, height, width) position from the model's own
`get_rope_index`, only ever called on the FULL, unpruned prompt; kept rows gather their columns
(`mrope.gathered_positions`), so a kept token keeps its exact 3-D position and the text after the
video keeps its own. They go to `generate` explicitly as (4, 1, n) = (1-D text row, temporal,
height, width), the layout `generate` builds itself, and `generate` continues each row by +1 per
decoded token: decode steps continue the UNPRUNED sequence (its last prompt row is text, equal in
all three sections). The model's cached `rope_deltas` is reset for every request to the delta of
the pruned cache (max position + 1 - pruned length), so nothing can reuse a previous request's.
`positions: compact` is the same as original: a position is a (time, row, col) coordinate, not a
count of tokens, so pruning leaves no gap to close.

Vision attention. The family says in which order its tower visits the merge units
(`merge_unit_order`); each run of 2x2 = 4 patches in merger order is one LLM token.

A subclass sets the class attributes below and overrides the hooks marked so (the frames and
processor kwargs it hands over, DeepStack features, the encoder output it feeds back).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vidqa.errors import BadInput, RuntimeFailure
from vidqa.models.base import GenerationInputs, ModelAdapter, Prompt
from vidqa.models.mrope import gathered_positions
from vidqa.models.vision_attention import VisionProbe, merge_unit_mean, read_qwen_vision_attention, resolve_vision_layer
from vidqa.tensors.tokens import VisualTokens
from vidqa.video.frame_rules import QwenVLFrames


def span_layout(num_rows: int, visual_index: torch.Tensor, token_index: torch.Tensor):
    """Where tokens go in a prompt whose visual rows form one or more spans separated by text.

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


class QwenVLAdapter(ModelAdapter):
    """Base of the Qwen-VL family adapters: prompt, encoding, M-RoPE generation inputs, vision probe."""

    supports_max_pixels = True
    frame_rule = QwenVLFrames()  # qwen-vl-utils: fps 2, 4..768 frames, an even count
    # side in pixels of one merged LLM token (patch size x spatial merge): the smallest --max-pixels
    token_side: ClassVar[int]
    # the prompt inputs the model's get_rope_index reads
    rope_index_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "mm_token_type_ids", "video_grid_thw", "attention_mask")
    # extra keyword arguments for the checkpoint's chat template (Qwen3.5: enable_thinking)
    chat_template_kwargs: ClassVar[dict] = {}

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def spatial_merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    @classmethod
    def check_max_pixels(cls, max_pixels: int | None) -> None:
        smallest = cls.token_side * cls.token_side
        if max_pixels is not None and max_pixels < smallest:
            raise BadInput(
                f"--max-pixels must be at least {smallest} (one {cls.token_side}x{cls.token_side} token per frame pair), "
                f"got {max_pixels}"
            )

    # --- prompt and vision (hooks: processor_video, video_kwargs, deepstack_features) --------
    def processor_video(self, frames, budget_frames: int | None = None):
        """What the processor receives for uint8 frames [T, H, W, 3] (hook: as they are).
        budget_frames: the frame count the pixel budget is shared by (default T; a streamed
        chunk's is the whole clip's)."""
        return frames

    def video_kwargs(self, timestamps, num_frames: int, sample_fps: float | None = None,
                     budget_frames: int | None = None) -> dict:
        """Processor kwargs for our sampled frames: their timing (`timestamps`, the clip's
        `sample_fps`) and the pixel budget (shared by `budget_frames`, default `num_frames`).
        Each family implements it."""
        raise NotImplementedError

    def prompt_for_clip(self, clip, question: str, history: tuple = (), processor_kwargs: dict | None = None) -> Prompt:
        return self.build_prompt(clip.frames, clip.timestamps, question, history=history, sample_fps=clip.sample_fps,
                                 processor_kwargs=processor_kwargs)

    def build_prompt(self, frames, timestamps, question: str, history: tuple = (), sample_fps: float | None = None,
                     processor_kwargs: dict | None = None, budget_frames: int | None = None) -> Prompt:
        conversation = self.conversation(question, history)
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, **self.chat_template_kwargs)
        video = frames if processor_kwargs else self.processor_video(frames, budget_frames)  # stand-ins stay as they are
        inputs = self.processor(
            text=text, videos=[video], return_tensors="pt",
            **self.video_kwargs(timestamps, len(frames), sample_fps, budget_frames), **(processor_kwargs or {}),
        )
        inputs = {key: value for key, value in inputs.items() if key != "video_metadata"}
        video_positions = (inputs["input_ids"][0] == self.video_token_id).nonzero().flatten()
        return Prompt(inputs=inputs, visual_index=video_positions, fixed_visual_index=video_positions[:0], text=text)

    # --- streamed requests ------------------------------------------------------------------
    # (each family says `streams = True` itself once its layout is tested: tests/test_streaming.py)
    stream_frame_multiple = 2  # a chunk holds whole temporal patches

    def chunk_prompt(self, chunk, total_frames: int) -> Prompt:
        """The chunk's pixels, resized within the WHOLE clip's pixel budget (it depends on the
        frame count). An odd last chunk gets its last frame twice, as the processor pads a whole
        clip of an odd count (Qwen3-VL's refuses a lone frame)."""
        frames, times = chunk.frames, chunk.timestamps
        if len(frames) % 2:
            frames, times = np.concatenate([frames, frames[-1:]]), np.concatenate([times, times[-1:]])
        return self.build_prompt(frames, times, "?", sample_fps=chunk.sample_fps, budget_frames=total_frames)

    def prompt_layout(self, clip, question: str, history: tuple = (), first_chunk: Prompt | None = None) -> Prompt:
        """The processor's prompt for stand-in frames of one merged token each (patch x merge px,
        not resized), every `<|video_pad|>` row then widened to the rows of one temporal patch of
        the real frames (`first_chunk`'s grid), and `video_grid_thw` set to the real grid: the
        timestamps, wrappers and text are the processor's own."""
        video_processor = self.processor.video_processor
        side = video_processor.patch_size * video_processor.merge_size
        stand_in = torch.zeros((clip.num_frames, 3, side, side))
        prompt = self.build_prompt(np.asarray(stand_in), clip.timestamps, question, history=history,
                                   sample_fps=clip.sample_fps, processor_kwargs={"do_resize": False})
        _, height, width = (int(v) for v in first_chunk.inputs["video_grid_thw"][0])
        per_patch = height * width // self.spatial_merge_size ** 2
        ids = prompt.inputs["input_ids"]
        widths = torch.where(ids[0] == self.video_token_id, per_patch, 1)
        inputs = {key: value for key, value in prompt.inputs.items() if not key.startswith("pixel_")}
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in inputs:
                inputs[key] = inputs[key].repeat_interleave(widths, dim=1)
        grid = inputs["video_grid_thw"].clone()
        grid[0, 1], grid[0, 2] = height, width
        inputs["video_grid_thw"] = grid
        video_positions = (inputs["input_ids"][0] == self.video_token_id).nonzero().flatten()
        return Prompt(inputs=inputs, visual_index=video_positions, fixed_visual_index=video_positions[:0],
                      text=prompt.text)

    def token_grid(self, prompt: Prompt) -> tuple[int, int, int]:
        """(temporal patches, rows, cols) of the LLM's video tokens."""
        grid_t, grid_h, grid_w = (int(v) for v in prompt.inputs["video_grid_thw"][0])
        merge = self.spatial_merge_size
        return grid_t, grid_h // merge, grid_w // merge

    def deepstack_features(self, output) -> torch.Tensor | None:
        """(D, T' * rows * cols, hidden) intermediate-layer features from `get_video_features`'
        output, or None for a tower without DeepStack (hook: None)."""
        return None

    def encode_video(self, prompt: Prompt) -> VisualTokens:
        device = self.model.device
        pixels = prompt.inputs["pixel_values_videos"].to(device, self.model.dtype)
        grid_thw = prompt.inputs["video_grid_thw"].to(device)
        output = self.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid_thw, return_dict=True)
        features = output.pooler_output[0]  # (T' * rows * cols, hidden), temporal patch then row-major
        deepstack = self.deepstack_features(output)
        num_frames, rows, cols = self.token_grid(prompt)
        count = num_frames * rows * cols
        deepstack_rows = count if deepstack is None else deepstack.shape[1]
        if features.shape[0] != count or deepstack_rows != count or count != len(prompt.visual_index):
            stacked = "" if deepstack is None else f" ({deepstack_rows} DeepStack rows)"
            raise RuntimeFailure(
                f"{self.family} gave {features.shape[0]} video features{stacked} for a "
                f"{num_frames}x{rows}x{cols} grid and {len(prompt.visual_index)} video tokens"
            )
        return VisualTokens.from_grid(features, (num_frames, rows, cols), prompt.visual_index, deepstack=deepstack)

    # --- positions ---------------------------------------------------------------------
    def full_positions(self, prompt: Prompt) -> torch.Tensor:
        """(3, seq) M-RoPE positions of the UNPRUNED prompt, from the model's own get_rope_index."""
        rope_inputs = {name: prompt.inputs[name] for name in self.rope_index_inputs}
        position_ids, _ = self.model.model.get_rope_index(**rope_inputs)
        return position_ids[:, 0].cpu()

    def video_encoder_output(self, features: torch.Tensor, deepstack: list):
        """The `mm_encoder_outputs["video"]` that `generate` scatters into the video rows:
        features (k, hidden) and deepstack [(k, hidden),] per layer, both in sequence order
        (hook: features only)."""
        return BaseModelOutputWithPooling(pooler_output=(features,))

    def generation_inputs(self, prompt: Prompt, tokens: VisualTokens, positions: str) -> GenerationInputs:
        # positions="compact" closes the gaps pruning leaves in 1-D positions. Under M-RoPE a
        # token's position is its (time, row, col) coordinate and the text after the video starts
        # after the largest coordinate, not after N tokens: pruning leaves no gap, and compact is
        # the same as original.
        ids = prompt.input_ids[0]
        seq_index, visual_rows, order = span_layout(ids.shape[0], prompt.visual_index.cpu(), tokens.seq_index.cpu())
        position_ids = gathered_positions(self.model, self.full_positions(prompt), seq_index)  # (4, 1, n)
        device = self.model.device
        # the LLM scatters features (and adds DeepStack rows) in sequence order
        in_sequence = order.to(tokens.features.device)
        features = tokens.features[in_sequence]
        deepstack = [(layer[in_sequence],) for layer in tokens.deepstack] if tokens.deepstack is not None else []
        new_ids = ids[seq_index][None]  # a token's row (a merged token: one of its members') holds <|video_pad|>
        kwargs = {
            "input_ids": new_ids.to(device),
            "attention_mask": torch.ones_like(new_ids).to(device),
            "mm_token_type_ids": prompt.inputs["mm_token_type_ids"][0][seq_index][None].to(device),
            "position_ids": position_ids.to(device),
            "mm_encoder_outputs": {"video": self.video_encoder_output(features, deepstack)},
        }
        last_visual = int(prompt.visual_index.max()) if len(prompt.visual_index) else -1
        text_start = int((seq_index <= last_visual).sum())
        return GenerationInputs(kwargs=kwargs, seq_index=seq_index, visual_rows=visual_rows, text_start=text_start)

    # --- vision-encoder attention ----------------------------------------------------------
    def merge_unit_order(self, prompt: Prompt) -> torch.Tensor:
        """(merge units,) the order the vision tower's blocks see the merge units in (hook: as
        the merger reads them, no permutation)."""
        unit = self.spatial_merge_size ** 2
        num_patches = int(prompt.inputs["video_grid_thw"][0].prod())
        return torch.arange(num_patches // unit)

    def observe_vision_layer(self, prompt: Prompt, layer: int) -> VisionProbe:
        """Vision block `layer` (-1: the last, which the merger reads). Values come in the
        tower's patch order: each run of spatial_merge_size^2 patches (one merge unit) is averaged,
        and the units are put back in merger (LLM token) order from `merge_unit_order`."""
        visual = self.model.model.visual
        index = resolve_vision_layer(layer, len(visual.blocks))
        unit_order = self.merge_unit_order(prompt)
        unit = self.spatial_merge_size ** 2

        def to_tokens(received, keys):
            return merge_unit_mean(received, unit_order, unit), merge_unit_mean(keys, unit_order, unit)

        return VisionProbe(visual.blocks[index].attn, index, read_qwen_vision_attention, to_tokens)
