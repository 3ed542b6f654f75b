"""Stage registry: the `type:` names preset files may use."""

from __future__ import annotations

from vidqa.pruning.core.stage import (
    BeforeEncoder,
    BeforeLLM,
    DuringDecode,
    InsideEncoder,
    InsideLLM,
    Stage,
    scaled_layer,
)
from vidqa.pruning.methods.adatp import DebiasedSegmentSelect, SegmentDedup
from vidqa.pruning.methods.dedup import FrameDedup
from vidqa.pruning.methods.dycoke import DecodeAttentionKV, WindowTemporalMerge
from vidqa.pruning.methods.earlytom import EarlyTomFrames, EarlyTomSpatial
from vidqa.pruning.methods.evs import TemporalChangeSelect
from vidqa.pruning.methods.fastv import LastTokenAttention
from vidqa.pruning.methods.fastvid import DySegStage, STPruneStage
from vidqa.pruning.methods.flashvid import ADTSTreeMerge
from vidqa.pruning.methods.holitom import HoliTomMergeStage, SimilarityMerge
from vidqa.pruning.methods.prunevid import QuestionAttentionSelect, SpatioTemporalMerge
from vidqa.pruning.methods.sparsevlm import RaterAttentionPrune
from vidqa.pruning.methods.vidcom2 import FrameUniquenessSelect
from vidqa.pruning.methods.visionzip import VisionZip

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
        EarlyTomFrames, EarlyTomSpatial,
        FrameDedup,
    )
}

__all__ = ["STAGES", "BeforeEncoder", "BeforeLLM", "DuringDecode", "InsideEncoder", "InsideLLM", "Stage", "scaled_layer"]
