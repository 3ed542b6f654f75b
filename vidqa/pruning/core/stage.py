"""The two kinds of stage a preset is built from.

A stage is a frozen dataclass of parameters (its fields are the preset's `-P` keys; `metadata`
holds each field's range and help) with one job:
- `BeforeLLM.apply(tokens, state) -> tokens`: on the projected visual features, before the LLM;
- `InsideLLM.select(context, ratio) -> Selection`: at decoder layer `layer` during prefill.
Per-request state never lives on a stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import torch

from vidqa.errors import BadInput

REFERENCE_DEPTH = 32  # the papers' layer indices are for 32-layer LLaMA-7B


def param(default, low=None, high=None, help: str = "", choices: tuple | None = None):
    """A stage parameter with its valid range (inclusive) or choices, checked when a preset loads."""
    return field(default=default, metadata={"range": (low, high), "help": help, "choices": choices})


def scaled_layer(reference_layer: int, num_layers: int) -> int:
    """Map a layer index of a 32-layer model to a model of depth L: round(k*L/32), at least 1."""
    return min(max(1, round(reference_layer * num_layers / REFERENCE_DEPTH)), num_layers - 1)


@dataclass(frozen=True)
class Stage:
    kind: ClassVar[str] = ""
    where: ClassVar[str] = ""  # "before LLM" | "inside LLM"

    @classmethod
    def parameter_specs(cls) -> dict:
        return {f.name: f for f in fields(cls)}


@dataclass(frozen=True)
class BeforeLLM(Stage):
    where: ClassVar[str] = "before LLM"
    # A stage whose token budget --keep/--flops can set names that parameter here (None: no
    # budget to set) and maps a retained fraction of the tokens entering it onto it.
    budget_param: ClassVar[str | None] = None

    def with_retention(self, fraction: float) -> "BeforeLLM":
        """A copy of this stage that keeps `fraction` (in [0, 1]) of the tokens entering it."""
        return replace(self, **{self.budget_param: fraction})

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

    def apply(self, tokens, state):
        raise NotImplementedError


@dataclass(frozen=True)
class InsideLLM(Stage):
    """`layer` is in the papers' 32-layer numbering; `resolved_layer` maps it to the model."""

    where: ClassVar[str] = "inside LLM"
    # Stages whose budget `--keep` can solve expose `ratio`, a fraction in [0, 1].

    def resolved_layer(self, num_layers: int) -> int:
        return scaled_layer(self.layer, num_layers)

    def kept_count(self, num_in: int, num_original: int, meta: dict, ratio: float) -> int:
        """How many visual tokens leave this stage for `ratio` (used to solve --keep/--flops)."""
        raise NotImplementedError

    def select(self, context, ratio: float):
        raise NotImplementedError


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in increasing index order (ties: lower index first)."""
    k = max(0, min(int(k), scores.shape[0]))
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return order.sort().values
