"""What every model family's adapter must provide.

An adapter is the only place that knows a family's quirks: how its prompt is built, where the
visual tokens sit in the sequence, the (frame, row, col) grid of each visual token, how to run
its vision encoder, how to feed (pruned) features back to `generate`, and how positions work.
The engine and the pruning stages only talk to this interface, so a new family is one new file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class VisualTokens:
    """The video's prunable visual tokens for one request (batch size 1).

    features: (num_tokens, hidden) projected features, as the LLM will receive them.
    frame, row, col: (num_tokens,) grid coordinates of each token (frame = sampled-frame index;
        for Qwen2.5-VL, which encodes two frames as one temporal patch, the temporal-patch index).
    seq_index: (num_tokens,) index of each token in the full (unpruned) prompt.
    fixed_features: (num_fixed, hidden) visual-span rows that are never pruned (LLaVA-OneVision's
        image_newline after the video), fed back unchanged.
    """

    features: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    seq_index: torch.Tensor
    grid: tuple[int, int, int]  # (frames, rows, cols) of the unpruned video
    fixed_features: torch.Tensor | None = None
    # per-token annotations added by stages (e.g. PruneVid's segment id and static flag), each (num_tokens,)
    meta: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.features.shape[0]

    @classmethod
    def from_grid(
        cls,
        features: torch.Tensor,
        grid: tuple[int, int, int],
        seq_index: torch.Tensor,
        fixed_features: torch.Tensor | None = None,
    ) -> "VisualTokens":
        """Tokens laid out frame-major then row-major over `grid` = (frames, rows, cols), the
        order every supported family's encoder emits them in."""
        num_frames, rows, cols = grid
        per_frame = rows * cols
        token = torch.arange(num_frames * per_frame, device=features.device)
        if fixed_features is None:
            fixed_features = features.new_zeros((0, features.shape[1]))
        return cls(
            features=features,
            frame=token // per_frame,
            row=(token % per_frame) // cols,
            col=token % cols,
            seq_index=seq_index.to(features.device),
            grid=grid,
            fixed_features=fixed_features,
        )

    def select(self, index: torch.Tensor) -> "VisualTokens":
        """A subset of rows (index: (k,) long), keeping the grid of the unpruned video."""
        return VisualTokens(
            features=self.features[index],
            frame=self.frame[index],
            row=self.row[index],
            col=self.col[index],
            seq_index=self.seq_index[index],
            grid=self.grid,
            fixed_features=self.fixed_features,
            meta={name: values[index] for name, values in self.meta.items()},
        )

    def replace(self, **changes) -> "VisualTokens":
        """A copy with some fields replaced (e.g. merged features with new coordinates)."""
        from dataclasses import replace

        return replace(self, **changes)


@dataclass
class Prompt:
    """A processed prompt for one request.

    inputs: the processor's output (input_ids (1, seq), attention_mask, pixel values...).
    visual_index: (num_visual,) positions of the prunable visual tokens in input_ids.
    fixed_visual_index: positions of visual-span tokens that are never pruned (e.g. the
        image_newline token LLaVA-OneVision appends after the video).
    """

    inputs: dict[str, Any]
    visual_index: torch.Tensor
    fixed_visual_index: torch.Tensor
    text: str

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class GenerationInputs:
    """What `model.generate` receives: kwargs plus the sequence index of each row."""

    kwargs: dict[str, Any]
    seq_index: torch.Tensor  # (seq,) index into the unpruned prompt of each input row
    # (num_visual,) rows of input_ids holding the prunable visual tokens, in the order of the VisualTokens
    # handed to generation_inputs (any set of rows: SmolVLM2's frames are spans separated by text)
    visual_rows: torch.Tensor
    text_start: int  # first row after the LAST visual span: the question and the chat template


class ModelAdapter:
    """Base class; one subclass per model family, registered by `config.model_type`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    model_class: ClassVar[str] = ""  # the transformers class the family's checkpoints load as
    checkpoints: ClassVar[tuple[str, ...]] = ()  # hub ids known to work (listed by `vidqa models`)
    # whether `--max-pixels` (a per-frame pixel budget for the processor) means anything here
    supports_max_pixels: ClassVar[bool] = False

    def __init__(self, model, processor, max_pixels: int | None = None):
        self.model = model
        self.processor = processor
        self.max_pixels = max_pixels

    @classmethod
    def check_max_pixels(cls, max_pixels: int | None) -> None:
        """Raise BadInput when `--max-pixels` is given to a family it cannot apply to."""
        if max_pixels is not None:
            from ..errors import BadInput

            raise BadInput(
                f"--max-pixels does not apply to {cls.family}: its processor resizes every frame to a fixed size"
            )

    # --- prompt and vision -------------------------------------------------------------
    def build_prompt(self, frames, timestamps, question: str, history: tuple = ()) -> Prompt:
        """The processed prompt: the video, then `question`. history: earlier (question,
        answer) turns of a conversation about the same video (`vidqa chat --history`); the
        video goes in the first turn (`conversation` builds the messages)."""
        raise NotImplementedError

    @staticmethod
    def conversation(question: str, history: tuple = ()) -> list[dict]:
        """Chat messages: the video in the first user turn, earlier turns, then `question`."""
        turns = [*history, (question, None)]
        messages = []
        for index, (asked, answered) in enumerate(turns):
            content = [{"type": "video"}] if index == 0 else []
            messages.append({"role": "user", "content": [*content, {"type": "text", "text": asked}]})
            if answered is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
        return messages

    def prefix_length(self, inputs: GenerationInputs) -> int:
        """Rows of `inputs` that do not depend on the question: the KV cache of
        input_ids[:, :prefix_length] is computed once per video and reused for every question
        (vidqa/session.py). The default is the first row after the last visual span
        (`text_start`); the text between the video and the question (template markup) goes to
        the question's side, which is always correct, only a few rows less reused. A family
        whose prompt puts anything question-dependent BEFORE the video must return a smaller
        number; the session also checks at run time that the prefix rows (ids and positions)
        of every question's prompt equal the cached ones and falls back to a full prefill if not.
        """
        return inputs.text_start

    def encode_video(self, prompt: Prompt) -> VisualTokens:
        raise NotImplementedError

    def generation_inputs(self, prompt: Prompt, tokens: VisualTokens, positions: str) -> GenerationInputs:
        """Generate kwargs that feed `tokens` (possibly pruned/merged) in place of the video.

        positions: "original" keeps each kept token's position from the unpruned prompt (text after
        the video keeps its positions too); "compact" renumbers the shortened prompt 0..n-1.
        """
        raise NotImplementedError

    # --- decoder internals the in-LLM stages need ----------------------------------------
    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings -> layers -> norm), without the lm_head."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    def apply_rotary(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on (batch, heads, rows, head_dim) states with that layer's (cos, sin) rows."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = states.shape[-1] // 2
        rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
        return states * cos + rotated * sin
