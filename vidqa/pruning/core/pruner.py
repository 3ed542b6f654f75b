"""Running a preset for one request: pre-LLM stages, the budget `--keep`/`--flops` asks for, and
the decoder hooks for the in-LLM stages."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function

from vidqa import flops as flops_model
from vidqa.errors import BadInput, RuntimeFailure
from vidqa.pruning.core.decode_kv import DecodeKVSelection
from vidqa.pruning.core.decoder import DecoderPruning
from vidqa.pruning.core.encoder import encode_inside
from vidqa.pruning.core.frame_selection import SelectedClip, frames_per_unit, planned_selected_clip, selected_clip
from vidqa.pruning.core.runtime import STAGE_RANGE, Pruner, RequestState, stage_threads
from vidqa.pruning.core.stage import BeforeEncoder, DuringDecode, InsideEncoder
from vidqa.pruning.core.streaming import TokenStream
from vidqa.tensors.device import synchronize


@dataclass(frozen=True)
class BoundStage:
    """An in-LLM stage fixed to an absolute layer and a ratio for one request. The decoder
    hands it the layer's context with the budget planned from that ratio; the stage gets the
    ratio on the context too (`LayerContext.ratio`)."""

    stage: object  # an InsideLLM stage
    layer: int
    ratio: float

    def select(self, context):
        return self.stage.select(replace(context, ratio=self.ratio))


def layer_counts(bound: list[tuple[int, object]], num_tokens: int, num_layers: int, meta: dict, ratio) -> list[int]:
    """Visual tokens entering each layer when in-LLM stages (layer, stage) run at `ratio`
    (None = each stage's own default)."""
    counts, current = [], num_tokens
    stages = dict(bound)
    for layer in range(num_layers):
        if layer in stages:
            stage = stages[layer]
            current = stage.kept_at_ratio(current, num_tokens, meta, stage.ratio if ratio is None else ratio)
        counts.append(current)
    return counts


def requested_vision_layer(preset) -> int | None:
    """The encoder layer the preset's pre-LLM stages read vision attention from (`vision_layer`), or None."""
    layers = {stage.vision_layer for _, stage in preset.before_llm if stage.vision_layer is not None}
    if len(layers) > 1:
        raise BadInput(f"preset '{preset.name}': its stages ask for different vision layers {sorted(layers)}; use one")
    return layers.pop() if layers else None


class PresetPruner(Pruner):
    def __init__(self, preset, adapter, keep=None, flops=None):
        self.preset, self.adapter, self.keep, self.flops = preset, adapter, keep, flops
        self.positions, self.name = preset.positions, preset.name
        self.vision_layer = requested_vision_layer(preset)
        self.num_layers = adapter.text_config.num_hidden_layers
        self.bound = [(stage.resolved_layer(self.num_layers), stage) for _, stage in preset.inside_llm]
        self.layer_names = {stage.resolved_layer(self.num_layers): name for name, stage in preset.inside_llm}
        if not getattr(adapter, "in_llm_stages", True) and (
                self.bound or any(isinstance(stage, DuringDecode) for _, stage in preset.stages)):
            raise BadInput(_inside_llm_refusal(preset, adapter))
        layers = [layer for layer, _ in self.bound]
        if len(set(layers)) != len(layers):
            raise BadInput(f"preset '{preset.name}': two in-LLM stages resolve to the same layer {layers} on this {self.num_layers}-layer model")
        self.budget_stage = self._pre_llm_budget_stage()
        self.encoder_stage = self._inside_encoder_stage(adapter)
        self.frame_stage = self._before_encoder_stage()
        self.decode_stage = next((s for _, s in preset.stages if isinstance(s, DuringDecode)), None)
        if self.decode_stage is not None and self.bound:  # its cache rows assume no in-LLM dropping
            raise BadInput(f"preset '{preset.name}': a decode-time stage cannot be combined with in-LLM stages")
        if (keep is not None or flops is not None) and not self.bound and self.budget_stage is None:
            raise BadInput(f"preset '{preset.name}' has no budget for --keep/--flops to set; use its -P parameters")
        for _, stage in self.bound:  # a stage may say why its budget cannot be solved (e.g. data-dependent)
            if stage.unsolvable and (keep is not None or flops is not None):
                raise BadInput(f"preset '{preset.name}': {stage.unsolvable}")
        if not preset.before_llm and keep is not None:
            lowest = sum(layer_counts(self.bound, 10_000, self.num_layers, {}, 0.0)) / (self.num_layers * 10_000)
            if keep < lowest - 1e-9:
                raise BadInput(f"--keep {keep} is below what '{preset.name}' can reach on this {self.num_layers}-layer model (at least {lowest:.3f})")

    # -- before the vision encoder ---------------------------------------------------------
    def _before_encoder_stage(self) -> tuple[str, BeforeEncoder] | None:
        """The preset's frame-selection stage (name, stage), or None."""
        found = [(name, stage) for name, stage in self.preset.stages if isinstance(stage, BeforeEncoder)]
        if len(found) > 1:
            raise BadInput(f"preset '{self.preset.name}' has {len(found)} stages before the vision encoder; use one")
        return found[0] if found else None

    def before_encoder(self, clip, chunks=None):
        """The clip of the frames the preset's before-encoder stage keeps (a `SelectedClip`: the
        kept frames with their own indices and timestamps, and the record of the choice), or
        `clip` itself without one. The unit is the family's temporal patch (Qwen-VL: a frame
        pair), so the kept frames pair up as before. A clip this stage already selected comes
        back as it is; one another stage selected is selected again from its decoded frames.
        A planned clip (not decoded: a streamed request) is chosen from `chunks`, its frames
        decoded a chunk of whole units at a time, and comes back planned (`planned_selected_clip`)."""
        if self.frame_stage is None:
            return clip
        name, stage = self.frame_stage
        unit = frames_per_unit(self.adapter)
        if isinstance(clip, SelectedClip):
            if clip.selected_with == (name, stage, unit):
                return clip
            clip = clip.source
        if clip.planned:
            return planned_selected_clip(clip, chunks, name, stage, unit)
        return selected_clip(clip, name, stage, unit)

    def record_frame_selection(self, prompt, state: RequestState) -> None:
        """The selection's counts (before "vision encoder"), provenance and details, or one line
        when the clip was not selected (a path that built its prompt without `before_encoder`: a bug)."""
        name, _ = self.frame_stage
        selection = getattr(state.clip, "frame_selection", None)
        if selection is None or selection.stage != name:
            # every engine path (answer, sessions, streaming) selects first: a path that did not is a bug
            raise RuntimeFailure(f"preset '{self.preset.name}' picks frames before the vision encoder, but this "
                                 f"request's clip reached the encoder without that selection (a vidqa bug; please "
                                 f"report it)")
        encoded = len(prompt.visual_index)
        # every unit gives the same tokens (one frame size per clip): the clip's, had every unit been encoded
        state.record_stage("decoded frames", round(encoded * selection.num_units / max(len(selection.kept_units), 1)))
        state.record_stage(name, encoded, origin=torch.arange(encoded))
        state.details["frame_selection"] = selection.details()

    # -- inside the vision encoder ---------------------------------------------------------
    def _inside_encoder_stage(self, adapter) -> tuple[str, InsideEncoder] | None:
        """The preset's in-encoder stage (name, stage), or None; one line when it cannot run here."""
        found = [(name, stage) for name, stage in self.preset.stages if isinstance(stage, InsideEncoder)]
        if not found:
            return None
        if len(found) > 1:
            raise BadInput(f"preset '{self.preset.name}' has {len(found)} stages inside the vision encoder; use one")
        if not getattr(adapter, "inside_encoder", False):
            raise BadInput(
                f"preset '{self.preset.name}' merges whole frames inside the vision encoder, which vidqa supports on "
                f"LLaVA-OneVision and SmolVLM2 (per-frame SigLIP towers), not on {adapter.family} "
                f"({getattr(adapter, 'inside_encoder_reason', 'its tower encodes frame pairs as temporal patches')}); "
                f"pick another preset")
        if self.vision_layer is not None:  # its probe would see the frames the stage left
            raise BadInput(f"preset '{self.preset.name}': a stage inside the vision encoder cannot be combined with "
                           f"stages reading vision_layer")
        return found[0]

    def encode_video(self, adapter, prompt, state: RequestState):
        if self.frame_stage is not None:
            self.record_frame_selection(prompt, state)
            if self.encoder_stage is None:  # encoded here: a selected clip is this request's own, never cached by id
                tokens = adapter.encode_video_for(prompt, vision_layer=self.vision_layer)
                state.record_stage("vision encoder", len(tokens))
                return tokens
        if self.encoder_stage is None:
            return None
        name, stage = self.encoder_stage
        return encode_inside(adapter, prompt, name, stage, state, self.preset.name)

    # -- before the LLM ----------------------------------------------------------------------
    def _pre_llm_budget_stage(self) -> str | None:
        """The pre-LLM stage --keep/--flops set: the last pre-LLM stage, if it declares a budget
        parameter (earlier stages are data-dependent), and only when the preset has no in-LLM
        stage, unless that stage says `budget_with_inner_stages` (FlashVID: the in-LLM stages keep
        their own ratios and the pre-LLM budget is scaled to meet the layer average)."""
        if not self.preset.before_llm:
            return None
        name, stage = self.preset.before_llm[-1]
        if self.bound and not stage.budget_with_inner_stages:
            return None
        return name if stage.budget_param else None

    def _inner_share(self) -> float:
        """Layer-averaged fraction of the LLM's visual tokens that the in-LLM stages leave at
        their own ratios (1 without any): a pre-LLM budget stage keeps --keep / this."""
        if not self.bound:
            return 1.0
        num = 1_000_000
        return sum(layer_counts(self.bound, num, self.num_layers, {}, None)) / (self.num_layers * num)

    def _pre_llm_fraction(self, stage, tokens, original: int, state) -> float:
        """The fraction of its input `tokens` the budget stage keeps so that the LLM gets --keep
        of the `original` tokens (or the count meeting --flops). A stage whose
        `kept_at_retention` knows its count also says the lowest retention it can reach."""
        share = self._inner_share()
        target = self.keep / share if self.keep is not None else self._keep_for_flops(original)
        num_in = len(tokens)
        fewest = stage.kept_at_retention(num_in, tokens.grid, 0.0)
        if fewest is not None:
            lowest = fewest / original
            if target < lowest - 1e-9:
                option = "--keep" if self.keep is not None else "--flops"
                asked = self.keep if self.keep is not None else self.flops
                raise BadInput(f"{option} {asked} is below what '{self.preset.name}' can reach on this clip "
                               f"(a retention of at least {lowest * share:.3f})")
        fraction = target * original / max(num_in, 1)
        if fraction > 1 + 1e-9 and (share == 1.0 or num_in < original):  # else the in-LLM stages solve the rest
            state.notes.append(
                f"{'--keep' if self.keep is not None else '--flops'} asks for a retention of {target:.3f}{' before the LLM' if share < 1.0 else ''}, more than the "
                f"earlier pre-LLM stages left ({num_in / original:.3f}); nothing more is dropped"
            )
        fraction = min(fraction, 1.0)
        state.details["budget"] = {"stage": self.budget_stage, "ratio": round(fraction, 6), "keep": round(target, 6)}
        if share < 1.0:  # "keep" is then the retention before the LLM, --keep / share
            state.details["budget"]["inner_share"] = round(share, 6)
        return fraction

    def _keep_for_flops(self, original: int) -> float:
        """The pre-LLM retention whose token counts (the in-LLM stages, if any, at their own ratios) meet --flops."""
        llm, _ = flops_model.shapes_from_model_config(self.adapter.model.config)
        vanilla = flops_model.visual_prefill_macs(llm, [original] * self.num_layers)

        def fraction(keep: float) -> float:  # the in-LLM stages (if any) at their own ratios
            counts = layer_counts(self.bound, round(keep * original), self.num_layers, {}, None)
            return flops_model.visual_prefill_macs(llm, counts) / vanilla

        low, high = 0.0, 1.0  # fraction(low) <= flops < fraction(high), or high = 1
        for _ in range(40):
            middle = (low + high) / 2
            if fraction(middle) <= self.flops:
                low = middle
            else:
                high = middle
        return low

    def _budgeted(self, name: str, stage, tokens, state: RequestState):
        """`stage` at the retention --keep/--flops ask of it when it is the budget stage (tokens:
        what enters it, or a `StreamShape` of them)."""
        if (self.keep is None and self.flops is None) or name != self.budget_stage:
            return stage
        original = state.stage_counts["vision encoder"]
        fraction = self._pre_llm_fraction(stage, tokens, original, state)
        if stage.budget_of_clip:  # its parameter counts the clip's tokens, not its input's
            fraction = fraction * len(tokens) / max(original, 1)
        return stage.with_retention(fraction)

    def before_llm(self, tokens, state: RequestState, stages=None):
        with stage_threads(state.device):
            for name, stage in self.preset.before_llm if stages is None else stages:
                stage = self._budgeted(name, stage, tokens, state)
                with record_function(STAGE_RANGE + name):  # benchmarks/ops.py counts the ops inside
                    tokens = stage.apply(tokens, state)
                state.record_stage(name, len(tokens), origin=tokens.origin)
        synchronize(state.device)
        state.llm_tokens = tokens
        return tokens

    def token_stream(self, shape, state: RequestState):
        """The first pre-LLM stage streamed over the chunks when it can (`open_stream`), the rest
        at the end; else every token held and every stage run at the end (pruning/core/streaming.py)."""
        stages = self.preset.before_llm
        if stages:
            name, stage = stages[0]
            with stage_threads(state.device):
                opened = self._budgeted(name, stage, shape, state).open_stream(shape.grid, state)
            if opened is not None:
                return TokenStream(opened, lambda tokens: self.before_llm(tokens, state, stages[1:]),
                                   first=(name, stage), state=state)
        return super().token_stream(shape, state)

    # -- inside the LLM ----------------------------------------------------------------------
    def _prefill_hooks(self, inputs, state: RequestState):
        if not self.bound:  # pre-LLM stages only: nothing to attach to the decoder
            return contextlib.nullcontext()
        tokens = state.llm_tokens
        meta = {"frame": tokens.frame, "row": tokens.row, "col": tokens.col, **tokens.meta}
        original = state.stage_counts["vision encoder"]
        ratio = self._solve(len(tokens), original, meta, state)
        stages = [BoundStage(stage, layer, stage.ratio if ratio is None else ratio) for layer, stage in self.bound]
        counts = layer_counts(self.bound, len(tokens), self.num_layers, {k: v.cpu() for k, v in meta.items()}, ratio)
        budgets = {layer: counts[layer] for layer, _ in self.bound}
        if self.budget_stage is not None:  # before_llm recorded the pre-LLM budget; add the layers
            state.details.setdefault("budget", {})["layers"] = {str(layer): budgets[layer] for layer in budgets}
        elif self.bound:
            state.details["budget"] = {
                "ratio": None if ratio is None else round(ratio, 6),
                "layers": {str(layer): budgets[layer] for layer in budgets},
            }
        prune_cache = any(stage.prune_cache for _, stage in self.bound)
        if prune_cache and len(self.bound) > 1:
            raise BadInput("prune_cache works with a single in-LLM stage")
        return DecoderPruning(self.adapter, stages, budgets, inputs, meta, state, prune_cache=prune_cache,
                              names=self.layer_names)

    # -- during decode (DyCoke) --------------------------------------------------------------
    def inside_llm(self, inputs, state: RequestState):
        """The prefill hooks, plus the decode-time KV selection when the preset has one."""
        prefill, decode = self.inside_llm_split(inputs, state)
        return prefill if decode is None else _entered_together(prefill, decode)

    def inside_llm_split(self, inputs, state: RequestState):
        """(the prefill hooks, the DecodeKVSelection not entered, or None)."""
        prefill = self._prefill_hooks(inputs, state)
        if self.decode_stage is None:
            return prefill, None
        layer = self.decode_stage.resolved_layer(self.num_layers)
        name = next(name for name, stage in self.preset.stages if stage is self.decode_stage)
        decode = DecodeKVSelection(self.adapter, layer, self.decode_stage.decode_keep, inputs.visual_rows, state,
                                   name=name)
        return prefill, decode

    def _solve(self, num_tokens: int, original: int, meta: dict, state) -> float | None:
        """The in-LLM ratio meeting --keep (retention) or --flops (paper FLOPs fraction)."""
        if self.keep is None and self.flops is None:
            return None
        meta = {k: v.cpu() for k, v in meta.items()}
        llm, _ = flops_model.shapes_from_model_config(self.adapter.model.config)
        vanilla = flops_model.visual_prefill_macs(llm, [original] * self.num_layers)

        def measure(ratio: float) -> float:
            counts = layer_counts(self.bound, num_tokens, self.num_layers, meta, ratio)
            if self.keep is not None:
                return sum(counts) / (self.num_layers * original)
            return flops_model.visual_prefill_macs(llm, counts) / vanilla

        target = self.keep if self.keep is not None else self.flops
        option = "--keep" if self.keep is not None else "--flops"
        if self.budget_stage is not None:  # the pre-LLM stage took the budget; the in-LLM stages
            own = layer_counts(self.bound, num_tokens, self.num_layers, meta, None)  # keep their ratios
            met = sum(own) / (self.num_layers * original) if self.keep is not None else flops_model.visual_prefill_macs(llm, own) / vanilla
            if target <= met + 1e-9 or num_tokens < original:  # unless the pre-LLM stage kept all
                return None  # and more is asked (e.g. --keep 1): then they solve the rest
        highest, lowest = measure(1.0), measure(0.0)
        if target >= highest - 1e-12:
            if target > highest + 1e-9:
                state.notes.append(
                    f"{option} {target} asks for more than the pre-LLM stages left ({highest:.3f}); nothing more is dropped"
                )
            return 1.0
        if target < lowest - 1e-9:
            raise BadInput(f"{option} {target} is below what '{self.preset.name}' can reach on this clip (at least {lowest:.3f})")
        low, high = 0.0, 1.0  # measure(low) <= target < measure(high)
        for _ in range(40):
            middle = (low + high) / 2
            if measure(middle) <= target:
                low = middle
            else:
                high = middle
        return low if abs(measure(low) - target) <= abs(measure(high) - target) else high


def _inside_llm_refusal(preset, adapter) -> str:
    """One line: `preset` acts inside the LLM or while decoding, which `adapter`'s family cannot
    run (`in_llm_stages_reason`), and the built-in presets whose stages all act before the LLM."""
    from vidqa.pruning.core.presets import available_presets, load_preset

    working = []
    for name in available_presets():
        try:
            other = load_preset(name)
        except BadInput:
            continue
        if other.stages and len(other.before_llm) == len(other.stages):
            working.append(name)
    where = "inside the LLM" if preset.inside_llm else "while decoding (KV-cache selection)"
    return (f"preset '{preset.name}' has a stage {where}, which vidqa does not run on {adapter.family}: "
            f"{adapter.in_llm_stages_reason}; the presets that act before the LLM work: {', '.join(working)}")


@contextlib.contextmanager
def _entered_together(*managers):
    """Enter the hook managers only when the engine's `with` does, and always leave them."""
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield stack
