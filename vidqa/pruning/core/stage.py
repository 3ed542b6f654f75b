"""The kinds of stage a preset is built from, and the protocol each declares.

A stage is a frozen dataclass of parameters (its fields are the preset's `-P` keys; `metadata`
holds each field's range and help) with one job:
- `BeforeLLM.apply(tokens, state) -> tokens`: on the projected visual features, before the LLM;
- `InsideLLM.select(context) -> Selection`: at decoder layer `layer` during prefill, keeping
  `context.budget` visual tokens;
- `DuringDecode`: a setting the engine applies at every decoding step (pruning/core/decode_kv.py);
- `InsideEncoder.apply(hidden, layer, last, state) -> FrameMerge | None`: after vision-encoder
  layer k, on whole frames (models/encoder_stages.py runs it through hooks on the encoder);
- `BeforeEncoder.select(frames, unit, carry) -> ChunkSelection`: on the decoded pixels, before the
  processor and the encoder, which frames are encoded at all (pruning/core/frame_selection.py).
Every hook and capability flag the pruner and the engine read is declared here with its default;
a method overrides what it needs. Per-request state never lives on a stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, ClassVar

import torch

from vidqa.errors import BadInput

if TYPE_CHECKING:  # for annotations only: the base classes need none of these at run time
    from vidqa.pruning.core.decoder import LayerContext, Selection
    from vidqa.pruning.core.frame_selection import ChunkSelection
    from vidqa.pruning.core.runtime import RequestState
    from vidqa.pruning.core.streaming import ChunkStream
    from vidqa.tensors.frames import FrameMerge
    from vidqa.tensors.tokens import VisualTokens

REFERENCE_DEPTH = 32  # the papers' layer indices are for 32-layer LLaMA-7B
# in-encoder stages' layer indices are for LLaVA-OneVision's SigLIP-so400m: 27 layers, the last
# dropped, so 26 feed the projector (EarlyTom's PRUNE_LAYERS)
REFERENCE_ENCODER_DEPTH = 26


def param(default, low=None, high=None, help: str = "", choices: tuple | None = None):
    """A stage parameter with its valid range (inclusive) or choices, checked when a preset loads."""
    return field(default=default, metadata={"range": (low, high), "help": help, "choices": choices})


def scaled_layer(reference_layer: int, num_layers: int) -> int:
    """Map a layer index of a 32-layer model to a model of depth L: round(k*L/32), at least 1."""
    return min(max(1, round(reference_layer * num_layers / REFERENCE_DEPTH)), num_layers - 1)


@dataclass(frozen=True)
class Stage:
    """A preset stage: `kind` is its `type:` name in preset files, `where` the kind of stage.

    Flags a subclass may turn into a `-P` parameter (a dataclass field) are plain class
    attributes here, without annotation: an annotation, even ClassVar, would pin that field's
    place in every subclass's parameter order.
    """

    kind: ClassVar[str] = ""
    # "before vision encoder" | "inside vision encoder" | "before LLM" | "inside LLM" | "during decode"
    where: ClassVar[str] = ""

    @classmethod
    def parameter_specs(cls) -> dict:
        return {f.name: f for f in fields(cls)}


@dataclass(frozen=True)
class BeforeLLM(Stage):
    """A stage on the projected visual tokens, before the LLM: `apply(tokens, state) -> tokens`."""

    where: ClassVar[str] = "before LLM"
    # The parameter --keep/--flops set (None: no budget to set): `with_retention` maps a retained
    # fraction of the tokens entering the stage onto it. Read by PresetPruner.
    budget_param: ClassVar[str | None] = None
    # True when --keep/--flops still set this (last pre-LLM) stage's budget although the preset
    # has in-LLM stages: those keep their own ratios and this budget is scaled to meet the layer
    # average (FlashVID, HoliTom). False: a preset with in-LLM stages solves their ratio instead.
    # Read by PresetPruner.
    budget_with_inner_stages: ClassVar[bool] = False
    # True when `budget_param` is a retention of the clip's tokens (the unpruned grid), not of
    # the tokens entering the stage: an in-encoder stage before it already dropped frames
    # (EarlyTom rescales its ratio by the frames left). --keep/--flops then set it to the
    # clip-level retention. Read by PresetPruner.
    budget_of_clip: ClassVar[bool] = False
    # True when the stage's output depends on the question (text-guided selection): a session
    # then cannot reuse the pruned video prefix across questions. Read by engine/session.py.
    reads_question: ClassVar[bool] = False
    # The vision-encoder layer whose attention the stage reads from meta "vision_attention" /
    # "vision_keys" (negative: from the end; models/vision_attention.py), or None when it reads
    # none, so the encoder is run without it. Read by PresetPruner (one layer per preset) and
    # the engine (engine/request.py). Stages that read it declare it as a parameter.
    vision_layer = None

    def with_retention(self, fraction: float) -> BeforeLLM:
        """A copy of this stage that keeps `fraction` (in [0, 1]) of the tokens entering it."""
        return replace(self, **{self.budget_param: fraction})

    def kept_at_retention(self, num_in: int, grid: tuple[int, int, int], fraction: float) -> int | None:
        """Tokens leaving `with_retention(fraction)` when `num_in` tokens of a clip whose full
        grid is `grid` = (frames, rows, cols) enter it; None (the default) when that depends on
        the tokens themselves. PresetPruner asks it at fraction 0 for the lowest retention
        --keep/--flops can reach, and refuses a budget below it in one line."""
        return None

    def full_grid(self, tokens, placement: str = "put it first in the preset") -> tuple[int, int]:
        """(frames, tokens per frame) of `tokens`, for a stage that works on whole frames; a
        preset that put it after a stage dropping tokens is a one-line error saying `placement`."""
        num_frames, rows, cols = tokens.grid
        if len(tokens) != num_frames * rows * cols:
            raise BadInput(
                f"stage '{self.kind}' needs the full {num_frames}x{rows}x{cols} token grid, got {len(tokens)} tokens; "
                f"{placement}"
            )
        return num_frames, rows * cols

    def apply(self, tokens: VisualTokens, state: RequestState) -> VisualTokens:
        """The tokens this stage leaves of `tokens` (n rows in, k out), in sequence order; stats go
        to `state.details` / `state.notes`."""
        raise NotImplementedError

    def open_stream(self, grid: tuple[int, int, int], state: RequestState) -> ChunkStream | None:
        """A `pruning.core.streaming.ChunkStream` that gives what `apply` would on a video of token
        grid `grid` received a chunk of whole frames at a time, holding only what it may keep;
        None (the default) when the stage needs the whole video at once: a streamed request then
        holds every token until the last chunk (pruning/core/streaming.py). Read by PresetPruner."""
        return None


@dataclass(frozen=True)
class InsideLLM(Stage):
    """A stage at decoder layer K during prefill: `select(context) -> Selection`.

    Every subclass declares two parameters: `layer`, K in the papers' 32-layer numbering
    (`resolved_layer` maps it to the model), and `ratio`, a fraction in [0, 1] that sets how
    many visual tokens it keeps (`kept_at_ratio`); --keep/--flops solve one ratio for all of a
    preset's in-LLM stages, else each runs at its own.
    """

    where: ClassVar[str] = "inside LLM"
    # Why --keep/--flops cannot set this stage's budget (e.g. it depends on the clip), or None
    # when they can. Read by PresetPruner (refuses --keep/--flops with this reason) and
    # PrefillCheck (pruning/core/verify.py: the count kept is then not compared with the plan).
    unsolvable: ClassVar[str | None] = None
    # True: after prefill, layers 0..K-1 keep only the KV-cache rows of the tokens that survive
    # (PruneVid); works with a single in-LLM stage. Read by PresetPruner, which hands it to
    # DecoderPruning. Stages that offer it declare it as a parameter.
    prune_cache = False

    def resolved_layer(self, num_layers: int) -> int:
        """The absolute decoder layer of a model `num_layers` deep that this stage acts at."""
        return scaled_layer(self.layer, num_layers)

    def kept_at_ratio(self, num_in: int, num_original: int, meta: dict, ratio: float) -> int:
        """Visual tokens leaving this stage (any it inserts included) when `num_in` enter it at
        `ratio`. num_original: the clip's tokens out of the vision encoder; meta: the
        per-token tables of the tokens entering the LLM (frame, row, col, segment, ...; each
        (num_in,), CPU; empty when planning without a clip). PresetPruner solves --keep/--flops
        with it and hands the count to `select` as `context.budget`."""
        raise NotImplementedError

    def select(self, context: LayerContext) -> Selection:
        """Which of the v current visual rows survive layer K (`Selection.keep`, indices into
        `context.visual_rows`), and any rows to insert. Keep `context.budget` of them in all
        (inserted rows included); `context.ratio` is the ratio that budget came from, for a
        stage whose rule is per group rather than a total (PruneVid)."""
        raise NotImplementedError


@dataclass(frozen=True)
class DuringDecode(Stage):
    """A setting applied at every decoding step, after an untouched prefill (DyCoke's KV
    selection, pruning/core/decode_kv.py). Every subclass declares `layer` (32-layer numbering,
    the first layer that attends to the selection) and `decode_keep` (the fraction of the visual
    KV entries attended per step); PresetPruner reads both. It cannot be combined with in-LLM
    stages, whose cache rows it would not know."""

    where: ClassVar[str] = "during decode"

    def resolved_layer(self, num_layers: int) -> int:
        """The absolute decoder layer of a model `num_layers` deep that this stage acts from."""
        return scaled_layer(self.layer, num_layers)


@dataclass(frozen=True)
class InsideEncoder(Stage):
    """A stage inside the vision encoder, on whole frames (EarlyTom's frame merge).

    After each encoder layer of `resolved_layers(depth)` (depth = the layers that feed the
    projector), `apply` sees that layer's output and may merge or drop frames; the remaining
    layers, the projector / pooling and the LLM then see the frames it leaves. The unit is a
    whole frame: one attention block of a per-frame encoder (SigLIP), whose whole patch grid the
    pooling or pixel shuffle after the encoder needs. Families whose adapter has
    `inside_encoder` run it (LLaVA-OneVision, SmolVLM2); a preset with one refuses the others.
    A preset has at most one in-encoder stage; the engine encodes with it instead of encoding
    once and sharing the encoding across presets.
    """

    where: ClassVar[str] = "inside vision encoder"
    # True: the attention RECEIVED in the stage's last layer (mean over heads and queries),
    # merged with the frames like the hidden states, leaves the encoder as meta
    # "vision_attention" (mapped to LLM tokens as the family maps features) for a later pre-LLM
    # stage. Read by the adapter's hooks (models/encoder_stages.py).
    carries_attention = False

    def resolved_layers(self, depth: int) -> list[int]:
        """The encoder layers (0-based, sorted, distinct, < depth) after which `apply` runs."""
        raise NotImplementedError

    def apply(self, hidden: torch.Tensor, layer: int, last: bool, state: RequestState) -> FrameMerge | None:
        """After encoder layer `layer` (`last`: the stage's last layer): hidden (frames,
        patches, dim) is that layer's output for the frames still there. Returns how they
        merge (`FrameMerge`: rows, coefficients, and per-output-frame meta for later stages),
        or None to leave them. Stats go to `state.details`."""
        raise NotImplementedError


@dataclass(frozen=True)
class BeforeEncoder(Stage):
    """A stage on the decoded frames, before the processor and the vision encoder: which frames
    are encoded at all. It needs no model, so the frames it drops cost no preprocessing, no
    encoder and no LLM tokens; the kept frames keep their indices and timestamps.

    The unit is `unit` consecutive frames: 1, or the family's temporal patch size (Qwen-VL
    encodes two frames as one temporal patch, so a pair is kept or dropped whole and the kept
    frames still pair up as they did). `select` sees one chunk of whole units at a time with the
    state carried from the chunk before it (None at the start of a clip), so a streaming
    pipeline can run it chunk by chunk; `frame_selection.select_units` runs it over a whole clip.
    A preset has at most one; it composes in front of any preset (`--prune dedup+evs`). Its
    selection is data-driven (--keep/--flops do not set it): it decides which frames the clip
    has, and --keep then counts the tokens of the frames it kept.
    """

    where: ClassVar[str] = "before vision encoder"

    def select(self, frames, unit: int, carry) -> ChunkSelection:
        """frames: uint8 numpy (F, H, W, 3), whole units of `unit` frames in time order (the
        clip's last unit may be shorter); carry: the previous chunk's `ChunkSelection.carry`,
        None for the clip's first chunk. Returns one keep flag and one score per unit, and the
        carry for the next chunk. Per-request state lives in the carry, never on the stage."""
        raise NotImplementedError


def scaled_encoder_layer(reference_layer: int, depth: int) -> int:
    """Map an encoder layer index of the 26-layer reference tower to one `depth` layers deep:
    round(k*depth/26), within [0, depth - 1]."""
    return min(max(0, round(reference_layer * depth / REFERENCE_ENCODER_DEPTH)), depth - 1)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in increasing index order (ties: lower index first)."""
    k = max(0, min(int(k), scores.shape[0]))
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return order.sort().values
