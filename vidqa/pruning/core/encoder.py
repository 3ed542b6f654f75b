"""Running a preset's in-encoder stage for one request, and checking that it ran as planned.

`encode_inside` hands the adapter an `EncoderPlan` (the models/encoder_stages.py contract), whose
hooks call the stage after its encoder layers. Afterwards the frames the hooks saw entering every
encoder layer are compared with what the stage's merges planned: when transformers runs its
encoder in a way the hooks do not see (a layer called through other modules, a renamed
argument), the full encoder would run under a "pruned" label, so the request stops with one line
instead (as `PrefillCheck` does for the LLM). The counts and provenance go to the request's state.
"""

from __future__ import annotations

from torch.profiler import record_function

from vidqa.pruning.core.compat import PruningMismatch
from vidqa.pruning.core.runtime import STAGE_RANGE, RequestState, stage_threads


class EncoderPlan:
    """One request's in-encoder stage as the adapter's hooks call it.

    name: the stage's name in the preset (profiler range `vidqa.stage:<name>`); planned:
    encoder layer -> frames the stage left there, filled as it runs."""

    def __init__(self, name: str, stage, state: RequestState):
        self.name, self.stage, self.state = name, stage, state
        self.carries_attention = stage.carries_attention
        self.planned: dict[int, int] = {}
        self.acting_layers: list[int] = []

    def layers(self, depth: int) -> list[int]:
        self.acting_layers = list(self.stage.resolved_layers(depth))
        return self.acting_layers

    def after_layer(self, hidden, layer: int):
        with stage_threads(self.state.device), record_function(STAGE_RANGE + self.name):
            merge = self.stage.apply(hidden, layer, layer == self.acting_layers[-1], self.state)
        self.planned[layer] = int(hidden.shape[0]) if merge is None else merge.num_frames
        return merge


def encode_inside(adapter, prompt, name: str, stage, state: RequestState, preset: str):
    """The clip's tokens with `stage` acting inside `adapter`'s vision encoder; records the
    encoder's unpruned count, the stage's count and provenance, and the frames per encoder layer
    in `state`. Raises PruningMismatch when the hooks' observations differ from the plan."""
    plan = EncoderPlan(name, stage, state)
    tokens, trace = adapter.encode_video_inside(prompt, plan)
    frames, rows, cols = tokens.grid
    expected, current = [], frames
    for layer in range(len(trace.frames_per_layer) - 1):
        expected.append(current)
        current = plan.planned.get(layer, current)
    expected.append(current)
    missing = [layer for layer in plan.acting_layers if layer not in trace.fired]
    if missing or trace.fired != sorted(trace.fired) or len(trace.fired) != len(plan.acting_layers):
        raise PruningMismatch(f"the in-encoder stage '{name}' did not run after vision-encoder layers {plan.acting_layers} "
                              f"(it ran after {trace.fired})", preset)
    for layer, (seen, planned) in enumerate(zip(trace.frames_per_layer, expected)):
        if seen != planned:
            where = f"vision-encoder layer {layer} received" if layer < len(expected) - 1 else "the vision encoder gave"
            raise PruningMismatch(f"{where} {seen} frames, planned {planned} after the in-encoder stage '{name}'", preset)
    if len(tokens) != current * rows * cols:
        raise PruningMismatch(f"the vision encoder gave {len(tokens)} tokens for {current} frames of {rows}x{cols}", preset)
    state.record_stage("vision encoder", frames * rows * cols)
    state.record_stage(name, len(tokens), origin=tokens.origin)
    state.encoder_frames = list(trace.frames_per_layer)
    return tokens
