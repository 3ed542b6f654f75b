"""SparseVLM helpers: choosing the text tokens that rate visual tokens, and token recycling."""

from __future__ import annotations

import torch
from torch import Tensor

from vidqa.pruning.cluster import best_member, cluster_means, dpc_knn


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
    if not raters.any() or spread <= 1e-6 * relevance.max():
        return all_raters
    return raters


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
    -1 for the tokens not taken (token provenance, pruning/provenance.py)."""
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
