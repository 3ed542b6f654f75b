"""Stage registry: the `type:` names preset files may use."""

from __future__ import annotations

from .base import BeforeLLM, InsideLLM, Stage, scaled_layer
from .fastv import LastTokenAttention
from .prunevid import QuestionAttentionSelect, SpatioTemporalMerge

STAGES: dict[str, type[Stage]] = {
    stage.kind: stage for stage in (LastTokenAttention, SpatioTemporalMerge, QuestionAttentionSelect)
}

__all__ = ["STAGES", "BeforeLLM", "InsideLLM", "Stage", "scaled_layer"]
