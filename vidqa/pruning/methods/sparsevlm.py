"""SparseVLM (Zhang et al., ICML 2025; code Gumpest/SparseVLMs): text raters chosen from the
layer-0 embeddings score the visual tokens at three layers; the pruned tokens' best are recycled.

A SparseVLM preset is three `rater_attention_prune` stages (one per pruning layer) that share
per-request state through `state.details["sparsevlm"]`:

1. Raters (first stage to run, once per request): with V the LLM's visual tokens and T every row
   after the visual span (question + chat template), both taken from the layer-0 input
   embeddings, R = softmax over T of V . T^T (raw dot products), mean over V; the raters are the
   text tokens with R > mean(R) (`raters.select_raters`). Text rows are never pruned, so the same
   raters are found again by their LLM-input row at every layer.
2. Scores at layer K: the attention each visual token receives from the raters at layer K-1
   (recomputed rows, no eager attention), mean over heads, then over raters.
3. Budget B leaving the stage (recycled tokens included):
   - `budget: schedule`: B = min(n_in, round(N0 * keep_of_576/576 * s)), N0 the visual tokens
     entering the LLM and s = (ratio/(1-ratio)) / (0.5/0.5): ratio 0.5 (the default) is the
     paper's schedule exactly, 1 keeps everything, 0 drops everything. `--keep` solves ratio.
   - `budget: rank` (SparseVLM v1.0): B = min(n_in, int(rank(P) * rank_lambda)), P the
     (raters x visual) attention of step 2 averaged over heads, rank by torch.linalg.matrix_rank in
     float32. Data-dependent: `--keep`/`--flops` cannot set it.
4. Recycling (`recycle: true`): keep the top k and recycle the m = n_in - k others
   (`raters.recycle_pruned`: the top int(0.3m)+1 by score, DPC-KNN into int(m/10)+1 clusters,
   plain means), with k the largest value such that k + int(m/10) + 1 = B. The merged rows go
   right after the kept visual rows, each at the position (and grid coordinates) of its
   highest-scored member. When B < int(n_in/10) + 1 no such k exists: the top B are kept and
   nothing is recycled.

The algorithm:
SparseVLM helpers: choosing the text tokens that rate visual tokens, and token recycling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vidqa.errors import BadInput
from vidqa.pruning.core.decoder import Selection
from vidqa.pruning.core.stage import InsideLLM, param, scaled_layer, top_k_sorted
from vidqa.pruning.ops.cluster import best_member, cluster_means, dpc_knn


def select_raters(visual: Tensor, text: Tensor) -> Tensor:
    """SparseVLM rater selection: text tokens most related to the visual tokens.

    `R = softmax(visual @ text.T, dim=text).mean(dim=visual)` (raw dot products, float32); the
    raters are the text tokens with `R > mean(R)`. When none qualifies (all R equal, up to a
    relative 1e-6), or there are no visual tokens, every text token is a rater.

    Args:
        visual: `[Nv, C]` visual hidden states.
        text: `[Nt, C]` text hidden states.

    Returns:
        `[Nt]` bool, True for raters.
    """
    num_text = text.shape[0]
    all_raters = torch.ones(num_text, dtype=torch.bool, device=text.device)
    if visual.shape[0] == 0 or num_text == 0:
        return all_raters
    relation = torch.softmax(visual.float() @ text.float().T, dim=-1)  # [Nv, Nt]
    relevance = relation.mean(dim=0)  # [Nt]
    raters = relevance > relevance.mean()
    spread = relevance.max() - relevance.min()
    # the fallback as a tensor op, not an `if` on the device (a host sync)
    degenerate = ~raters.any() | (spread <= 1e-6 * relevance.max())
    return raters | degenerate


def recycle_pruned(
    hidden: Tensor, scores: Tensor, count_self_as_neighbour: bool = False
) -> tuple[Tensor, Tensor]:
    """SparseVLM token recycling: merge the best of the pruned tokens into a few new tokens.

    Of the m pruned tokens, the `min(int(0.3 * m) + 1, m)` with the highest scores are taken
    (ties: lower index), clustered with `dpc_knn` into `c = min(int(m / 10) + 1, taken)`
    clusters (with `k = c`), and each cluster is merged by its plain mean. Rows are ordered by
    their cluster's first member in the original token order.

    The density leaves a token out of its own k nearest neighbours (vidqa's choice for
    SparseVLM); the released `cluster_and_merge` counts it, which `count_self_as_neighbour=True`
    reproduces (tests/test_reference_fixtures.py checks that).

    Args:
        hidden: `[m, C]` hidden states of the pruned tokens.
        scores: `[m]` their importance scores.
        count_self_as_neighbour: `dpc_knn`'s density rule (above).

    Returns:
        `(merged [c, C] in hidden.dtype, representative [c] long)`, where `representative[i]`
        indexes (into the m pruned tokens) the highest-scored member of cluster i (ties: lower
        index). For m == 0, `([0, C], [0])`.
    """
    merged, representative, _ = recycle_pruned_members(hidden, scores, count_self_as_neighbour)
    return merged, representative


def recycle_pruned_members(
    hidden: Tensor, scores: Tensor, count_self_as_neighbour: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """`recycle_pruned`, plus `members` `[m]` long: the merged row each pruned token went into,
    -1 for the tokens not taken (token provenance, pruning/core/provenance.py)."""
    num_pruned = hidden.shape[0]
    if num_pruned == 0:
        empty = torch.zeros(0, dtype=torch.long, device=hidden.device)
        return hidden[:0], empty, empty

    num_taken = min(int(0.3 * num_pruned) + 1, num_pruned)
    by_score = torch.sort(scores.float(), descending=True, stable=True).indices
    taken = torch.sort(by_score[:num_taken]).values  # [num_taken], original order

    num_clusters = min(int(num_pruned / 10) + 1, num_taken)
    labels = dpc_knn(
        hidden[taken], num_clusters, k=num_clusters, count_self_as_neighbour=count_self_as_neighbour
    )  # [num_taken]
    merged = cluster_means(hidden[taken], labels, num_clusters)  # [c, C]
    representative = taken[best_member(labels, scores[taken], num_clusters)]  # [c]
    members = torch.full((num_pruned,), -1, dtype=torch.long, device=hidden.device)
    members[taken] = labels.to(members.device)
    return merged, representative, members


PAPER_TOKENS = 576  # LLaVA-1.5's visual tokens, the unit of the paper's schedules
DEFAULT_RATIO = 0.5  # the `ratio` at which the schedule is the paper's
BUDGET_MODES = ("schedule", "rank")
DETAILS_KEY = "sparsevlm"


def schedule_scale(ratio: float) -> float:
    """Factor on the paper's schedule: odds(ratio) / odds(0.5); 0 -> 0, 0.5 -> 1, 1 -> inf."""
    if ratio >= 1.0:
        return math.inf
    if ratio <= 0.0:
        return 0.0
    return (ratio / (1.0 - ratio)) / (DEFAULT_RATIO / (1.0 - DEFAULT_RATIO))


def recycled_count(num_pruned: int) -> int:
    """Tokens `raters.recycle_pruned` makes out of `num_pruned` pruned ones: int(m/10) + 1."""
    return int(num_pruned / 10) + 1 if num_pruned > 0 else 0


def split_budget(num_in: int, budget: int, recycle: bool) -> tuple[int, int]:
    """(kept, recycled) with kept + recycled == min(budget, num_in).

    With recycling, kept is the largest k such that k + recycled_count(num_in - k) equals the
    budget; when the budget is too small for even the recycled tokens (budget <
    int(num_in/10) + 1), nothing is recycled and the top `budget` are kept.
    """
    budget = max(0, min(int(budget), num_in))
    if budget >= num_in or not recycle:
        return budget, 0
    if budget < recycled_count(num_in):
        return budget, 0
    kept = budget - 1
    # k + int((n-k)/10) + 1 is non-decreasing in k with steps of 0 or 1: walk down to the budget
    while kept > 0 and kept + recycled_count(num_in - kept) > budget:
        kept -= 1
    return kept, budget - kept


def rater_source_list(context) -> list[int]:
    """LLM-input rows of the raters, chosen from the layer-0 embeddings (see the module doc), in
    sequence order. Their number depends on the embeddings: read with one host sync."""
    embeddings = context.embeddings[0]  # (n0, hidden)
    visual = embeddings[context.row_source[context.visual_rows]]  # (v, hidden)
    text_source = context.row_source[context.text_rows]  # (t,)
    raters = select_raters(visual, embeddings[text_source])  # (t,) bool
    return [row for row in torch.where(raters, text_source, -1).tolist() if row >= 0]


def rater_source_rows(context) -> torch.Tensor:
    """(r,) long: `rater_source_list` as a tensor."""
    return torch.tensor(rater_source_list(context), dtype=torch.long, device=context.row_source.device)


def current_rows(context, source_rows: torch.Tensor) -> torch.Tensor:
    """(r,) rows of the current sequence holding the given LLM-input text rows (sorted). Text rows
    are never pruned and keep their order, so each is found by a binary search of their sorted
    sources: no data-dependent shape (a bool mask would sync)."""
    text_source = context.row_source[context.text_rows]  # (t,) increasing
    found = torch.searchsorted(text_source, source_rows.to(text_source.device))
    return context.text_rows[found]


def rater_scores(probs: torch.Tensor, visual_rows: torch.Tensor) -> torch.Tensor:
    """(v,) attention received from the raters: (heads, r, n) -> mean over heads, then raters."""
    return probs[:, :, visual_rows].mean(dim=0).mean(dim=0)


@dataclass(frozen=True)
class RaterAttentionPrune(InsideLLM):
    """One SparseVLM pruning layer: keep the visual tokens the text raters attend to most, then
    merge the best of the dropped ones into a few recycled tokens."""

    kind: ClassVar[str] = "rater_attention_prune"
    layer: int = param(2, 1, 31, "K in a 32-layer model (scaled to depth: round(K*L/32), at least min_layer)")
    min_layer: int = param(1, 1, 31, "never before this absolute layer (keeps the three layers distinct on shallow models)")
    keep_of_576: int = param(300, 0, PAPER_TOKENS, "schedule: visual tokens leaving this layer per 576 entering the LLM")
    ratio: float = param(DEFAULT_RATIO, 0.0, 1.0, "schedule scale: 0.5 = the paper's schedule, 1 = keep all, 0 = drop all")
    budget: str = param(
        "schedule", help="'schedule' (fixed fractions, --keep solvable) or 'rank' (v1.0: rank(P)*rank_lambda)", choices=BUDGET_MODES
    )
    rank_lambda: float = param(13.5, 0.0, None, "rank mode: keep int(rank * lambda) tokens (v1.0 code default 13.5)")
    recycle: bool = param(True, help="merge the best pruned tokens into int(m/10)+1 recycled tokens (false = SparseVLM v2)")

    def __post_init__(self):
        if self.budget not in BUDGET_MODES:
            raise BadInput(f"{self.kind}.budget '{self.budget}' is not one of: {', '.join(BUDGET_MODES)}")

    @property
    def unsolvable(self) -> str | None:
        """Why --keep/--flops cannot set this stage's budget (None when they can)."""
        if self.budget == "rank":
            return ("budget 'rank' keeps rank(P)*rank_lambda tokens per layer, which depends on the clip; "
                    "--keep/--flops need budget=schedule (or drop them and tune rank_lambda)")
        return None

    def resolved_layer(self, num_layers: int) -> int:
        return min(max(scaled_layer(self.layer, num_layers), self.min_layer), num_layers - 1)

    # -- budgets -----------------------------------------------------------------------------
    def scheduled(self, num_in: int, num_original: int, ratio: float) -> int:
        """Visual tokens leaving this layer in schedule mode (recycled ones included)."""
        scale = schedule_scale(ratio)
        if math.isinf(scale):
            return num_in
        return min(num_in, round(num_original * self.keep_of_576 / PAPER_TOKENS * scale))

    def kept_at_ratio(self, num_in, num_original, meta, ratio):
        if self.budget == "rank":
            return num_in  # decided per clip at the layer; not known in advance
        return self.scheduled(num_in, num_original, ratio)

    # -- the layer ---------------------------------------------------------------------------
    def select(self, context):
        details = context.state.details.setdefault(DETAILS_KEY, {"recycled": {}, "raters": 0})
        if "rater_rows" not in details:  # first SparseVLM layer of this request: the one host sync
            details["rater_rows"] = rater_source_list(context)
            details["raters"] = len(details["rater_rows"])
        sources = torch.tensor(details["rater_rows"], dtype=torch.long, device=context.row_source.device)
        rows = current_rows(context, sources)
        if len(rows) == 0:  # no text after the video: fall back to the last row
            rows = context.last_row()
        num_in = len(context.visual_rows)
        if num_in == 0:
            details["recycled"][str(context.layer)] = 0
            return Selection(keep=torch.zeros(0, dtype=torch.long, device=context.hidden.device))
        probs = context.attention(rows)  # (heads, r, n) float32
        scores = rater_scores(probs, context.visual_rows)  # (v,)
        if self.budget == "rank":
            relation = probs[:, :, context.visual_rows].mean(dim=0)  # (r, v)
            rank = int(torch.linalg.matrix_rank(relation.float()))
            details.setdefault("rank", {})[str(context.layer)] = rank
            budget = min(num_in, int(rank * self.rank_lambda))
        else:
            budget = context.budget
        selection, recycled = self.prune(context.hidden[0, context.visual_rows], scores, budget)
        details["recycled"][str(context.layer)] = recycled
        return selection

    def prune(self, hidden: torch.Tensor, scores: torch.Tensor, budget: int) -> tuple[Selection, int]:
        """Keep/recycle `hidden` (v, C) visual states by `scores` (v,) so that `budget` leave."""
        num_in = hidden.shape[0]
        kept, recycled = split_budget(num_in, budget, self.recycle)
        keep = top_k_sorted(scores, kept)
        if recycled == 0:
            return Selection(keep=keep), 0
        kept_mask = torch.zeros(num_in, dtype=torch.uint8, device=scores.device)
        kept_mask[keep] = 1
        # (m,) the others, in sequence order: a stable sort puts them first (nonzero would sync)
        pruned = torch.sort(kept_mask, stable=True).indices[:num_in - kept]
        merged, representative, members = recycle_pruned_members(hidden[pruned], scores[pruned])
        if merged.shape[0] != recycled:  # recycle_pruned's rule changed under us
            raise RuntimeError(f"SparseVLM recycling made {merged.shape[0]} tokens, expected {recycled}")
        joined = torch.full((num_in,), -1, dtype=torch.long, device=scores.device)
        joined[pruned] = members.to(joined.device)  # the recycled row each pruned token went into
        return Selection(keep=keep, inserted=merged, inserted_from=pruned[representative],
                         inserted_members=joined), recycled
