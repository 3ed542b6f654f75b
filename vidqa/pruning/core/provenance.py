"""Where every visual token of the video went in one request: kept, merged, or dropped (where).

Nothing here is stage-specific. Two records made as the request runs are combined:
- before the LLM, `VisualTokens.origin` (models/base.py): for every token of the unpruned video,
  the row that stands for it now, or -1 once dropped. `select`, `merge` and `concatenate` keep it
  up to date, and the pruner snapshots it after each pre-LLM stage (`RequestState.stage_origins`);
- inside the LLM, `RequestState.kept_rows` (decoder.py): after each in-LLM stage, the LLM-input
  row behind every row that goes on; `RequestState.layer_merges` for stages that merge there.
`token_fates` turns them into one `TokenFates` per request, which `--json` summarises
(`TokenFates.compact`) and `--show-kept` draws (vidqa/render/show_kept.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEPT, DROPPED_BEFORE_LLM, DROPPED_IN_LLM = 0, 1, 2


@dataclass
class TokenFates:
    """The fate of each of the N = frames * rows * cols tokens of the unpruned video (frame-major).

    grid: (frames, rows, cols) of the unpruned token grid (frame = temporal patch for the Qwen
        families, which encode two sampled frames as one).
    sampled_frames: frames sampled from the video (grid frame f covers sampled frames
        f * s .. f * s + s - 1, s = `frames_per_grid_frame`).
    row: (N,) long, the LLM's visual token (index into the tokens handed to the LLM) that stands
        for each token, -1 if it was dropped before the LLM.
    left_at_layer: (N,) long, the decoder layer whose stage removed that LLM token (the token
        entered the layers before it only), -1 if it reached the last layer or never entered.
    left_at_stage: (N,) long, index into `stages` of the pre-LLM stage that dropped the token, -1.
    group: (N,) long, merge group: tokens that share an LLM token with at least one other token
        (merged before the LLM, or inside it), numbered in order of their first member; -1 if not
        merged.
    stages: the pre-LLM stages in order; num_layers: decoder layers.
    representative: (N,) bool or None (unknown): for each LLM token, the one token whose grid
        position it carries (a merge's representative; for an in-LLM merge, the target's).
    """

    grid: tuple[int, int, int]
    sampled_frames: int
    row: torch.Tensor
    left_at_layer: torch.Tensor
    left_at_stage: torch.Tensor
    group: torch.Tensor
    stages: list[str]
    num_layers: int
    representative: torch.Tensor | None = None

    @property
    def frames_per_grid_frame(self) -> int:
        return max(1, -(-self.sampled_frames // max(self.grid[0], 1)))

    @property
    def frame(self) -> torch.Tensor:
        """(N,) grid frame of each token."""
        _, rows, cols = self.grid
        return torch.arange(len(self.row)) // (rows * cols)

    def outcome(self) -> torch.Tensor:
        """(N,) KEPT (its LLM token reached the last layer), DROPPED_BEFORE_LLM or DROPPED_IN_LLM."""
        outcome = torch.full_like(self.row, KEPT)
        outcome[self.left_at_layer >= 0] = DROPPED_IN_LLM
        outcome[self.row < 0] = DROPPED_BEFORE_LLM
        return outcome

    def _per_frame(self, mask: torch.Tensor) -> list[int]:
        return torch.bincount(self.frame[mask], minlength=self.grid[0]).tolist()

    def cells_per_layer(self) -> list[int]:
        """Tokens of the video stood for by the visual rows entering each decoder layer."""
        entered = self.row >= 0
        return [int((entered & ((self.left_at_layer < 0) | (self.left_at_layer > layer))).sum())
                for layer in range(self.num_layers)]

    def compact(self) -> dict:
        """The `kept` object of the --json record (docs/json.md): counts of the video's tokens."""
        outcome = self.outcome()
        left = self.left_at_layer[self.left_at_layer >= 0]
        stage = self.left_at_stage[self.left_at_stage >= 0]
        return {
            "grid": list(self.grid),
            "frames_per_grid_frame": self.frames_per_grid_frame,
            "kept_per_frame": self._per_frame(outcome == KEPT),
            "merged_per_frame": self._per_frame(self.group >= 0),
            "dropped_before_llm_per_frame": self._per_frame(outcome == DROPPED_BEFORE_LLM),
            "dropped_in_llm_per_frame": self._per_frame(outcome == DROPPED_IN_LLM),
            "dropped_at_layer": {str(layer): int((left == layer).sum()) for layer in sorted(set(left.tolist()))},
            "dropped_by_stage": {self.stages[i]: int((stage == i).sum()) for i in sorted(set(stage.tolist()))},
            "merge_groups": int(self.group.max()) + 1 if len(self.group) else 0,
            "cells_per_layer": self.cells_per_layer(),
        }


def token_fates(state, visual_rows: torch.Tensor, num_layers: int, sampled_frames: int) -> TokenFates | None:
    """The fates of the video's tokens in the request `state` describes, or None when the tokens
    handed to the LLM carry no provenance.

    visual_rows: (M,) the LLM-input row of each of the M tokens handed to the LLM
        (`GenerationInputs.visual_rows`, in the order of `state.llm_tokens`).
    """
    tokens = state.llm_tokens
    origin = getattr(tokens, "origin", None)
    if origin is None or len(visual_rows) != len(tokens):
        return None
    row = origin.detach().cpu().long()
    visual_rows = visual_rows.detach().cpu().long()
    token_left = _layer_each_token_left(state, visual_rows)
    stand_in = merged_in_llm(state, visual_rows)  # (M,) the LLM token each one's content went to
    final = stand_in[row.clamp(min=0)]
    entered = row >= 0
    left_at_layer = torch.where(entered, token_left[final], torch.full_like(row, -1))
    fates = TokenFates(
        grid=tuple(int(n) for n in tokens.grid),
        sampled_frames=int(sampled_frames),
        row=row,
        left_at_layer=left_at_layer,
        left_at_stage=_stage_each_token_left(state, len(row)),
        group=_groups(torch.where(entered, final, torch.full_like(row, -1))),
        stages=list(state.stage_origins),
        num_layers=int(num_layers),
        representative=_representatives(tokens, row, final),
    )
    # frames a stage dropped before the encoder (pruning/core/frame_selection.py): back onto the decoded clip
    selection = getattr(getattr(state, "clip", None), "frame_selection", None)
    return fates if selection is None else selection.lift(fates)


def _representatives(tokens, row: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """(N,) True for the token whose grid position each LLM token carries (`final`: the LLM
    token each one ends up in); its earliest member where the coordinates name none of them."""
    _, rows, cols = tokens.grid
    index = torch.arange(len(row))
    own = (tokens.frame.cpu().long() * rows + tokens.row.cpu().long()) * cols + tokens.col.cpu().long()  # (M,)
    names_member = (own >= 0) & (own < len(row))
    names_member &= row[own.clamp(0, max(len(row) - 1, 0))] == torch.arange(len(own))
    entered = row >= 0
    earliest = torch.full((len(own),), len(row), dtype=torch.long)
    earliest.scatter_reduce_(0, row[entered], index[entered], reduce="amin")
    cell = torch.where(names_member, own, earliest)
    return entered & (cell[final] == index)


def _layer_each_token_left(state, visual_rows: torch.Tensor) -> torch.Tensor:
    """(M,) the first in-LLM stage layer after which the token's row is gone, -1 if never."""
    left = torch.full_like(visual_rows, -1)
    for layer in sorted(state.kept_rows):
        present = torch.isin(visual_rows, state.kept_rows[layer].detach().cpu().long())
        left[(left < 0) & ~present] = layer
    return left


def merged_in_llm(state, visual_rows: torch.Tensor) -> torch.Tensor:
    """(M,) for each LLM token, the LLM token its content ends up in after the in-LLM merges
    (itself when none), following chains of merges layer by layer.

    Per layer the merges are one redirect table (member token -> target token), chased to its
    fixed point so a chain inside one layer (a -> b, b -> c) ends where it would member by
    member: a few vector ops per layer, whatever the number of merged tokens."""
    count = len(visual_rows)
    stand_in = torch.arange(count)
    if not state.layer_merges or count == 0:
        return stand_in
    token_of_row = torch.full((int(visual_rows.max()) + 1,), -1, dtype=torch.long)
    token_of_row[visual_rows] = torch.arange(count)

    def tokens_at(rows: torch.Tensor) -> torch.Tensor:  # -1 for rows that are not visual tokens
        rows = rows.detach().cpu().long()
        inside = (rows >= 0) & (rows < len(token_of_row))
        return torch.where(inside, token_of_row[rows.clamp(0, len(token_of_row) - 1)], -1)

    for layer in sorted(state.layer_merges):
        members, into = (tokens_at(rows) for rows in state.layer_merges[layer])
        both = (members >= 0) & (into >= 0)
        redirect = torch.arange(count)
        redirect[members[both]] = into[both]
        for _ in range(max(count, 1).bit_length()):  # pointer doubling: chains of any length
            chased = redirect[redirect]
            if torch.equal(chased, redirect):
                break
            redirect = chased
        stand_in = redirect[stand_in]
    return stand_in


def _stage_each_token_left(state, num_tokens: int) -> torch.Tensor:
    """(N,) index of the pre-LLM stage after which the token had no row any more, -1 if none."""
    left = torch.full((num_tokens,), -1, dtype=torch.long)
    for index, origin in enumerate(state.stage_origins.values()):
        gone = origin.detach().cpu() < 0
        left[(left < 0) & gone] = index
    return left


def _groups(key: torch.Tensor) -> torch.Tensor:
    """(N,) group id of the tokens whose `key` (>= 0) they share with another token, numbered in
    order of each group's first token; -1 for tokens alone or without a key."""
    group = torch.full_like(key, -1)
    valid = key >= 0
    if not bool(valid.any()):
        return group
    counts = torch.bincount(key[valid])
    shared = valid & (counts[key.clamp(min=0)] > 1)
    if not bool(shared.any()):
        return group
    first = torch.full((int(key.max()) + 1,), len(key), dtype=torch.long)
    first.scatter_reduce_(0, key[shared], torch.arange(len(key))[shared], reduce="amin")
    order = torch.argsort(first)  # keys by first token; unshared keys (first = len) go last
    number = torch.empty_like(order)
    number[order] = torch.arange(len(order))
    group[shared] = number[key[shared]]
    return group
