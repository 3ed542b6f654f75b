"""Stage registry: the `type:` names preset files may use."""

from __future__ import annotations

from .adatp import DebiasedSegmentSelect, SegmentDedup
from .base import BeforeLLM, InsideLLM, Stage, scaled_layer
from .dycoke import DecodeAttentionKV, WindowTemporalMerge
from .evs import TemporalChangeSelect
from .fastv import LastTokenAttention
from .fastvid import DySegStage, STPruneStage
from .flashvid import ADTSTreeMerge
from .holitom import HoliTomMergeStage, SimilarityMerge
from .prunevid import QuestionAttentionSelect, SpatioTemporalMerge
from .sparsevlm import RaterAttentionPrune
from .vidcom2 import FrameUniquenessSelect
from .visionzip import VisionZip

STAGES: dict[str, type[Stage]] = {
    stage.kind: stage for stage in (
        LastTokenAttention, SpatioTemporalMerge, QuestionAttentionSelect,
        SegmentDedup, DebiasedSegmentSelect,
        RaterAttentionPrune,
        TemporalChangeSelect,
        FrameUniquenessSelect,
        VisionZip,
        DySegStage, STPruneStage,
        WindowTemporalMerge, DecodeAttentionKV,
        ADTSTreeMerge,
        HoliTomMergeStage, SimilarityMerge,
    )
}

__all__ = ["STAGES", "BeforeLLM", "InsideLLM", "Stage", "scaled_layer"]
