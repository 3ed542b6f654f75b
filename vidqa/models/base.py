"""What every model family's adapter must provide.

An adapter is the only place that knows a family's quirks: how its prompt is built, where the
visual tokens sit in the sequence, the (frame, row, col) grid of each visual token, how to run
its vision encoder, how to feed (pruned) features back to `generate`, and how positions work.
The engine and the pruning stages only talk to this interface, so a new family is one new file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from vidqa.tensors.frames import EncoderTrace
from vidqa.tensors.tokens import VisualTokens
from vidqa.video.frame_rules import FrameRule, UniformFrames


def has_transformers_module(name: str) -> bool:
    """Whether the installed transformers has module `name` (e.g. a model family added later)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def preprocessing_device(model) -> torch.device | None:
    """Where the family's video processor runs: the model's device when it is a GPU (CUDA) or
    the CPU; None (the processor's own default, the CPU) for any other device or none."""
    device = getattr(model, "device", None)
    if device is None:
        return None
    device = torch.device(device)
    return device if device.type in ("cuda", "cpu") else None


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
    # how many first decoder layers receive a DeepStack feature (Qwen3-VL); the decoder hooks
    # slice those features with the visual rows (pruning/core/deepstack.py)
    deepstack_layers: int = 0
    checkpoints: ClassVar[tuple[str, ...]] = ()  # hub ids known to work (listed by `vidqa models`)
    # whether `--max-pixels` (a per-frame pixel budget for the processor) means anything here
    supports_max_pixels: ClassVar[bool] = False
    # the frames the family's reference pipeline feeds the model when --frames/--fps are not given
    frame_rule: ClassVar[FrameRule] = UniformFrames(32)
    # the system turn the family was trained with when its checkpoints' chat template adds none
    default_system_prompt: ClassVar[str | None] = None
    # tokens that end an answer besides the generation_config's eos ids (when the tokenizer has them)
    stop_tokens: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, processor, max_pixels: int | None = None, system_prompt: str | None = None):
        """system_prompt: None = the family's default (see `resolve_system_prompt`), "" = none."""
        self.model = model
        self.processor = processor
        self.max_pixels = max_pixels
        self.system_prompt = self.resolve_system_prompt(system_prompt)
        self.placement_notes: list[str] = []  # e.g. that the model was sharded because it did not fit
        self.preprocess_device = preprocessing_device(model)
        video_processor = getattr(processor, "video_processor", None)
        if video_processor is not None and self.preprocess_device is not None:
            # transformers' (torchvision) video processors read `device` from the instance when a
            # call names none (5.18 to 5.25): the frames go there as uint8, then resize/normalize there
            video_processor.device = str(self.preprocess_device)

    def resolve_system_prompt(self, asked: str | None) -> str | None:
        """The system text to send: the user's when given ("" = none); else the family default,
        but only if the tokenizer can spell it: a vocabulary without its words (vidqa's micro and
        test models) was never trained with it."""
        if asked is not None:
            return asked or None
        default = self.default_system_prompt
        tokenizer = getattr(self.processor, "tokenizer", None)
        if default is None or tokenizer is None:
            return default
        unknown = tokenizer.unk_token_id
        ids = tokenizer(default, add_special_tokens=False)["input_ids"]
        return None if unknown is not None and unknown in ids else default

    def stop_token_ids(self) -> list[int]:
        """Ids of `stop_tokens` that this tokenizer knows (added to generation's eos ids)."""
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            return []
        vocab = tokenizer.get_vocab()
        return [vocab[token] for token in self.stop_tokens if token in vocab]

    # a family whose model classes only the newer tested transformers releases have: the module
    # they live in and the first release with it (`check_transformers` refuses older ones in one line)
    transformers_module: ClassVar[str | None] = None
    since_transformers: ClassVar[str | None] = None

    @classmethod
    def check_transformers(cls) -> None:
        """Raise BadInput, naming the release needed, when this transformers lacks the family."""
        if cls.transformers_module is None or has_transformers_module(cls.transformers_module):
            return
        import transformers

        from vidqa.errors import BadInput

        raise BadInput(
            f"{cls.family} ({', '.join(cls.model_types)}) needs transformers >= {cls.since_transformers}, "
            f"this is {transformers.__version__}: pip install 'transformers>={cls.since_transformers}'"
        )

    @classmethod
    def reference_frame_rule(cls, source: str) -> FrameRule:
        """The frame rule for checkpoint `source` (a path or hub id); families whose processor
        config carries the sampling settings read them from there."""
        return cls.frame_rule

    @classmethod
    def assemble_processor(cls, source: str):
        """A processor built from its parts when AutoProcessor cannot load the checkpoint's
        (e.g. a fork naming a class transformers renamed); None = no way to, let the error stand."""
        return None

    @classmethod
    def check_max_pixels(cls, max_pixels: int | None) -> None:
        """Raise BadInput when `--max-pixels` is given to a family it cannot apply to."""
        if max_pixels is not None:
            from vidqa.errors import BadInput

            raise BadInput(
                f"--max-pixels does not apply to {cls.family}: its processor resizes every frame to a fixed size"
            )

    # --- prompt and vision -------------------------------------------------------------
    def prompt_for_clip(self, clip, question: str, history: tuple = (), processor_kwargs: dict | None = None) -> Prompt:
        """The prompt for a decoded `vidqa.video.decode.Clip`; families that use more of the clip than
        frames and timestamps (its sampling rate, its duration) override this. processor_kwargs:
        extra keyword arguments for the processor call (`prompt_layout`'s stand-in frames)."""
        return self.build_prompt(clip.frames, clip.timestamps, question, history=history,
                                 processor_kwargs=processor_kwargs)

    def build_prompt(self, frames, timestamps, question: str, history: tuple = (),
                     processor_kwargs: dict | None = None) -> Prompt:
        """The processed prompt: the video, then `question`. history: earlier (question,
        answer) turns of a conversation about the same video (`vidqa chat --history`); the
        video goes in the first turn (`conversation` builds the messages)."""
        raise NotImplementedError

    def conversation(self, question: str, history: tuple = ()) -> list[dict]:
        """Chat messages: the system turn (if any), the video in the first user turn, earlier
        (question, answer) turns, then `question`."""
        turns = [*history, (question, None)]
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        for index, (asked, answered) in enumerate(turns):
            content = [{"type": "video"}] if index == 0 else []
            messages.append({"role": "user", "content": [*content, {"type": "text", "text": asked}]})
            if answered is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
        return messages

    def prefix_length(self, inputs: GenerationInputs) -> int:
        """Rows of `inputs` that do not depend on the question: the KV cache of
        input_ids[:, :prefix_length] is computed once per video and reused for every question
        (vidqa/engine/session.py). The default is the first row after the last visual span
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

    # --- vision-encoder attention (pre-LLM saliency, models/vision_attention.py) ---------
    def observe_vision_layer(self, prompt: Prompt, layer: int):
        """A `VisionProbe` on encoder layer `layer` (negative: back from the feature layer) that,
        entered around `encode_video(prompt)`, yields that layer's attention per LLM token.
        The one method a family implements to support vision-attention stages."""
        from vidqa.errors import BadInput

        raise BadInput(f"{self.family} cannot report vision-encoder attention yet; pick another preset")

    def encode_video_for(self, prompt: Prompt, vision_layer: int | None = None) -> VisualTokens:
        """`encode_video`, with `encode_video_with_attention` when a stage asked for a vision layer."""
        if vision_layer is None:
            return self.encode_video(prompt)
        return self.encode_video_with_attention(prompt, vision_layer)

    def vision_layer_index(self, prompt: Prompt, layer: int) -> int:
        """The absolute encoder layer `layer` names (negative: back from the feature layer)."""
        return self.observe_vision_layer(prompt, layer).layer

    def encode_video_with_attention(self, prompt: Prompt, layer: int) -> VisualTokens:
        """`encode_video` plus meta["vision_attention"] (num_tokens,) and meta["vision_keys"]
        (num_tokens, head_dim) from encoder layer `layer`, aligned with the tokens."""
        probe = self.observe_vision_layer(prompt, layer)
        with probe:
            tokens = self.encode_video(prompt)
        observed = probe.result()
        if observed.received.shape[0] != len(tokens):
            from vidqa.errors import RuntimeFailure

            raise RuntimeFailure(
                f"{self.family}: vision attention for {observed.received.shape[0]} tokens, but {len(tokens)} visual tokens"
            )
        device = tokens.features.device
        tokens.meta["vision_attention"] = observed.received.to(device)
        tokens.meta["vision_keys"] = observed.keys.to(device)
        tokens.vision_layer = observed.layer
        return tokens

    # --- stages inside the vision encoder (models/encoder_stages.py) ----------------------
    # whether this family's adapter runs in-encoder stages (whole frames merged or dropped
    # after an encoder layer, `encode_video_inside`). Read by PresetPruner, which refuses a
    # preset with such a stage on a family without it, in one line.
    inside_encoder: ClassVar[bool] = False

    def encode_video_inside(self, prompt: Prompt, plan) -> tuple[VisualTokens, EncoderTrace]:
        """`encode_video` with `plan` (the models/encoder_stages.py contract) merging or dropping
        whole frames after encoder layers: the remaining layers, the projector and pooling see
        the frames it leaves. Returns the tokens of the frames left on the UNPRUNED grid
        (`frame_tokens`: provenance, and meta "vision_attention" when the plan carries
        attention) and what the hooks observed (`EncoderTrace`)."""
        from vidqa.errors import BadInput

        raise BadInput(f"{self.family} cannot run stages inside its vision encoder")

    # --- decoder internals the in-LLM stages need ----------------------------------------
    # whether every decoder layer is softmax attention over a per-token KV cache, as the in-LLM
    # stages (attention rows, rows dropped at layer K) and the decode-time KV selection assume.
    # A family with other layers (Qwen3.5's linear attention) sets False and says why in
    # `in_llm_stages_reason`; PresetPruner then refuses such presets in one line.
    in_llm_stages: ClassVar[bool] = True
    in_llm_stages_reason: ClassVar[str] = ""

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

    # --- streamed requests (engine/streaming.py; docs/design.md, "Long videos") ----------------
    # whether `prompt_layout` and `chunk_prompt` hold for this family; False: a long video is
    # decoded and encoded in one piece, with a note
    streams: ClassVar[bool] = False
    # a chunk's frame count must be a multiple of this (Qwen-VL: 2 frames make one temporal patch)
    stream_frame_multiple: ClassVar[int] = 1
    # side in px of the stand-in frames `prompt_layout` hands the processor
    stand_in_side: ClassVar[int] = 2
    # True for M-RoPE families: a position is a (time, row, col) coordinate (`full_positions`),
    # so pruning shortens the rows, never the position range (engine/fit.py)
    mrope: ClassVar[bool] = False

    def prompt_layout(self, clip, question: str, history: tuple = (), first_chunk: Prompt | None = None) -> Prompt:
        """The prompt of `clip` (a planned Clip: frame count and times, no pixels needed) with every
        input but the pixels: the input ids, the visual rows, the grid inputs the positions read.

        The processor builds it itself from blank stand-in frames it does not resize: for these
        families the prompt's text and token counts depend on the frame count and times, not on
        the pixels (tests/test_streaming.py checks it against the one-shot prompt). A family
        whose token count per frame depends on the frame size reads it from `first_chunk` (the
        first chunk's `chunk_prompt`)."""
        import numpy as np

        side = self.stand_in_side
        stand_in = replace(clip, frames=np.zeros((clip.num_frames, side, side, 3), dtype=np.uint8))
        prompt = self.prompt_for_clip(stand_in, question, history, processor_kwargs={"do_resize": False})
        return without_pixels(prompt)

    def chunk_prompt(self, chunk, total_frames: int) -> Prompt:
        """The processor's pixel inputs for `chunk` (a decoded piece of a clip of `total_frames`
        frames), exactly as the whole clip's prompt holds them for those frames; its text and rows
        are not used (`engine/streaming.py` takes the rows from `prompt_layout`)."""
        return self.prompt_for_clip(chunk, "?")


def without_pixels(prompt: Prompt) -> Prompt:
    """`prompt` without its pixel inputs (a layout: `ModelAdapter.prompt_layout`)."""
    inputs = {key: value for key, value in prompt.inputs.items() if not key.startswith("pixel_")}
    return replace(prompt, inputs=inputs)
