"""FlashVID (Fan et al., ICLR 2026; code: Fanziyang-v/FlashVID): one new stage,
`ADTSTreeMerge` (`type: adts_tstm`), between the shared `dyseg` stage and FastV's
`last_token_attention` at a late layer. The algorithm is in pruning/flashvid.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import BadInput
from ..flashvid import SELECTIONS, adts_select, compress_segment, frame_budgets
from .base import BeforeLLM, param
from .fastvid import segments_from_meta


@dataclass(frozen=True)
class ADTSTreeMerge(BeforeLLM):
    """Per segment (meta "segment" from dyseg; the whole clip without it), every frame keeps
    ceil(P * ratio) tokens: an `alpha` share chosen by ADTS from vision-encoder attention and
    diversity, the rest contextual tokens made by tree-merging the other tokens across frames
    (TSTM) and clustering what is left per frame (DPC-kNN). Each row sits at its representative
    token's place (the selected token, the cluster's centre)."""

    kind: ClassVar[str] = "adts_tstm"
    budget_param: ClassVar[str] = "ratio"  # --keep/--flops set the retained fraction per frame
    # --keep sets `ratio` to keep / (share the in-LLM stages leave): their expansion factor
    budget_with_inner_stages: ClassVar[bool] = True
    ratio: float = param(0.3125, 0.0, 1.0, "tokens kept per frame before the LLM, ceil(P * ratio) (their retention_ratio * expansion)")
    alpha: float = param(0.7, 0.0, 1.0, "share of each frame's tokens chosen by ADTS (attention + diversity); the rest are merged")
    temporal_threshold: float = param(0.8, -1.0, 1.0, "TSTM: a token merges into its most similar token of the previous frame above this cosine (1 = no contextual tokens, as released)")
    selection: str = param("attn_div_v2", help=f"ADTS variant: {' | '.join(SELECTIONS)} (v2 also weighs relevance to the segment)", choices=SELECTIONS)
    vision_layer: int = param(-1, -64, 63, "vision-encoder layer whose attention calibrates ADTS (< 0: from the feature layer)")

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise BadInput(f"{self.kind}.selection '{self.selection}' is not one of: {', '.join(SELECTIONS)}")

    def kept_count(self, num_in: int, grid: tuple[int, int, int], ratio: float) -> int:
        """Tokens kept at `ratio` (for --keep/--flops): ceil(P * ratio) per frame, at least one.
        The clustering rounds each frame's count up, so a clip may keep up to one more per frame;
        fewer when the trees leave fewer roots than the contextual budget."""
        num_frames, rows, cols = grid
        selected, context = frame_budgets(rows * cols, ratio, self.alpha)
        return num_frames * (selected + context)

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens, "put it (after dyseg) before any stage that drops tokens")
        attention = tokens.meta.get("vision_attention")
        if attention is None:
            raise BadInput(f"stage '{self.kind}' needs vision-encoder attention, which this model did not provide")
        segment = tokens.meta.get("segment")
        segments = [(0, num_frames)] if segment is None else segments_from_meta(segment.view(num_frames, per_frame)[:, 0])
        num_selected, num_context = frame_budgets(per_frame, self.ratio, self.alpha)
        features = tokens.features.view(num_frames, per_frame, -1)
        attention = attention.view(num_frames, per_frame)
        picks = adts_select(features, attention, num_selected, self.selection, segments)  # every frame in one batch
        rows_out, representatives, merged, selected, coefficients, offset = [], [], [], [], [], 0
        for start, end in segments:
            plan = compress_segment(features[start:end], attention[start:end], num_selected, num_context,
                                    self.temporal_threshold, self.selection, picks[start:end])
            rows_out.append(torch.where(plan.rows >= 0, plan.rows + offset, plan.rows))
            representatives.append(plan.representative + start * per_frame)
            merged.append(plan.features)
            selected.append(plan.selected)
            coefficients.append(plan.coefficients)
            offset += plan.features.shape[0]
        representative = torch.cat(representatives)
        # features: the released arithmetic; the coefficients give any DeepStack rows the same sums
        out = tokens.merge(torch.cat(rows_out), offset, features=torch.cat(merged),
                           coefficients=torch.cat(coefficients), representatives=representative)
        selected = torch.cat(selected)
        state.details["flashvid"] = {
            "segments": [[int(s), int(e)] for s, e in segments],
            "per_frame": {"selected": num_selected, "contextual": num_context},
            "selected": int(selected.sum()),
            "contextual": int((~selected).sum()),
        }
        return out
