"""PruneVid (Huang et al., ACL 2025 Findings): merge static tokens before the LLM, then keep the
tokens the question attends to, per segment and per frame, inside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidqa.errors import BadInput
from vidqa.pruning.core.decoder import Selection
from vidqa.pruning.core.stage import BeforeLLM, InsideLLM, param
from vidqa.pruning.ops.merging import prunevid_merge_video
from vidqa.pruning.ops.segments import prunevid_segments, segment_static_masks

ROW_ORDERS = ("centre_score", "first_appearance")


@dataclass(frozen=True)
class SpatioTemporalMerge(BeforeLLM):
    """Stage 1: DPC-KNN temporal segments; per segment, locations whose features barely change
    (mean pairwise cosine > tau) are averaged over time; static and per-frame dynamic tokens are
    then clustered spatially with DPC-KNN and each cluster replaced by its mean.

    Row order per segment: static rows, then each frame's dynamic rows; within each group,
    `row_order` (the released code: by cluster-centre score). A merged row takes the position
    and grid coordinates of its earliest member, whatever its place in the sequence."""

    kind: ClassVar[str] = "spatiotemporal_merge"
    temporal_ratio: float = param(0.25, 0.0, 1.0, "segments = int(frames * temporal_ratio) DPC-KNN clusters")
    tau: float = param(0.8, 0.0, 1.01, "static threshold on mean pairwise cosine (above 1 = nothing static)")
    cluster_ratio: float = param(0.5, 0.0, 1.0, "spatial clusters = int(tokens * cluster_ratio)")
    k: int = param(7, 1, 64, "neighbours for DPC-KNN density")
    row_order: str = param(
        "centre_score", help="merged rows within a group: 'centre_score' (as the original) or 'first_appearance'",
        choices=ROW_ORDERS,
    )

    def __post_init__(self):
        if self.row_order not in ROW_ORDERS:
            raise BadInput(f"{self.kind}.row_order '{self.row_order}' is not one of: {', '.join(ROW_ORDERS)}")

    def apply(self, tokens, state):
        num_frames, rows, cols = tokens.grid
        grid = tokens.features.view(num_frames, rows * cols, -1)  # (T, P, C)
        segments = prunevid_segments(grid.float().mean(dim=1), cluster_ratio=self.temporal_ratio, k=self.k)
        static = segment_static_masks(grid, segments, self.tau)  # (S, P)
        merged = prunevid_merge_video(grid, segments, static, cluster_ratio=self.cluster_ratio, k=self.k,
                                      row_order=self.row_order)
        # earliest member of each output row gives its position and grid coordinates
        chosen = tokens.merge(merged.assignment.flatten(), merged.num_rows, features=merged.features)
        state.details["prunevid"] = {
            "segments": [[start, end] for start, end in segments],
            "static_tokens": merged.num_static_rows,
        }
        return chosen.replace(meta={"segment": merged.segment, "static": merged.is_static})


def _group_keys(meta: dict, count: int, device) -> torch.Tensor:
    """(count,) long key per visual token, equal exactly within a group: (segment, static) or
    (segment, frame) for dynamic tokens. Sparse keys rather than group ids, so no host sync."""
    frame = meta["frame"].to(device)
    segment = meta.get("segment", torch.zeros(count, dtype=torch.long, device=device)).to(device)
    static = meta.get("static", torch.zeros(count, dtype=torch.bool, device=device)).to(device)
    return segment.long() * 2**32 + torch.where(static, 0, frame.long() + 1)


def _quota(sizes: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens kept of groups of `sizes`: int(size * alpha), truncated as the released code's
    `VTPWindowCache.process_attention` does (3 groups of 37 at alpha 0.4 keep 14 each)."""
    return torch.floor(sizes.double() * ratio).long()


@dataclass(frozen=True)
class QuestionAttentionSelect(InsideLLM):
    """Stage 2: score each visual token by the max over heads, then over every token after the
    video (question + template), of the attention it receives at layer K-1; keep `ratio`
    (PruneVid's alpha) of each segment's static tokens and of each frame's dynamic tokens,
    int(alpha * group size) each (truncated, as the original; `kept_at_ratio` uses the same rule,
    so `--keep` solves alpha against the counts the layer really keeps)."""

    kind: ClassVar[str] = "question_attention_select"
    layer: int = param(10, 1, 31, "K in a 32-layer model (scaled to depth)")
    ratio: float = param(0.4, 0.0, 1.0, "alpha: fraction kept per segment (static) and per frame (dynamic)")
    prune_cache: bool = param(True, help="after prefill, slice layers 0..K-1's KV cache to the kept tokens")

    def kept_at_ratio(self, num_in, num_original, meta, ratio):
        if not num_in:
            return 0
        sizes = torch.unique(_group_keys(meta, num_in, "cpu"), return_counts=True)[1]
        return int(_quota(sizes, ratio).sum())

    def select(self, context):
        probs = context.attention(context.text_rows)  # (heads, q, n)
        scores = probs[:, :, context.visual_rows].amax(dim=0).amax(dim=0)  # (v,)
        keys = _group_keys(context.visual_meta, len(context.visual_rows), scores.device)
        # the quota is per group, so it needs alpha itself; context.budget is its sum
        ratio = self.ratio if context.ratio is None else context.ratio
        return Selection(keep=top_fraction_per_group(scores, keys, ratio))


def top_k_per_group(scores: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the top quota[g] scores within each group g (vectorised)."""
    by_score = torch.argsort(scores, descending=True, stable=True)
    by_group = by_score[torch.argsort(groups[by_score], stable=True)]  # grouped, best first
    sorted_groups = groups[by_group]
    group_start = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    rank = torch.arange(len(by_group), device=scores.device) - group_start
    return by_group[rank < quota[sorted_groups]].sort().values


def top_fraction_per_group(scores: torch.Tensor, keys: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sorted indices of the top int(size * ratio) scores within each group of equal `keys`
    (ties: lower index first); `top_k_per_group` with each group's size read off the sorted
    keys, so that only the final count syncs. scores, keys: (n,). Returns (kept,) long."""
    by_score = torch.argsort(scores, descending=True, stable=True)
    by_group = by_score[torch.argsort(keys[by_score], stable=True)]  # grouped, best first
    sorted_keys = keys[by_group]
    group_start = torch.searchsorted(sorted_keys, sorted_keys, right=False)
    group_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    rank = torch.arange(len(by_group), device=scores.device) - group_start
    return by_group[rank < _quota(group_end - group_start, ratio)].sort().values
