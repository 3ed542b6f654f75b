"""FastV (Chen et al., ECCV 2024): drop the visual tokens the last prompt token ignores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vidqa.pruning.core.decoder import Selection
from vidqa.pruning.core.stage import InsideLLM, param, top_k_sorted


@dataclass(frozen=True)
class LastTokenAttention(InsideLLM):
    """Score each visual token by the attention it receives from the LAST prompt token at layer
    K-1, mean over heads; keep the top `ratio` of them from layer K on."""

    kind: ClassVar[str] = "last_token_attention"
    layer: int = param(2, 1, 31, "K in a 32-layer model (scaled to depth: round(K*L/32))")
    ratio: float = param(0.5, 0.0, 1.0, "fraction of the visual tokens kept after layer K")

    def kept_at_ratio(self, num_in, num_original, meta, ratio):
        return round(ratio * num_in)

    def select(self, context):
        probs = context.attention(context.last_row())  # (heads, 1, n)
        scores = probs.mean(dim=0)[0, context.visual_rows]  # (v,)
        return Selection(keep=top_k_sorted(scores, context.budget))
