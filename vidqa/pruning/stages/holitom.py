"""HoliTom (Shao et al., NeurIPS 2025; code: cokeshao/HoliTom): holistic token merging, as two
stages.

- `HoliTomMergeStage` (`type: holitom_merge`, before the LLM): global redundancy-aware temporal
  windows, static tokens merged over each window and clustered, each frame's dynamic tokens
  reduced to the vision-attended ones (pruning/holitom.py). `ratio` is the clip's retention.
- `SimilarityMerge` (`type: similarity_merge`, inside the LLM): at layer K keep the visual tokens
  the last prompt token attends to most at layer K-1 (FastV's score) and average every other
  visual token into the kept one whose hidden state is most cosine-similar. It keeps its own
  ratio: the outer stage takes --keep/--flops (`budget_with_inner_stages`, as FlashVID's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import BadInput
from ..decoder import Selection
from ..holitom import MissingAttention, holitom_merge
from .base import BeforeLLM, InsideLLM, param, top_k_sorted

DETAILS_KEY = "holitom"


@dataclass(frozen=True)
class HoliTomMergeStage(BeforeLLM):
    """Outer-LLM HoliTom on the full token grid: DP windows of static locations (cosine > tau
    across the window), then per window static clusters and per frame attention-ranked dynamic
    tokens, keeping about `ratio` of the clip. Reads meta "vision_attention"."""

    kind: ClassVar[str] = "holitom_merge"
    budget_param: ClassVar[str] = "ratio"  # --keep/--flops set the retention of the clip
    budget_with_inner_stages: ClassVar[bool] = True  # the inner merge keeps its own ratio
    ratio: float = param(0.10, 0.0, 1.0, "retained fraction of the clip's tokens (RETAIN_RATIO; --keep sets it)")
    tau: float = param(0.8, 0.0, 1.01, "T: a location is static in a window when its adjacent-frame cosine stays above tau")
    beta: float = param(0.6, 0.0, 1.0, "BETA: weight of a cluster centre in its merged token (the rest: mean of its members)")
    context_share: float = param(0.0, 0.0, 1.0, "D: share of each frame's dynamic budget that is clustered instead of attention-selected")
    neighbours: int = param(7, 1, 1024, "K: DPC-KNN neighbours (at most the number of clusters)")
    max_window: int = param(1024, 1, 1 << 20, "MAX_WINDOW_SIZE: the longest window, in frames")
    vision_layer: int = param(-1, -64, 63, "vision-encoder layer whose attention ranks tokens (-1: the layer the projector reads)")

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens)
        attention = tokens.meta.get("vision_attention")
        # ratio 0 would keep nothing at all; keep at least one token of the clip
        ratio = max(self.ratio, 1.0 / len(tokens)) if len(tokens) else self.ratio
        try:
            result = holitom_merge(
                tokens.features.view(num_frames, per_frame, -1),
                None if attention is None else attention.view(num_frames, per_frame),
                ratio=ratio, tau=self.tau, beta=self.beta, context_share=self.context_share,
                k=self.neighbours, max_window=self.max_window,
            )
        except MissingAttention:
            raise BadInput(f"stage '{self.kind}' needs vision-encoder attention, which this model did not provide") from None
        if result.retention >= 1.0 and ratio * len(tokens) > result.num_rows:
            state.notes.append(
                f"holitom: the clip's static windows already merge it to {result.num_rows / len(tokens):.3f} "
                f"of its tokens, below the asked retention {ratio:.3f}; nothing else is dropped before the LLM"
            )
        merged = tokens.merge(result.rows, result.num_rows, weights=result.weight)
        anchor = result.anchor.to(tokens.frame.device)
        out = merged.replace(  # a row sits where the released code puts it: its centre (static: window's first frame)
            frame=tokens.frame[anchor], row=tokens.row[anchor], col=tokens.col[anchor],
            seq_index=tokens.seq_index[anchor],
        )
        state.details.setdefault(DETAILS_KEY, {})["outer"] = {
            "windows": [[int(s), int(e)] for s, e in result.windows],
            "static_removed": result.removed,
            "window_retention": round(result.retention, 6),
            "static_rows": int(result.static.sum()),
            "dynamic_rows": int((~result.static).sum()),
        }
        return out


def sequential_average(kept: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average every pruned state into its target, one at a time in pruned order:
    kept[t] <- (kept[t] + pruned[i]) / 2, in the states' own dtype (the released code's loop).

    kept: (k, C); pruned: (m, C); target: (m,) long in [0, k). Returns the new (k, C).
    Vectorised by rounds: round r applies every target's r-th member at once."""
    out = kept.clone()
    if len(target) == 0:
        return out
    order = torch.argsort(target, stable=True)  # grouped by target, pruned order within a group
    grouped = target[order]
    first_of_group = torch.searchsorted(grouped, grouped)  # index of each group's first member
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - first_of_group
    for round_index in range(int(rank.max()) + 1):
        now = rank == round_index
        rows = target[now]
        out[rows] = (out[rows] + pruned[now]) / 2
    return out


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, k) cosine similarity of a (m, C) and b (k, C), computed in their own dtype as the
    released code does (a.b / (|a| |b|)): in bfloat16 the rounding decides close calls."""
    return (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).T)


@dataclass(frozen=True)
class SimilarityMerge(InsideLLM):
    """HoliTom's inner-LLM merge: at layer K keep round(ratio * n) visual tokens by the attention
    the last prompt token pays them at layer K-1 (mean over heads); every other visual token is
    averaged into its most cosine-similar kept token (hidden states entering layer K)."""

    kind: ClassVar[str] = "similarity_merge"
    layer: int = param(21, 1, 31, "K in a 32-layer model (scaled: round(K*L/32); 21 -> the authors' 18 on 28 layers)")
    ratio: float = param(0.5, 0.0, 1.0, "fraction of the visual tokens kept from layer K on (1 - HOLITOM_r)")

    def kept_count(self, num_in, num_original, meta, ratio):
        return round(num_in * ratio)

    def select(self, context, ratio):
        visual = context.visual_rows
        scores = context.attention(context.last_row()).mean(dim=0)[0, visual]  # (v,)
        keep = top_k_sorted(scores, context.budget)
        dropped = torch.ones(len(visual), dtype=torch.bool, device=keep.device)
        dropped[keep] = False
        pruned = dropped.nonzero().flatten()  # (m,) in sequence order
        states = context.hidden[0, visual]  # (v, C)
        kept_states = states[keep]
        target = torch.zeros(0, dtype=torch.long, device=keep.device)
        if len(pruned) and len(keep):
            # candidates in decreasing score, as the released top-k lists them: equal similarities
            # (frequent in bfloat16) go to the most attended kept token
            by_score = torch.argsort(scores[keep], descending=True, stable=True)
            similarity = cosine_matrix(states[pruned], kept_states[by_score])  # (m, k)
            target = by_score[similarity.argmax(dim=1)]  # (m,) into keep
            kept_states = sequential_average(kept_states, states[pruned], target)
        elif len(pruned):  # nothing kept: the dropped tokens have nowhere to go
            pruned = pruned[:0]
        source = context.row_source[visual]
        context.state.record_merge(context.layer, source[pruned].cpu(), source[keep[target]].cpu())  # drawn by --show-kept
        context.state.details.setdefault(DETAILS_KEY, {})["inner"] = {
            "layer": context.layer,
            "kept": len(keep),
            "merged": len(pruned),
            # LLM-input rows: each merged token and the kept token it went into (for drawing)
            "merged_rows": source[pruned].tolist(),
            "into_rows": source[keep[target]].tolist(),
        }
        return Selection(keep=keep, kept_hidden=kept_states)
