"""Presets: YAML files in presets/ that name a method's stages and parameters.

(Placeholder until the pruning engine lands: only `none`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BadInput
from .runtime import NO_PRUNING, Pruner


@dataclass(frozen=True)
class Preset:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)


def load_preset(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Preset:
    """Resolve `--prune NAME|file.yaml` with `-P key=value` overrides; BadInput when invalid."""
    if name_or_path != "none":
        raise BadInput(f"unknown preset '{name_or_path}'; available: none")
    return Preset(name="none", description="no pruning")


def build_pruner(preset: Preset, adapter, keep: float | None = None, flops: float | None = None) -> Pruner:
    """A fresh Pruner for one model; `keep` is the layer-averaged retention (design.md §4)."""
    if keep is not None and not 0 < keep <= 1:
        raise BadInput(f"--keep must be in (0, 1], got {keep}")
    return NO_PRUNING
