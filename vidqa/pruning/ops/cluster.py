"""Density-peak clustering (DPC-KNN) and per-cluster reductions.

PruneVid and SparseVLM group similar tokens with DPC-KNN (Du et al., 2016): a token is a cluster
centre when it is dense (close to its k nearest neighbours) and far from every denser token.
Everything here is deterministic (ties are broken by token index, never by random noise),
works on any device, computes distances in float32 and returns features in the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances between all pairs of rows, scaled by 1/sqrt(C), in float32.

    Args:
        x: `[N, C]` features, or `[B, N, C]` for B independent sets.

    Returns:
        `[N, N]` (or `[B, N, N]`) float32, symmetric, exactly zero on the diagonal and between
        identical rows.

    On accelerators: `cdist` without the matmul shortcut (exact for duplicates, no host sync).
    On CPU that direct mode is ~10x slower than a GEMM and was most of the pruning overhead, so
    there the Gram expansion `|a|^2 + |b|^2 - 2 a.b` runs as one float64 GEMM on mean-centred
    rows: float64 leaves an error of ~1e-16 |x|^2 on a squared distance, so distances are as
    accurate as a float32 `cdist` (they agree to ~1e-6 relative); identical rows are found
    exactly (`torch.unique`) and get 0; the matrix is symmetrised bit for bit.
    """
    x = x.float()
    if x.device.type != "cpu":
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(max(x.shape[-1], 1))
    if x.dim() == 3:
        # One set at a time on CPU: measured on 8 x 98 x 896, the batched version took 7.4 ms
        # against 5.7 ms, its [B, N, C] float64 elementwise ops running ~8x slower per element
        # (most likely first-touch faults on a fresh multi-MB buffer each call). The GEMMs cost
        # the same either way; accelerators keep the batched cdist above (fewer launches).
        if not len(x):
            return x.new_zeros(0, x.shape[1], x.shape[1])
        return torch.stack([_gram_distances(one) for one in x])
    return _gram_distances(x)


def _gram_distances(x: Tensor) -> Tensor:
    """The CPU path of `pairwise_distances` for one `[N, C]` float32 set."""
    num_tokens, channels = x.shape
    centred = x.double()
    centred = centred - centred.mean(dim=0, keepdim=True)  # distances are shift-invariant
    squared_norm = centred.square().sum(dim=-1)  # [N]
    squared = squared_norm[:, None] + squared_norm[None, :] - 2.0 * (centred @ centred.T)  # [N, N]
    squared = (squared + squared.T) * 0.5  # exactly symmetric
    if num_tokens:
        duplicate_of = torch.unique(x, dim=0, return_inverse=True)[1]  # same id <=> identical rows
        squared.masked_fill_(duplicate_of[:, None] == duplicate_of[None, :], 0.0)  # diagonal included
    distances = squared.clamp_min_(0.0).sqrt_().float()
    return distances / math.sqrt(max(channels, 1))


def knn_log_density(distances: Tensor, k: int, count_self_as_neighbour: bool = False) -> Tensor:
    """Log of the kNN density `exp(-mean of the k smallest squared distances)`.

    The log (i.e. minus the mean squared distance) is returned rather than the density itself so
    that far-apart tokens do not all underflow to a density of 0; orderings are unchanged.

    Args:
        distances: `[..., N, N]` float pairwise distances with a zero diagonal, N >= 1.
        k: number of neighbours.
        count_self_as_neighbour: False: the k nearest OTHER tokens (`min(k, N - 1)` of them; a
            lone token gets 0). True: each token is one of its own k nearest neighbours, with
            distance 0 (`min(k, N)` of them), as PruneVid's released `cluster_dpc_knn` does
            (`topk(k, largest=False)` over a row whose diagonal is 0).

    Returns:
        `[..., N]` float32 log-density (<= 0).
    """
    num_tokens = distances.shape[-1]
    squared = distances.square()
    if count_self_as_neighbour:
        k = min(k, num_tokens)
        squared.diagonal(dim1=-2, dim2=-1).fill_(0.0)
    else:
        k = min(k, num_tokens - 1)
        if k <= 0:
            return squared.new_zeros(squared.shape[:-1])
        squared.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # exclude self
    nearest = torch.topk(squared, k, dim=-1, largest=False).values  # [..., N, k]
    return -nearest.mean(dim=-1)


def _rank_of(order: Tensor) -> Tensor:
    """Inverse permutation along the last dim: `rank[..., order[..., i]] = i`."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def density_rank(log_density: Tensor) -> Tensor:
    """Rank of every token by decreasing density, ties broken by lower token index.

    Args:
        log_density: `[..., N]` float.

    Returns:
        `[..., N]` long, a permutation of `0..N-1`; rank 0 is the densest token. Token j is
        "denser" than token i exactly when `rank[j] < rank[i]`.
    """
    order = torch.sort(-log_density, dim=-1, stable=True).indices  # densest first, lower index first
    return _rank_of(order)


def _sets_side_by_side(labels: Tensor, num_clusters: int) -> Tensor:
    """`[S, N]` per-set labels -> `[S * N]` labels into S x num_clusters clusters, set s taking
    clusters `[s * num_clusters, (s + 1) * num_clusters)`, so per-set reductions run as one."""
    offsets = torch.arange(labels.shape[0], device=labels.device)[:, None] * num_clusters
    return (labels + offsets).flatten()


def relabel_by_first_appearance(labels: Tensor, num_clusters: int) -> Tensor:
    """Renumber non-empty clusters so that labels appear as 0, 1, 2, ... along the sequence.

    Args:
        labels: `[..., N]` long in `[0, num_clusters)`; every cluster must be non-empty.
        num_clusters: number of clusters.

    Returns:
        `[..., N]` long: the same partition, cluster of token 0 is 0, the next new cluster is 1, ...
    """
    batch_shape, num_tokens = labels.shape[:-1], labels.shape[-1]
    flat = labels.reshape(-1, num_tokens)
    first = first_member(_sets_side_by_side(flat, num_clusters), flat.shape[0] * num_clusters)
    order = torch.argsort(first.view(-1, num_clusters), dim=-1)  # old labels by first appearance
    new_label = _rank_of(order)  # [B, num_clusters]
    return new_label.gather(-1, flat).view(*batch_shape, num_tokens)


LABEL_ORDERS = ("first_appearance", "centre_score")


def dpc_knn(
    x: Tensor,
    num_clusters: int,
    k: int,
    *,
    count_self_as_neighbour: bool = False,
    label_order: str = "first_appearance",
) -> Tensor:
    """Density-peak clustering with kNN density (DPC-KNN), as used by PruneVid and SparseVLM.

    1. `D = cdist(x, x) / sqrt(C)`.
    2. `density_i = exp(-mean of the k smallest D_ij^2)` over the k nearest neighbours of i;
       whether i counts as one of its own neighbours is `count_self_as_neighbour` (see
       `knn_log_density`): PruneVid's code counts it, vidqa's SparseVLM does not.
    3. `delta_i = min_j D_ij` over tokens j denser than i; for the densest token, `max(D)`.
       Equal densities are ordered by token index (the lower index counts as denser), which
       replaces the random tie-breaking noise of the original implementations.
    4. Centres: the `num_clusters` tokens with the largest `delta * density` (ties: lower index).
    5. Every token joins its nearest centre (ties: the better-ranked centre); a centre always
       joins itself.

    `label_order="first_appearance"`: labels are numbered by first appearance in the token
    sequence (token 0 has label 0, the first token not in cluster 0 has label 1, ...).
    `label_order="centre_score"`: label i is the centre with the i-th largest `delta * density`,
    the numbering of the released PruneVid/SparseVLM code (their merged tokens come out in this
    order). All clusters are non-empty.

    Args:
        x: `[N, C]` features (any float dtype / device), or `[B, N, C]`: B independent sets
            clustered in one batched pass (PruneVid clusters every frame of a segment at once,
            which saves a launch per op and frame on accelerators).
        num_clusters: number of clusters per set, >= 1. If `num_clusters >= N`, every token is
            its own cluster (labels `0..N-1`).
        k: number of nearest neighbours for the density, >= 1 (capped at the tokens there are).
        count_self_as_neighbour: whether a token is one of its own k nearest neighbours.
        label_order: "first_appearance" or "centre_score" (above). With `num_clusters >= N`
            both give `0..N-1`.

    Returns:
        `[N]` (or `[B, N]`) long labels in `[0, min(num_clusters, N))`, on `x.device`.
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"dpc_knn expects [N, C] or [B, N, C] features, got shape {tuple(x.shape)}")
    if num_clusters <= 0:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if label_order not in LABEL_ORDERS:
        raise ValueError(f"label_order must be one of {LABEL_ORDERS}, got {label_order!r}")
    num_tokens = x.shape[-2]
    if num_clusters >= num_tokens:
        return torch.arange(num_tokens, device=x.device).expand(x.shape[:-1]).clone()

    distances = pairwise_distances(x)  # [..., N, N]
    log_density = knn_log_density(distances, k, count_self_as_neighbour)  # [..., N]
    rank = density_rank(log_density)  # [..., N]

    # delta_i: distance to the nearest denser token (denser = smaller rank).
    denser = rank[..., None, :] < rank[..., :, None]  # [..., N, N]; denser[i, j]: j denser than i
    max_distance = distances.amax(dim=(-2, -1), keepdim=True)  # [..., 1, 1]
    delta = torch.where(denser, distances, max_distance).min(dim=-1).values  # [..., N]

    # log(delta * density), so that tiny densities do not all collapse to 0.
    log_score = torch.log(delta) + log_density  # [..., N]; -inf where delta == 0
    centres = torch.sort(log_score, dim=-1, descending=True, stable=True).indices[..., :num_clusters]

    to_centres = distances.gather(-1, centres[..., None, :].expand(*distances.shape[:-1], num_clusters))
    labels = to_centres.argmin(dim=-1)  # [..., N]; first (best-ranked) centre on ties
    centre_labels = torch.arange(num_clusters, device=x.device).expand_as(centres)
    labels.scatter_(-1, centres, centre_labels)  # label i = i-th best centre
    if label_order == "centre_score":
        return labels
    return relabel_by_first_appearance(labels, num_clusters)


def cluster_means(x: Tensor, labels: Tensor, num_clusters: int) -> Tensor:
    """Plain mean of each cluster's members.

    Args:
        x: `[N, C]` features, or `[B, N, C]` with per-set labels.
        labels: `[N]` (or `[B, N]`) long in `[0, num_clusters)`.
        num_clusters: number of clusters (per set).

    Returns:
        `[num_clusters, C]` (or `[B, num_clusters, C]`) in `x.dtype`, accumulated in float32;
        empty clusters are zeros.
    """
    batch_shape, channels = x.shape[:-2], x.shape[-1]
    per_set = labels.reshape(-1, labels.shape[-1])
    flat_labels = _sets_side_by_side(per_set, num_clusters)
    total = per_set.shape[0] * num_clusters
    sums = torch.zeros(total, channels, dtype=torch.float32, device=x.device)
    sums.index_add_(0, flat_labels, x.reshape(-1, channels).float())
    counts = torch.bincount(flat_labels, minlength=total).clamp(min=1)  # [total]
    means = (sums / counts.unsqueeze(-1)).to(x.dtype)
    return means.view(*batch_shape, num_clusters, channels)


def first_member(labels: Tensor, num_clusters: int) -> Tensor:
    """Smallest token index in each cluster.

    Args:
        labels: `[N]` long in `[0, num_clusters)`.
        num_clusters: number of clusters.

    Returns:
        `[num_clusters]` long; -1 for an empty cluster.
    """
    num_tokens = labels.shape[0]
    index = torch.arange(num_tokens, device=labels.device)
    first = torch.full((num_clusters,), num_tokens, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(0, labels, index, reduce="amin", include_self=True)
    return torch.where(first == num_tokens, -1, first)


def best_member(labels: Tensor, scores: Tensor, num_clusters: int) -> Tensor:
    """Index of the highest-scored token in each cluster (ties: the lowest index).

    Args:
        labels: `[N]` long in `[0, num_clusters)`.
        scores: `[N]` float scores.
        num_clusters: number of clusters.

    Returns:
        `[num_clusters]` long; -1 for an empty cluster.
    """
    scores = scores.float()
    cluster_max = torch.full((num_clusters,), float("-inf"), device=scores.device)
    cluster_max.scatter_reduce_(0, labels, scores, reduce="amax", include_self=True)
    is_best = scores == cluster_max[labels]  # [N]
    # Among each cluster's best-scored tokens, the lowest index; non-best tokens go to a dummy
    # cluster `num_clusters` that is dropped.
    candidate_labels = torch.where(is_best, labels, num_clusters)
    return first_member(candidate_labels, num_clusters + 1)[:num_clusters]


# -- sets of different sizes in one pass ------------------------------------------------------


def padded_pairwise_distances(x: Tensor, lengths: Tensor) -> Tensor:
    """`pairwise_distances` of B sets of different sizes at once, without a host sync.

    Set b is `x[b, :lengths[b]]`; the rows after it are padding. Each set's distances are those
    `pairwise_distances(x[b, :lengths[b]])` gives, bit for bit: on accelerators the same
    per-pair `cdist`, on CPU the same float64 Gram expansion (mean-centred per set: zero padding
    does not change the sums; `identical_row_ids` finds the identical rows).

    Args:
        x: `[B, N, C]` features.
        lengths: `[B]` long, tokens per set, in `[0, N]`.

    Returns:
        `[B, N, N]` float32; 0 wherever the row or the column is padding.
    """
    valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # [B, N]
    return _padded_distances(x.float(), valid, lengths)


def _padded_distances(x: Tensor, valid: Tensor, lengths: Tensor) -> Tensor:
    """`padded_pairwise_distances` of float32 x `[B, N, C]` with its `[B, N]` validity mask."""
    scale = math.sqrt(max(x.shape[-1], 1))
    if x.device.type != "cpu":
        distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").div_(scale)
    else:
        distances = _padded_gram_distances(x, valid, lengths).div_(scale)
    return distances.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0.0)


def _padded_gram_distances(x: Tensor, valid: Tensor, lengths: Tensor) -> Tensor:
    """The CPU path: `_gram_distances` of every set, batched, before the 1/sqrt(C) scale."""
    num_sets, num_tokens, channels = x.shape
    padding = ~valid[..., None]  # [B, N, 1]
    centred = x.double().masked_fill_(padding, 0.0)
    centred.sub_(centred.sum(dim=1, keepdim=True) / lengths[:, None, None]).masked_fill_(padding, 0.0)  # own mean
    squared_norm = centred.square().sum(dim=-1)  # [B, N]
    squared = (squared_norm[:, :, None] + squared_norm[:, None, :]).sub_((centred @ centred.transpose(1, 2)).mul_(2.0))
    squared = squared.add(squared.transpose(1, 2)).mul_(0.5)  # exactly symmetric
    if num_sets and num_tokens:
        same = identical_row_ids(x.reshape(-1, channels)).view(num_sets, num_tokens)
        squared.masked_fill_(same[:, :, None] == same[:, None, :], 0.0)  # diagonal included
    return squared.clamp_min_(0.0).sqrt_().float()


_ROW_HASH_WEIGHTS: dict[tuple[int, str], Tensor] = {}


def identical_row_ids(x: Tensor) -> Tensor:
    """An id per row of x `[R, C]` float32, equal exactly for identical rows: the grouping of
    `torch.unique(x, dim=0, return_inverse=True)[1]` (rows compare with ==, so -0.0 equals 0.0),
    in a fixed number of ops (`unique(dim=0)` dispatches a few per row on CPU).

    Rows are sorted by a hash of their bits and each is compared exactly with the next; only if
    two different rows share a hash (or a row holds NaN, which equals nothing) does it fall back
    to `unique`, so the grouping is always exact. Returns `[R]` long (not unique's numbering).
    """
    num_rows, channels = x.shape
    key = (channels, str(x.device))
    if key not in _ROW_HASH_WEIGHTS:  # fixed odd int32 weights, one per channel
        generator = torch.Generator().manual_seed(0)
        weights = torch.randint(-(2**31), 2**31, (channels,), dtype=torch.int64, generator=generator) | 1
        _ROW_HASH_WEIGHTS[key] = weights.int().to(x.device)
    canonical = x + 0.0  # -0.0 + 0.0 = 0.0: equal values now have equal bits
    hashes = (canonical.view(torch.int32) * _ROW_HASH_WEIGHTS[key]).sum(dim=-1)  # [R] int64, wrapping products
    hashes, order = torch.sort(hashes, stable=True)
    ordered = canonical[order]
    new_row = (ordered[1:] != ordered[:-1]).any(dim=-1)  # [R - 1], exact
    if bool((hashes[1:] == hashes[:-1]).logical_and_(new_row).any()):
        return torch.unique(x, dim=0, return_inverse=True)[1]  # a hash collision: exact the slow way
    group = torch.cat([new_row.new_zeros(min(num_rows, 1)), new_row]).cumsum(dim=0)
    return torch.empty_like(group).scatter_(0, order, group)


def _padded_knn_log_density(distances: Tensor, padding: Tensor, lengths: Tensor, k: int, count_self: bool) -> Tensor:
    """`knn_log_density` of each set of a padded batch; -inf on padding.

    distances: `[B, N, N]` as `padded_pairwise_distances` returns (0 on the diagonal); padding:
    `[B, N]` bool; lengths: `[B]` long. A set with at least k neighbours to average (the usual
    case) gets `knn_log_density`'s value bit for bit: the same k smallest values, in the same
    order, through the same mean. A smaller set (k above its size) averages those it has, a
    rescaled mean that can differ from the unpadded one in the last bit. Returns `[B, N]` float32.
    """
    num_tokens = distances.shape[-1]
    squared = distances.square().masked_fill_(padding[:, None, :], float("inf"))  # padding is nobody's neighbour
    if count_self:  # each token its own neighbour, at distance 0 (the diagonal already is)
        top, per_set = min(k, num_tokens), lengths.clamp(max=k)
    else:
        squared.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # exclude self
        top, per_set = min(k, num_tokens - 1), (lengths - 1).clamp(min=0, max=k)
    if top <= 0:
        return torch.zeros_like(squared[..., 0]).masked_fill_(padding, float("-inf"))
    nearest = torch.topk(squared, top, dim=-1, largest=False).values  # [B, N, top], ascending
    # a small set's missing neighbours (inf) count 0, and its mean is rescaled to its own count;
    # a full set's scale is exactly 1
    nearest.masked_fill_(torch.arange(top, device=distances.device) >= per_set[:, None, None], 0.0)
    scale = top / per_set.clamp(min=1)  # [B] float
    return nearest.mean(dim=-1).mul_(scale[:, None]).neg_().masked_fill_(padding, float("-inf"))


def dpc_knn_padded(
    x: Tensor,
    lengths: Tensor,
    num_clusters: Tensor,
    k: int,
    *,
    count_self_as_neighbour: bool = False,
    label_order: str = "first_appearance",
) -> Tensor:
    """`dpc_knn` over B sets of different sizes in one pass, with no host sync on accelerators.

    Set b is `x[b, :lengths[b]]` (the rows after it are padding: never a neighbour, a denser
    token or a centre) and gets `num_clusters[b]` clusters. Its labels are those of
    `dpc_knn(x[b, :lengths[b]], num_clusters[b], k, ...)`: the same distances, densities,
    centres and tie-breaking (lower index first), except that the densities of a set with fewer
    than k neighbours (k above its size) can differ in the last bit (`_padded_knn_log_density`).
    A set with `num_clusters >= lengths` is all singletons (`0..n-1`), as in `dpc_knn`.

    Args:
        x: `[B, N, C]` features (any float dtype / device).
        lengths: `[B]` long tokens per set, in `[0, N]`, on x.device.
        num_clusters: `[B]` long clusters per set, >= 1 unless the set is empty, on x.device.
        k: neighbours for the density, >= 1.
        count_self_as_neighbour, label_order: as in `dpc_knn`.

    Returns:
        `[B, N]` long labels in `[0, min(num_clusters[b], lengths[b]))`; -1 on padding.
    """
    if x.dim() != 3:
        raise ValueError(f"dpc_knn_padded expects [B, N, C] features, got shape {tuple(x.shape)}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if label_order not in LABEL_ORDERS:
        raise ValueError(f"label_order must be one of {LABEL_ORDERS}, got {label_order!r}")
    num_sets, num_tokens, _ = x.shape
    position = torch.arange(num_tokens, device=x.device)
    valid = position < lengths[:, None]  # [B, N]
    padding = ~valid

    distances = _padded_distances(x.float(), valid, lengths)  # [B, N, N]
    log_density = _padded_knn_log_density(distances, padding, lengths, k, count_self_as_neighbour)
    rank = density_rank(log_density)  # padding (-inf) ranks after every token

    denser = rank[:, None, :] < rank[:, :, None]  # [B, N, N]; denser[b, i, j]: j denser than i
    max_distance = distances.amax(dim=(-2, -1), keepdim=True)  # [B, 1, 1]; padding is 0
    delta = torch.where(denser, distances, max_distance).amin(dim=-1)  # [B, N]
    log_score = torch.log(delta).add_(log_density).masked_fill_(padding, float("-inf"))
    # Every set's tokens by centre score; its first num_clusters[b] are its centres. Padding
    # sorts after the set's own tokens, even those at -inf (stable sort, higher index).
    by_score = torch.sort(log_score, dim=-1, descending=True, stable=True).indices  # [B, N]
    to_centres = distances.gather(-1, by_score[:, None, :].expand(num_sets, num_tokens, num_tokens))
    # a centre joins itself (label i = i-th best centre, also when an earlier centre is a
    # duplicate at distance 0); every other token its nearest centre, the first on ties
    to_centres.masked_fill_(by_score[:, None, :] == position[:, None], -1.0)
    to_centres.masked_fill_((position >= num_clusters[:, None])[:, None, :], float("inf"))  # not centres
    labels = to_centres.argmin(dim=-1)  # [B, N]
    labels = torch.where((num_clusters >= lengths)[:, None], position, labels)  # all singletons
    if label_order == "first_appearance":
        labels = _relabel_padded_by_first_appearance(labels, valid)
    return labels.masked_fill_(padding, -1)


def _relabel_padded_by_first_appearance(labels: Tensor, valid: Tensor) -> Tensor:
    """`relabel_by_first_appearance` of every set of a padded batch ([B, N] long labels < N,
    valid: [B, N] bool); labels on padding are left meaningless."""
    num_sets, num_tokens = labels.shape
    position = torch.arange(num_tokens, device=labels.device).expand(num_sets, num_tokens)
    first = torch.full((num_sets, num_tokens + 1), num_tokens, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(-1, labels.masked_fill(~valid, num_tokens), position, reduce="amin", include_self=True)
    order = torch.argsort(first[:, :num_tokens], dim=-1, stable=True)  # clusters by first member, unused last
    return _rank_of(order).gather(-1, labels.clamp(min=0))
