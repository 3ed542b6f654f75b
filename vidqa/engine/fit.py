"""Fit a long video into the model's context before it is encoded: `--keep auto`,
`--max-visual-tokens N`, and the one-line refusal of a prompt no preset of this kind can fit.

What must fit is the positions the LLM reads (docs/design.md, "Positions"), with room for the
answer. 1-D RoPE families (LLaVA-OneVision, SmolVLM2): the kept tokens' count decides only with
compact positions; with original ones the text after the video keeps its position, so the range
is the unpruned prompt's. `--keep auto` therefore picks the retention whose kept tokens fit AND
switches to compact positions when the original ones would not fit, and says both. M-RoPE
families (Qwen-VL): a kept token keeps its (time, row, col) coordinate and the time index
follows the frames' timestamps, so pruning shortens the rows but never the position range:
`--keep auto` can only check that the unpruned range fits (else: fewer frames or a shorter
window) and caps the count at `--max-visual-tokens`.

The prompt layout is known before any frame is encoded (engine/streaming.py), so an hour-long
video that cannot fit is refused at once, not after its encoding.
"""

from __future__ import annotations

import math

from vidqa.engine.context_fit import SUGGESTED_PRESET, PromptExtent, remedies
from vidqa.errors import BadInput


def context_limit(adapter) -> int | None:
    """The LLM's context in positions (text_config.max_position_embeddings); None where the config does not say."""
    return getattr(adapter.text_config, "max_position_embeddings", None) or None


def position_extent(adapter, prompt) -> int:
    """Positions the unpruned prompt spans: its length (1-D), or the largest M-RoPE coordinate + 1."""
    if getattr(adapter, "mrope", False):
        return int(adapter.full_positions(prompt).max()) + 1
    return prompt.length


def shortens_positions(pruner) -> bool:
    """Whether the LLM's input can be shorter than the prompt: a pre-LLM stage prunes it."""
    preset = getattr(pruner, "preset", None)
    return preset is not None and bool(preset.before_llm)


class Fitting:
    """The request's pruner, refitted once the prompt layout is known (`fit`). `notes` is the
    request's notes list; `record` goes to the --json details as "fit"."""

    def __init__(self, adapter, pruner, keep_auto: bool, max_visual_tokens: int | None, answer_tokens: int,
                 notes: list[str]):
        self.adapter, self.pruner, self.notes = adapter, pruner, notes
        self.keep_auto, self.max_visual_tokens, self.answer_tokens = keep_auto, max_visual_tokens, answer_tokens
        self.record: dict | None = None

    def fit(self, prompt, num_frames: int):
        """The pruner to run for this prompt (a new one when --keep auto / --max-visual-tokens
        chose a retention). Raises BadInput, one line, when nothing it can choose fits."""
        limit = context_limit(self.adapter)
        extent = position_extent(self.adapter, prompt) if limit else 0
        wanted = self.keep_auto or self.max_visual_tokens is not None
        if limit and not wanted and not shortens_positions(self.pruner):
            refuse_unfitting(self.adapter, self.pruner, prompt, extent, limit, self.answer_tokens, num_frames)
        if not wanted:
            return self.pruner
        visual = len(prompt.visual_index)
        fixed = prompt.length - visual
        mrope = getattr(self.adapter, "mrope", False)
        target = visual if self.max_visual_tokens is None else min(visual, self.max_visual_tokens)
        compact = False
        if limit:
            room = limit - self.answer_tokens - (extent - visual if mrope else fixed)
            if mrope:
                if extent + self.answer_tokens > limit:
                    raise BadInput(_mrope_overflow(extent, limit, prompt, num_frames, self.answer_tokens))
            else:
                target = min(target, room)
                compact = prompt.length + self.answer_tokens > limit  # original positions would not fit
        per_frame = visual // max(num_frames, 1)
        if target < 1 or (target < visual and target < per_frame):
            raise BadInput(f"{'--keep auto' if self.keep_auto else '--max-visual-tokens'}: even one frame's "
                           f"{per_frame} visual tokens do not fit the model's context of {limit} with "
                           f"{self.answer_tokens} answer tokens; use fewer --frames or a shorter --start/--end window")
        keep = 1.0 if target >= visual else math.floor(10_000 * target / visual) / 10_000
        self.pruner = _pruner_at(self.adapter, self.pruner, keep)
        if compact:
            self.pruner.positions = "compact"
        self.record = {"keep": keep, "visual_tokens": visual, "max_visual_tokens": target,
                       "positions": self.pruner.positions, "preset": self.pruner.name, "context": limit}
        self.notes.append(_fit_note(self, keep, target, visual, extent, limit, compact, mrope))
        return self.pruner

    def apply_to(self, state) -> None:
        """Put the choice in the request's --json details."""
        if self.record is not None:
            state.details["fit"] = dict(self.record)


def _pruner_at(adapter, pruner, keep: float):
    """A fresh pruner of `pruner`'s preset (`none`: the suggested pre-LLM preset) at retention `keep`."""
    from vidqa.pruning.core.presets import build_pruner, load_preset

    preset = pruner.preset if getattr(pruner, "preset", None) is not None else load_preset(SUGGESTED_PRESET)
    if not preset.before_llm:
        raise BadInput(f"--keep auto / --max-visual-tokens need a preset that prunes before the LLM; '{preset.name}' "
                       f"prunes inside it, whose prefill reads every visual token: use --prune {SUGGESTED_PRESET}")
    return build_pruner(preset, adapter, keep=keep)


def _fit_note(fitting, keep, target, visual, extent, limit, compact, mrope) -> str:
    option = "--keep auto" if fitting.keep_auto else f"--max-visual-tokens {fitting.max_visual_tokens}"
    if keep >= 1.0:
        chosen = f"keep 1 (all {visual} visual tokens fit)"
    else:
        chosen = f"keep {keep:g} (at most {target} of {visual} visual tokens)"
    where = f" with preset '{fitting.pruner.name}'"
    if mrope:
        positions = (" and positions as they are: M-RoPE keeps each token's (time, row, col) coordinate, the time "
                     f"index following the frames' timestamps, so the prompt spans {extent} positions whatever is kept")
    elif compact:
        positions = (f" and -P positions=compact: the original positions reach {extent - 1}, past the context of "
                     f"{limit}")
    else:
        positions = f" and positions {fitting.pruner.positions}"
    return f"{option}: {chosen}{where}{positions}"


def _mrope_overflow(extent, limit, prompt, num_frames, answer_tokens) -> str:
    visual = len(prompt.visual_index)
    whole = PromptExtent(fixed=prompt.length - visual, visual=extent - (prompt.length - visual), visual_tokens=visual,
                         frames=num_frames, multi_axis=True)
    fixes = remedies(whole, limit, answer_tokens, frame_step=2)
    return (f"the video spans {extent} M-RoPE positions, more than the model's context of {limit}; pruning keeps "
            f"each token's (time, row, col) position, so only fewer frames or a shorter window fit: use "
            f"{' or '.join(fixes)} or --start/--end")


def refuse_unfitting(adapter, pruner, prompt, extent: int, limit: int, answer_tokens: int, num_frames: int) -> None:
    """One line, before encoding, when the LLM must read the unpruned prompt (`none`, or a preset
    pruning only inside the LLM, whose prefill reads every visual token) and it does not fit."""
    if extent <= limit:
        return
    visual = len(prompt.visual_index)
    fixed = prompt.length - visual
    mrope = getattr(adapter, "mrope", False)
    whole = PromptExtent(fixed=fixed, visual=(extent - fixed) if mrope else visual, visual_tokens=visual,
                         frames=num_frames, multi_axis=mrope)
    fixes = remedies(whole, limit, answer_tokens, frame_step=2 if mrope else 1)
    if not mrope:
        fixes.append("--keep auto")
    span = f"{prompt.length} tokens" + (f" ({extent} M-RoPE positions)" if mrope else "")
    if getattr(pruner, "preset", None) is not None and pruner.preset.inside_llm:
        raise BadInput(f"preset '{pruner.name}' prunes inside the LLM, whose prefill reads all {visual} visual tokens: "
                       f"the prompt is {span}, more than the model's context of {limit}; use a pre-LLM preset: "
                       f"{' or '.join(fixes)}")
    raise BadInput(f"the prompt is {span}, more than the model's context of {limit}; use {' or '.join(fixes)}")
