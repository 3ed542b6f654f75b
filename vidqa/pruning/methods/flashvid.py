"""FlashVID (Fan et al., ICLR 2026; code: Fanziyang-v/FlashVID): one new stage,
`ADTSTreeMerge` (`type: adts_tstm`), between the shared `dyseg` stage and FastV's
`last_token_attention` at a late layer. The algorithm is in pruning/methods/flashvid.py.

The algorithm:
FlashVID's pre-LLM compression (Fan et al., ICLR 2026; code: Fanziyang-v/FlashVID), within each
segment of frames:

1. ADTS (attention and diversity-based token selection): per frame, `num_selected` tokens chosen
   greedily as the farthest (max-min) from the ones already chosen under a cosine distance
   calibrated by the vision encoder's attention (and, in v2, by relevance to the segment);
2. TSTM (tree-based spatiotemporal merging): every other token links to its most similar
   non-selected token in the previous frame; links above `threshold` merge, so each tree rooted
   in the earliest frame becomes one token (the released arithmetic, `tstm` below);
3. the roots left are clustered per frame with DPC-kNN to the segment's contextual budget
   (`num_context` per frame on average); a cluster is the mean of its roots and sits at its centre.

Everything returns a plan over token indices (output row, representative token), so the stage
can change rows through `VisualTokens.merge` with these exact features.

Every segment and frame of the clip runs in one batch (a GPU launches a fixed number of kernels
whatever the frame count): segments are per-frame run ids, per-segment quantities reductions over
them, and the per-frame clustering runs on the frames' roots padded to one width with a mask. The
only host sync is the number of output rows (`compress_segment`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch
from torch import Tensor

from vidqa.errors import BadInput
from vidqa.pruning.core.stage import BeforeLLM, param
from vidqa.pruning.ops.cluster import density_rank, pairwise_distances

SELECTIONS = ("attn_div_v2", "attn_div")
ATTENTION_SCALE = 1e6  # the released code scales the attention up before multiplying (float32 range)
MAX_NEIGHBOURS = 7  # DPC-kNN density from min(clusters, 7) nearest roots, as released


def frame_budgets(per_frame: int, ratio: float, alpha: float) -> tuple[int, int]:
    """(selected, contextual) tokens per frame: budget = ceil(P * ratio), at least 1 (ratio is
    their retention_ratio * expansion); selected = ceil(budget * alpha); contextual = the rest."""
    budget = min(per_frame, max(1, math.ceil(per_frame * ratio - 1e-9)))  # -1e-9: 0.3125*64 is 20, not 21
    selected = math.ceil(budget * alpha - 1e-9)
    return selected, budget - selected


def segment_runs(segment: Tensor) -> Tensor:
    """(F,) per-frame segment labels -> (F,) long run index: 0 for the first run of equal labels,
    1 for the next, ... (a segment is a run of frames, as fastvid's `segments_from_meta` reads them)."""
    change = segment[1:] != segment[:-1]
    return torch.cat([change.new_zeros(1), change]).cumsum(0)


def runs_of(segments: list[tuple[int, int]], device=None) -> Tensor:
    """(F,) long run index of every frame from frame ranges [(start, end), ...] covering 0..F."""
    lengths = torch.tensor([end - start for start, end in segments], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(segments)), lengths).to(device)


def frame_ranges(run: list[int]) -> list[tuple[int, int]]:
    """Half-open frame ranges [(start, end), ...] of the runs of a per-frame run index (host list)."""
    bounds = [0] + [t for t in range(1, len(run)) if run[t] != run[t - 1]] + [len(run)]
    return list(pairwise(bounds))


def run_sizes(run: Tensor) -> Tensor:
    """(F,) long run index of each frame -> (F,) long frames in run r at entry r (0 past the last run)."""
    return torch.zeros_like(run).index_add_(0, run, torch.ones_like(run))


def cosine_distances(features: Tensor) -> Tensor:
    """(F, P, C) -> (F, P, P) float32 1 - cosine similarity within each frame."""
    normed = features / features.norm(dim=-1, keepdim=True)
    return 1.0 - normed @ normed.transpose(-1, -2)


def segment_relevance(features: Tensor, run: Tensor) -> Tensor:
    """ADTS v2's relevance r: (F, P) float32, for each token the mean over the frames of its
    segment of its dot product with that frame's mean feature, computed as the dot product with
    the segment's mean of frame means. features: (F, P, C); run: (F,) long run index per frame."""
    features = features.float()
    frame_means = features.mean(dim=1)  # (F, C)
    sums = torch.zeros_like(frame_means).index_add_(0, run, frame_means)  # (F, C): row r = run r's sum
    segment_means = sums / run_sizes(run)[:, None]  # rows past the last run are 0/0, never read
    return torch.einsum("fnc,fc->fn", features, segment_means[run])


def adts_select(features: Tensor, attention: Tensor, count: int, selection: str = "attn_div_v2",
                segments: list[tuple[int, int]] | None = None, segment: Tensor | None = None) -> Tensor:
    """ADTS: (F, count) sorted indices of the tokens each frame keeps.

    features: (F, P, C); attention: (F, P) attention each token receives in the vision encoder;
    segments: frame ranges covering 0..F, or segment: (F,) per-frame segment labels (default:
    one segment), which scope v2's relevance, so that every frame of the clip runs in one batch.
    Distances d(i, j) = (1 - cos(i, j)) * a_j (* r_j in v2, `segment_relevance`). The first pick
    is the j with the largest second-smallest d(., j); then repeatedly the j farthest from its
    nearest pick, min_s d(s, j). Ties: the lower index. A loop over the `count` picks, each one
    batched over the frames.
    """
    frames, per_frame, _ = features.shape
    if count <= 0:
        return torch.zeros(frames, 0, dtype=torch.long, device=features.device)
    features = features.float()
    distances = cosine_distances(features)  # (F, P, P)
    calibration = attention.float() * ATTENTION_SCALE  # (F, P)
    if selection == "attn_div_v2":
        if segment is not None:
            run = segment_runs(segment)
        elif segments is not None:
            run = runs_of(segments, features.device)
        else:
            run = torch.zeros(frames, dtype=torch.long, device=features.device)
        relevance = segment_relevance(features, run)
        distances = distances * calibration[:, None, :] * relevance[:, None, :]
    elif selection == "attn_div":
        distances = distances * calibration[:, None, :]
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if per_frame == 1:
        return torch.zeros(frames, count, dtype=torch.long, device=features.device)
    first = torch.topk(distances, k=2, dim=1, largest=False).values[:, 1, :]  # (F, P)
    pick = first.argmax(dim=-1, keepdim=True)  # (F, 1)
    picks = [pick]
    taken = torch.zeros(frames, per_frame, dtype=torch.bool, device=features.device).scatter_(1, pick, True)
    rows = pick[:, :, None].expand(frames, 1, per_frame)  # gather index of the picked row
    nearest = distances.gather(1, rows).squeeze(1)  # (F, P) distance of every token to its nearest pick
    for _ in range(1, count):
        pick = nearest.masked_fill(taken, float("-inf")).argmax(dim=-1, keepdim=True)
        picks.append(pick)
        taken.scatter_(1, pick, True)
        rows = pick[:, :, None].expand(frames, 1, per_frame)
        nearest = torch.minimum(nearest, distances.gather(1, rows).squeeze(1))
    return torch.cat(picks, dim=1).sort(dim=-1).values


@dataclass
class TreeMerge:
    """TSTM on one segment or a clip of segments. kept: (F, P) bool, the tree roots (non-selected
    tokens that did not merge into the previous frame); features: (F, P, C) the roots' merged
    features (rows of other tokens are meaningless); root: (F, P) long, flat index (f * P + p) of
    the root each non-selected token ended in (selected tokens: their own index); divisor: (F, P)
    what each root's sum was divided by (1 + its direct children; 1 elsewhere), so every member
    of a tree enters its root with coefficient 1 / divisor[root]."""

    kept: Tensor
    features: Tensor
    root: Tensor
    divisor: Tensor


def tstm(features: Tensor, free: Tensor, threshold: float, lower_bound: int | Tensor,
         segment: Tensor | None = None) -> TreeMerge:
    """Tree-based spatiotemporal merging, the released arithmetic, on every segment at once.

    features: (F, P, C); free: (F, P) bool, the tokens ADTS did not select; segment: (F,)
    per-frame segment labels (None: one segment); lower_bound: the tokens each segment must keep,
    an int, or an (F,) long tensor whose entry r is the bound of run r (`segment_runs`). A free
    token of a frame t >= 1 of its segment links to its most cosine-similar free token of frame
    t-1 and merges into it when that similarity exceeds `threshold`; if fewer than `lower_bound`
    tokens (selected ones and the segment's first frame included) would stay, the segment's
    threshold rises to its (L*P - lower_bound)-th largest link similarity, still compared strictly
    (so one token more than the bound stays, as released).
    The released code folds frames from the last to the first: a token that stays is divided by
    its count (1 + the tokens merged DIRECTLY into it); a merging token adds its current value
    (its own features plus its children's, not yet divided) to its parent. So a root is
    sum(tree) / (1 + its direct children): a mean only for trees of depth 1 (what
    Fanziyang-v/FlashVID's `spatiotemporal_compression` computes; vidqa keeps it). Here every
    tree is summed at once into its root (members in frame order: the released order for trees
    of depth 1, float rounding apart for deeper ones), the roots found by pointer doubling.
    """
    frames, per_frame, channels = features.shape
    device = features.device
    run = torch.zeros(frames, dtype=torch.long, device=device) if segment is None else segment_runs(segment)
    if not torch.is_tensor(lower_bound):
        lower_bound = torch.full((frames,), lower_bound, dtype=torch.long, device=device)
    values = features.float()
    normed = values / values.norm(dim=-1, keepdim=True)
    similarity = normed[1:] @ normed[:-1].transpose(-1, -2)  # (F-1, P, P): frame t token i vs frame t-1 token j
    similarity = similarity.masked_fill(~free[1:, :, None], -1.0).masked_fill(~free[:-1, None, :], -1.0)
    best, parent = similarity.max(dim=-1)  # (F-1, P)
    best = torch.cat([best.new_full((1, per_frame), -1.0), best])  # frame 0 never merges
    parent = torch.cat([parent.new_zeros((1, per_frame)), parent])
    starts = torch.cat([run.new_ones(1, dtype=torch.bool), run[1:] != run[:-1]])  # (F,) first frame of a segment
    best = best.masked_fill(starts[:, None], -1.0)  # nor does any segment's first frame
    limit = _segment_thresholds(best, run, threshold, lower_bound)  # (F,) per run
    merges = best > limit[run][:, None]  # (F, P)

    # link: every merging token's parent (flat index), every other token itself; root: links followed to the end
    flat_index = torch.arange(frames * per_frame, device=device).view(frames, per_frame)
    parent = (torch.arange(frames, device=device)[:, None] - 1) * per_frame + parent  # flat, in frame t - 1
    link = torch.where(merges, parent, flat_index).flatten()
    root = link
    for _ in range(max(frames - 2, 0).bit_length()):  # 2^steps >= F - 1, the deepest possible tree
        root = root[root]
    weight = merges.flatten().float()
    counts = torch.ones(frames * per_frame, device=device).index_add_(0, link, weight)  # 1 + direct children
    divisor = torch.where(merges.flatten(), 1.0, counts)
    sums = torch.zeros(frames * per_frame, channels, device=device).index_add_(0, root, values.reshape(-1, channels))
    merged = torch.where(merges.flatten()[:, None], values.reshape(-1, channels), sums / divisor[:, None])
    return TreeMerge(kept=~merges & free, features=merged.view(frames, per_frame, channels).to(features.dtype),
                     root=root.view(frames, per_frame), divisor=divisor.view(frames, per_frame))


def _segment_thresholds(best: Tensor, run: Tensor, threshold: float, lower_bound: Tensor) -> Tensor:
    """(F,) float32 TSTM threshold of each run r (entry r): `threshold`, or where fewer than
    lower_bound[r] tokens would stay, the run's (L*P - bound)-th largest link `best` (at least
    -1 + 1e-6, as released; +inf when nothing may merge). best: (F, P) float32 link similarity
    (-1: no link); run: (F,) long run index per frame."""
    frames, per_frame = best.shape
    stays = torch.zeros_like(run).index_add_(0, run, (~(best > threshold)).sum(dim=1))  # tokens that stay, per run
    sizes = run_sizes(run)
    extra = sizes * per_frame - lower_bound  # how many may merge
    # every run's links in decreasing order, the runs one after another (they are frame ranges)
    ranked, order = torch.sort(best.flatten(), descending=True, stable=True)
    token_run = run[:, None].expand(frames, per_frame).flatten()
    ranked = ranked[torch.sort(token_run[order], stable=True).indices]
    first = torch.cumsum(sizes, 0) - sizes  # (F,) first frame of each run
    kth = ranked[(first * per_frame + extra - 1).clamp(0, frames * per_frame - 1)]
    soft = torch.where(extra > 0, kth.clamp_min(-1.0 + 1e-6), float("inf"))
    return torch.where(stays < lower_bound, soft, torch.full_like(soft, threshold))


def identical_rows(x: Tensor) -> Tensor:
    """(B, N, C) float -> (B, N, N) bool: rows i and j of a set are identical (value for value,
    -0.0 == 0.0), the diagonal included.

    Without `unique` (a host sync, and on CPU a few dispatched ops per row): every row gets four
    integer keys, fixed random weights (at most 2^(30 - bits of C), so no sum overflows int64)
    times its float32 bit patterns, summed exactly. Identical rows always share their keys; rows
    that differ in one channel never do, in several all four with probability below 2^-72.
    """
    bits = (x.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into 0.0
    channels = x.shape[-1]
    high = 2 ** max(1, 30 - max(channels, 1).bit_length())  # |bits| < 2^31: |key| < 2^61
    weights = torch.randint(1, high, (channels, 4), generator=torch.Generator().manual_seed(0)).to(x.device)
    keys = bits @ weights  # (B, N, 4) int64
    return (keys[:, :, None, :] == keys[:, None, :, :]).all(dim=-1)


def set_distances(x: Tensor, valid: Tensor) -> Tensor:
    """`pairwise_distances` within each of B padded sets: (B, N, C), (B, N) bool -> (B, N, N)
    float32 Euclidean distances / sqrt(C); entries with an invalid row or column are meaningless.

    On accelerators: `pairwise_distances` itself, a batched cdist (each pair on its own: the
    padding changes nothing). On CPU its float64 Gram expansion, batched: mean-centred over each
    set's valid rows, identical rows exactly 0 (`identical_rows`), symmetrised bit for bit.
    """
    if x.device.type != "cpu":
        return pairwise_distances(x)
    channels = x.shape[-1]
    padding = ~valid[:, :, None]
    x = x.float().masked_fill(padding, 0.0)
    centred = x.double()
    mean = centred.sum(dim=1, keepdim=True) / valid.sum(dim=1).clamp(min=1)[:, None, None]
    centred = (centred - mean).masked_fill(padding, 0.0)  # distances are shift-invariant
    squared_norm = centred.square().sum(dim=-1)  # (B, N)
    squared = squared_norm[:, :, None] + squared_norm[:, None, :] - 2.0 * (centred @ centred.transpose(1, 2))
    squared = (squared + squared.transpose(1, 2)) * 0.5  # exactly symmetric
    squared.masked_fill_(identical_rows(x), 0.0)
    distances = squared.clamp_min_(0.0).sqrt_().float()
    return distances / math.sqrt(max(channels, 1))


def dpc_knn_centres(x: Tensor, num_clusters: int | Tensor, k: int | Tensor,
                    valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """DPC-kNN as FlashVID's `dpc_knn` runs it: density from the k nearest tokens counting the
    token itself; centres = the num_clusters largest delta * density; every token joins its
    nearest centre, a centre itself. Density ties go to the lower index instead of random noise.

    x: (N, C): returns labels (N,) in [0, num_clusters) (label i = i-th best centre) and
    centres (num_clusters,) token indices. Or x: (B, N, C) for B sets clustered at once, each
    the valid prefix of its row (valid: (B, N) bool, True first; default all) with its own
    num_clusters and k ((B,) long, 1 <= k <= 7, num_clusters <= its valid count): labels
    (B, N) (meaningless on invalid slots) and centres (B, N), the slot of the i-th best centre
    for i < num_clusters (the rest: the other slots by score).
    """
    single = x.dim() == 2
    if single:
        x = x[None]
    sets, width, _ = x.shape
    device = x.device
    if valid is None:
        valid = torch.ones(sets, width, dtype=torch.bool, device=device)
    clusters = torch.as_tensor(num_clusters, device=device).expand(sets)
    distances = set_distances(x, valid)  # (B, N, N) float32, / sqrt(C)
    pair = valid[:, :, None] & valid[:, None, :]

    # log kNN density (counting the token itself), the first k of the `neighbours` nearest valid tokens
    squared = distances.square()
    squared.diagonal(dim1=-2, dim2=-1).fill_(0.0)
    squared = squared.masked_fill(~valid[:, None, :], float("inf"))
    neighbours = min(k if isinstance(k, int) else MAX_NEIGHBOURS, width)
    nearest = torch.topk(squared, neighbours, dim=-1, largest=False).values  # (B, N, neighbours) increasing
    k = torch.as_tensor(k, device=device).expand(sets).clamp(1, max(neighbours, 1))
    within_k = torch.arange(neighbours, device=device) < k[:, None, None]
    log_density = -(torch.where(within_k, nearest, 0.0).sum(dim=-1) / k[:, None].float())  # = -mean of k
    rank = density_rank(log_density.masked_fill(~valid, float("-inf")))  # invalid slots last

    denser = rank[:, None, :] < rank[:, :, None]  # [b, i, j]: j denser than i
    farthest = distances.masked_fill(~pair, 0.0).amax(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
    delta = torch.where(denser, distances, farthest).min(dim=-1).values
    score = (torch.log(delta) + log_density).masked_fill(~valid, float("-inf"))  # log(delta * density)
    centres = torch.sort(score, dim=-1, descending=True, stable=True).indices  # (B, N) valid slots first
    is_centre = torch.arange(width, device=device) < clusters[:, None]  # (B, N) over centre order
    to_centres = distances.gather(2, centres[:, None, :].expand(sets, width, width))
    labels = to_centres.masked_fill(~is_centre[:, None, :], float("inf")).argmin(dim=-1)  # first centre on ties
    place = torch.empty_like(centres).scatter_(1, centres, torch.arange(width, device=device).expand(sets, width))
    labels = torch.where(place < clusters[:, None], place, labels)  # a centre is its own cluster
    return (labels[0], centres[0, :num_clusters]) if single else (labels, centres)


@dataclass
class ContextRows:
    """TSTM + the per-frame DPC-kNN over a clip of F frames, as up to W rows per frame (W = P -
    selected per frame, the most roots a frame can have). valid: (F*W,) bool, the rows that
    exist (the first `count` of each frame); representative: (F*W,) long, a row's centre token
    (flat index); features: (F*W, C) the rows' features (input dtype); row_of_token: (F*P,) long,
    each free token's row among the F*W (via its root; -1 for selected tokens); coefficients:
    (F*P,) float64, each free token's weight in its row, 1 / (tree divisor * cluster size)."""

    valid: Tensor
    representative: Tensor
    features: Tensor
    row_of_token: Tensor
    coefficients: Tensor


def context_rows(features: Tensor, free: Tensor, run: Tensor, num_selected: int, num_context: int,
                 threshold: float) -> ContextRows:
    """The contextual rows of every segment at once. features: (F, P, C); free: (F, P) bool (not
    selected, so P - num_selected per frame); run: (F,) long run index per frame.

    Per segment of L frames, TSTM with the segment's budget (num_selected + num_context) * L as
    lower bound; then per frame t with n_t roots, c = num_context * L / (roots of the segment)
    (float arithmetic as released): c < 1: DPC-kNN into ceil(n_t * c) clusters, each the plain mean
    of its roots at its centre's place; else every root its own row.
    """
    frames, per_frame, channels = features.shape
    device = features.device
    width = per_frame - num_selected
    sizes = run_sizes(run)  # (F,) frames per run
    tree = tstm(features, free, threshold, (num_selected + num_context) * sizes, segment=run)
    roots = tree.kept.sum(dim=1)  # (F,) n_t
    total = torch.zeros_like(roots).index_add_(0, run, roots)  # roots per run
    share = (num_context * sizes).double() / total.clamp(min=1).double()  # (F,) per run
    share = share[run]  # (F,) per frame
    clusters = torch.ceil(roots.double() * share).long()
    clustered = share < 1.0  # frames that cluster their roots (else: every root its own row)
    count = torch.where(clustered, clusters, roots)  # rows per frame

    # each frame's roots first, in token order: slot j < n_t of frame t is its j-th root
    slot_token = torch.sort((~tree.kept).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (F, W)
    slot_token = slot_token + torch.arange(frames, device=device)[:, None] * per_frame  # flat index
    slot = torch.arange(width, device=device)
    valid = slot < roots[:, None]  # (F, W)
    values = tree.features.reshape(-1, channels)[slot_token]  # (F, W, C)
    labels, centres = dpc_knn_centres(values, clusters, clusters.clamp(max=MAX_NEIGHBOURS), valid)
    labels = torch.where(clustered[:, None], labels, slot)  # (F, W) cluster of each root slot
    centres = torch.where(clustered[:, None], centres, slot)  # (F, W) centre slot of each cluster

    # each root slot's row among the F*W (frame t's cluster i is row t*W + i); invalid slots: a scratch row
    row = labels + torch.arange(frames, device=device)[:, None] * width  # (F, W)
    row = torch.where(valid, row, frames * width).flatten()
    sums = torch.zeros(frames * width + 1, channels, device=device)
    sums.index_add_(0, row, values.reshape(-1, channels).float())
    members = torch.zeros(frames * width + 1, device=device).index_add_(0, row, valid.flatten().float())
    means = (sums[:-1] / members[:-1, None]).to(features.dtype).view(frames, width, channels)
    features = torch.where(clustered[:, None, None], means, values)  # a root alone keeps its exact features

    # every root's row and weight, then every free token's through its root
    root_row = torch.full((frames * per_frame + 1,), -1, dtype=torch.long, device=device)
    root_row = root_row.scatter_(0, torch.where(valid, slot_token, frames * per_frame).flatten(), row)[:-1]
    size = members[root_row.clamp(min=0)].to(torch.float64)  # (F*P,) its row's size (meaningless off roots)
    root_weight = 1.0 / tree.divisor.flatten().to(torch.float64) / size  # 1 / (divisor * size), as released
    root, free = tree.root.flatten(), free.flatten()
    return ContextRows(
        valid=(slot < count[:, None]).flatten(),
        representative=slot_token.gather(1, centres).flatten(),
        features=features.reshape(-1, channels),
        row_of_token=torch.where(free, root_row[root], -1),
        coefficients=torch.where(free, root_weight[root], 1.0),
    )


@dataclass
class SegmentPlan:
    """What FlashVID makes of one segment (or a clip of segments), over its F * P tokens (flat
    index f * P + p).

    rows: (F*P,) long, the output row of each token, -1 when dropped (numbered in the order of
    the representatives); representative: (rows,) the token whose place each row takes (a selected
    token, or a cluster's centre root); features: (rows, C) the rows' features (input dtype);
    selected: (rows,) bool, rows that are ADTS tokens; coefficients: (F*P,) float64, each token's
    weight in its row (row = sum of coefficient * token over its members: 1 for a selected token,
    1 / (tree divisor * cluster size) for a merged one), so per-token features that must follow
    the merge (Qwen3-VL's DeepStack rows) get the same arithmetic; segments: the frame ranges
    [(start, end), ...] it ran on.
    """

    rows: Tensor
    representative: Tensor
    features: Tensor
    selected: Tensor
    coefficients: Tensor
    segments: list[tuple[int, int]]


def compress_segment(
    features: Tensor, attention: Tensor, num_selected: int, num_context: int,
    threshold: float = 0.8, selection: str = "attn_div_v2", picks: Tensor | None = None,
    segment: Tensor | None = None,
) -> SegmentPlan:
    """ADTS, TSTM and the per-frame DPC-kNN merge on one segment, or with `segment` ((F,)
    per-frame segment labels) on every segment of a clip at once, each on its own.

    features: (F, P, C); attention: (F, P); num_selected / num_context: per-frame budgets
    (`frame_budgets`); picks: (F, num_selected) ADTS picks when already made (`adts_select` with
    the same segments). With num_context == 0 or threshold >= 1 the released code keeps only the
    selected tokens, and so does this. One host sync: the number of rows (and the segments).
    """
    frames, per_frame, channels = features.shape
    device = features.device
    run = torch.zeros(frames, dtype=torch.long, device=device) if segment is None else segment_runs(segment)
    if picks is None:
        picks = adts_select(features, attention, num_selected, selection, segment=run)  # (F, s)
    flat_picks = (picks + torch.arange(frames, device=device)[:, None] * per_frame).flatten()  # (F*s,)
    free = torch.ones(frames * per_frame, dtype=torch.bool, device=device).index_fill_(0, flat_picks, False)
    flat = features.reshape(frames * per_frame, channels)
    num_picks = flat_picks.shape[0]

    # candidate rows: the selected tokens, then (with a contextual budget) up to W per frame
    representative, outputs = [flat_picks], [flat[flat_picks]]
    valid = [torch.ones(num_picks, dtype=torch.bool, device=device)]
    row_of_token = torch.full((frames * per_frame,), -1, dtype=torch.long, device=device)  # among the candidates
    row_of_token[flat_picks] = torch.arange(num_picks, device=device)
    coefficients = torch.ones(frames * per_frame, dtype=torch.float64, device=device)
    if num_context > 0 and threshold < 1.0:
        context = context_rows(features, free.view(frames, per_frame), run, num_selected, num_context, threshold)
        representative.append(context.representative)
        outputs.append(context.features)
        valid.append(context.valid)
        row_of_token = torch.where(context.row_of_token >= 0, context.row_of_token + num_picks, row_of_token)
        coefficients = context.coefficients
    representative, valid = torch.cat(representative), torch.cat(valid)
    # rows in sequence order of their representatives, the candidates that do not exist last
    order = torch.argsort(torch.where(valid, representative, frames * per_frame), stable=True)
    num_rows, *runs = torch.cat([valid.sum()[None], run]).tolist()  # the one host sync: how many rows
    renumber = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=device))
    rows = torch.where(row_of_token >= 0, renumber[row_of_token.clamp(min=0)], -1)
    kept = order[:num_rows]
    return SegmentPlan(rows=rows, representative=representative[kept], features=torch.cat(outputs)[kept],
                       selected=kept < num_picks, coefficients=coefficients, segments=frame_ranges(runs))


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

    def kept_at_retention(self, num_in: int, grid: tuple[int, int, int], fraction: float) -> int:
        """Tokens kept at `ratio` = `fraction` (for --keep/--flops): ceil(P * fraction) per frame, at least one.
        The clustering rounds each frame's count up, so a clip may keep up to one more per frame;
        fewer when the trees leave fewer roots than the contextual budget."""
        num_frames, rows, cols = grid
        selected, context = frame_budgets(rows * cols, fraction, self.alpha)
        return num_frames * (selected + context)

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens, "put it (after dyseg) before any stage that drops tokens")
        attention = tokens.meta.get("vision_attention")
        if attention is None:
            raise BadInput(f"stage '{self.kind}' needs vision-encoder attention, which this model did not provide")
        segment = tokens.meta.get("segment")
        segment = None if segment is None else segment.view(num_frames, per_frame)[:, 0]  # (F,) per frame
        num_selected, num_context = frame_budgets(per_frame, self.ratio, self.alpha)
        features = tokens.features.view(num_frames, per_frame, -1)
        attention = attention.view(num_frames, per_frame)
        # every segment and frame in one batch; the number of rows (and the segments) is the one host sync
        plan = compress_segment(features, attention, num_selected, num_context, self.temporal_threshold,
                                self.selection, segment=segment)
        num_rows = plan.representative.shape[0]
        # features: the released arithmetic; the coefficients give any DeepStack rows the same sums
        out = tokens.merge(plan.rows, num_rows, features=plan.features, coefficients=plan.coefficients,
                           representatives=plan.representative)
        selected = num_frames * num_selected  # every frame's picks are distinct selected rows
        state.details["flashvid"] = {
            "segments": [[start, end] for start, end in plan.segments],
            "per_frame": {"selected": num_selected, "contextual": num_context},
            "selected": selected,
            "contextual": num_rows - selected,
        }
        return out
