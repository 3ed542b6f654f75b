"""AdaTP (Sun et al., EMNLP 2025 Findings, arXiv:2505.20100): attention-debiased token pruning.

The authors' code is not released; this is a RECONSTRUCTION from the paper's description
(docs/methods.md, AdaTP), with every threshold exposed as a preset parameter. The paper's finding: in
shallow layers the question's attention over a video is biased globally (the top tokens pile up
at both ends of the visual sequence, the first and above all the last frames) and locally (the
same spatial positions win in every frame). Two stages:

- `SegmentDedup` (before the LLM, local debiasing): cut the clip into segments where adjacent
  frames' mean features stop being similar (cosine < tau_s, at most max_segments); within a
  segment, a token whose cosine to the token at the same position in the previous frame is
  >= tau_l is merged into that earlier token (running mean) and dropped. Adds meta "segment".
- `DebiasedSegmentSelect` (inside the LLM at layer K, global debiasing): split the budget over
  segments by size and by the question's content similarity to each segment; score tokens by
  the question's attention divided by their frame's mean score; keep the top B_s per segment.
  Dividing by the frame mean removes any trend across frames, so a pile-up at the start, at
  the end or at both ends is removed alike (tests/test_adatp.py plants all three).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from vidqa.pruning.core.decoder import Selection
from vidqa.pruning.core.stage import BeforeLLM, InsideLLM, param
from vidqa.pruning.ops.budgets import adatp_segment_budgets
from vidqa.pruning.ops.merging import local_dedup
from vidqa.pruning.ops.segments import similarity_segments

_EPS = 1e-12


@dataclass(frozen=True)
class SegmentDedup(BeforeLLM):
    """Local debiasing before the LLM: adjacent-frame-similarity segments, then same-position
    near-duplicates within a segment merged into the earliest token of their run (running mean).
    A merged token keeps its earliest member's position and grid coordinates."""

    kind: ClassVar[str] = "segment_dedup"
    tau_s: float = param(0.9, 0.0, 1.01, "cut between frames whose mean features have cosine < tau_s")
    max_segments: int = param(8, 1, 1024, "at most this many segments (the lowest-similarity cuts win)")
    tau_l: float = param(
        0.9, 0.0, 1.01, "same-position tokens with cosine >= tau_l to the previous frame are merged (above 1 = none)")

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens)
        grid = tokens.features.view(num_frames, per_frame, -1)  # (T, P, C)
        segments = similarity_segments(grid.float().mean(dim=1), tau=self.tau_s, max_segments=self.max_segments)
        dedup = local_dedup(grid, segments, tau=self.tau_l)
        keep = dedup.keep.flatten()  # (T*P,) frame-major, i.e. the order of `tokens`
        kept_index = keep.nonzero().flatten()
        segment_of_frame = torch.empty(num_frames, dtype=torch.long, device=grid.device)
        for segment_id, (start, end) in enumerate(segments):
            segment_of_frame[start:end] = segment_id
        segment = segment_of_frame.repeat_interleave(per_frame)[kept_index]
        run_row = (keep.cumsum(0) - 1)[dedup.anchor.flatten()]  # output row of every token's run
        # the run's anchor = its earliest member: position kept
        out = tokens.merge(run_row, len(kept_index), features=dedup.features.reshape(num_frames * per_frame, -1)[kept_index])
        out = out.replace(meta={**out.meta, "segment": segment})
        state.details["adatp"] = {
            "segments": [[int(s), int(e)] for s, e in segments],
            "dedup_removed": int(len(tokens) - len(kept_index)),
        }
        return out


def dense_ids(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.unique(keys, return_inverse=True)`'s inverse, and the size of each id, without a
    data-dependent shape (unique and bincount sync with the device).

    keys: (n,) integers. Returns (ids (n,) long, the rank of each key among the distinct keys
    (ascending); sizes (n,) long, sizes[i] = members of id i, 0 past the last id).
    """
    order = torch.argsort(keys, stable=True)
    ordered = keys[order]
    starts = torch.ones_like(ordered, dtype=torch.long)
    starts[1:] = (ordered[1:] != ordered[:-1]).long()
    ids = torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)
    sizes = torch.zeros_like(ids).index_add_(0, ids, torch.ones_like(ids))
    return ids, sizes


def segment_relevance(hidden: torch.Tensor, text_rows: torch.Tensor, visual_rows: torch.Tensor,
                      groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(S,) mean cosine between every text row's and every visual row's hidden state, per segment.

    hidden: (n, D); groups: (v,) segment index in [0, S) of each visual row, num_groups = S (or
    any bound above the largest index). Empty segments get 0.
    """
    if len(text_rows) == 0:
        return torch.zeros(num_groups, device=hidden.device)
    text = F.normalize(hidden[text_rows].float(), dim=-1)  # (q, D)
    visual = F.normalize(hidden[visual_rows].float(), dim=-1)  # (v, D)
    per_token = (visual @ text.T).mean(dim=1)  # (v,)
    sums = torch.zeros(num_groups, dtype=per_token.dtype, device=per_token.device).index_add_(0, groups, per_token)
    # counted with index_add_, not bincount: bincount syncs on a GPU
    counts = torch.zeros(num_groups, dtype=torch.long, device=groups.device).index_add_(0, groups, torch.ones_like(groups))
    return sums / counts.to(per_token.dtype).clamp(min=1)


def frame_debiased_scores(scores: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Each score divided by the mean score of the tokens (present here) of its own frame."""
    inverse, counts = dense_ids(frame)
    sums = torch.zeros(len(frame), dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores)
    frame_mean = sums / counts.to(scores.dtype)  # 0/0 past the last frame: never read
    return scores / frame_mean[inverse].clamp(min=_EPS)


def top_k_per_segment(scores: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) sorted indices of the top quota[g] scores within each group g (ties: lower index
    first), quota[g] <= the size of g and total = sum(quota): the count is known, so the picks
    are the first `total` after a sort, not a bool mask (which syncs).

    scores, groups: (v,); quota: (G,) long with G > every group index."""
    by_score = torch.argsort(scores, descending=True, stable=True)
    by_group = by_score[torch.argsort(groups[by_score], stable=True)]  # grouped, best first
    sorted_groups = groups[by_group]
    group_start = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    rank = torch.arange(len(by_group), device=scores.device) - group_start
    chosen = torch.where(rank < quota[sorted_groups], by_group, len(by_group))  # others sort last
    return chosen.sort().values[:total]


@dataclass(frozen=True)
class DebiasedSegmentSelect(InsideLLM):
    """Global debiasing at layer K: per-segment budgets B_s from size and question/segment
    content similarity (layer-K hidden states); token scores = the question's attention at
    layer K-1 (mean over heads and question rows) divided by the mean score of the token's frame;
    keep the top B_s of each segment, in original order and positions."""

    kind: ClassVar[str] = "debiased_segment_select"
    layer: int = param(2, 1, 31, "K in a 32-layer model (scaled to depth: round(K*L/32), at least 1)")
    ratio: float = param(0.25, 0.0, 1.0, "fraction of the tokens entering the LLM (after dedup) kept after layer K")
    mix: float = param(0.5, 0.0, 1.0, "weight of the size-proportional share in B_s (1 - mix: relevance share)")
    temperature: float = param(0.1, 1e-6, 100.0, "softmax temperature T on segment relevance")

    def kept_at_ratio(self, num_in, num_original, meta, ratio):
        return round(ratio * num_in)

    def select(self, context):
        num_visual = len(context.visual_rows)
        device = context.hidden.device
        segment = context.visual_meta.get("segment")
        if segment is None:  # no dedup stage before: the whole clip is one segment
            segment = torch.zeros(num_visual, dtype=torch.long, device=device)
        # segment ids made dense (0..S-1, as torch.unique's inverse) with (v,) buffers: S is
        # read on the host only once, with the sizes and relevance, in one transfer
        groups, group_sizes = dense_ids(segment.to(device))
        details = context.state.details.setdefault("adatp", {})
        details["layer"] = context.layer
        budget = min(int(context.budget), num_visual)
        if budget >= num_visual:
            details["segment_budgets"] = [size for size in group_sizes.tolist() if size]
            details["in_llm_dropped"] = 0
            details["note"] = (
                f"dedup left {num_visual} tokens and the layer-{context.layer} budget is {context.budget}: "
                "nothing is dropped inside the LLM"
            )
            return Selection(keep=torch.arange(num_visual, device=device))

        relevance = segment_relevance(context.hidden[0], context.text_rows, context.visual_rows, groups, num_visual)
        # the stage's one host read: sizes and relevance of every segment (ids past S: size 0)
        sizes, relevance = torch.stack([group_sizes.double(), relevance.double()]).tolist()
        num_groups = sum(1 for size in sizes if size)  # ids are dense: the segments are a prefix
        sizes, relevance = [int(size) for size in sizes[:num_groups]], relevance[:num_groups]
        budgets = adatp_segment_budgets(sizes, relevance, budget, mix=self.mix, temperature=self.temperature)

        probs = context.attention(context.text_rows)  # (heads, q, n)
        scores = probs[:, :, context.visual_rows].float().mean(dim=(0, 1))  # (v,)
        debiased = frame_debiased_scores(scores, context.visual_meta["frame"].to(scores.device))
        quota = torch.tensor(budgets, dtype=torch.long, device=scores.device)
        keep = top_k_per_segment(debiased, groups.to(scores.device), quota, sum(budgets))
        details["segment_budgets"] = budgets
        details["segment_relevance"] = [round(r, 6) for r in relevance]
        details["in_llm_dropped"] = num_visual - len(keep)
        return Selection(keep=keep)
