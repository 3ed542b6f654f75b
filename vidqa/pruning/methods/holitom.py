"""HoliTom (Shao et al., NeurIPS 2025; code: cokeshao/HoliTom): holistic token merging, as two
stages.

- `HoliTomMergeStage` (`type: holitom_merge`, before the LLM): global redundancy-aware temporal
  windows, static tokens merged over each window and clustered, each frame's dynamic tokens
  reduced to the vision-attended ones (pruning/methods/holitom.py). `ratio` is the clip's retention.
- `SimilarityMerge` (`type: similarity_merge`, inside the LLM): at layer K keep the visual tokens
  the last prompt token attends to most at layer K-1 (FastV's score) and average every other
  visual token into the kept one whose hidden state is most cosine-similar. It keeps its own
  ratio: the outer stage takes --keep/--flops (`budget_with_inner_stages`, as FlashVID's).

The algorithm:
HoliTom's outer-LLM merging (Shao et al., NeurIPS 2025; code: cokeshao/HoliTom).

1. Global redundancy-aware segmentation: with s[t, p] the cosine of location p in frames t and
   t + 1, a window [a, b] of frames makes the locations whose similarity stays above tau across
   the whole window static, and merging them over time removes (b - a) tokens per static
   location. A dynamic programme over the clip picks the partition into windows (at most
   `max_window` frames) that removes the most tokens (`static_windows`).
2. Retention: with R removed by step 1 out of N, every window keeps `ratio / ((N - R) / N)`
   (at most 1) of what is left, so the clip keeps about `ratio * N` tokens.
3. Per window: static locations are averaged over the window's frames and clustered (DPC-KNN
   centres, each token merged into its nearest centre); each frame's dynamic tokens keep the
   ones the vision encoder attends to most, and (with `context_share` d > 0) cluster the rest
   the same way. A merged token is `beta * centre + (1 - beta) * mean(its other members)`.

Everything is returned as a row assignment with per-token weights (a weighted mean of members),
which `VisualTokens.merge` applies to every per-token feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from vidqa.errors import BadInput
from vidqa.pruning.core.decoder import Selection
from vidqa.pruning.core.stage import BeforeLLM, InsideLLM, param
from vidqa.pruning.ops.cluster import density_rank, padded_pairwise_distances
from vidqa.pruning.ops.segments import Segment


def location_similarity(features: Tensor) -> Tensor:
    """(T - 1, P) float32 cosine of every location in frame t and frame t + 1; features: (T, P, C)."""
    normed = F.normalize(features.float(), dim=-1)
    return (normed[:-1] * normed[1:]).sum(dim=-1)


def static_runs(similarity: Tensor, tau: float) -> Tensor:
    """(T - 1, P) long: run[t, p] is how many steps from t on (t -> t + 1, t + 1 -> t + 2, ...)
    location p's similarity stays above tau, so window [a, b] keeps p static iff run[a, p] >= b - a.
    similarity: (T - 1, P)."""
    steps = similarity.shape[0]
    step = torch.arange(steps, device=similarity.device)[:, None]  # (T - 1, 1)
    below_at = torch.where(similarity > tau, steps, step)  # a step where p drops, else past the end
    next_below = below_at.flip(0).cummin(dim=0).values.flip(0)  # first drop at or after t
    return next_below - step


def removable_from_runs(run: Tensor) -> Tensor:
    """`removable_counts` from `static_runs`' (T - 1, P) table: (T, T) float32."""
    num_frames = run.shape[0] + 1
    device = run.device
    counts = torch.zeros(num_frames, num_frames, dtype=torch.float32, device=device)
    if num_frames < 2:
        return counts
    histogram = torch.zeros(num_frames - 1, num_frames, dtype=torch.long, device=device)
    histogram.scatter_add_(1, run, torch.ones_like(run))  # [a, L]: locations whose run from a is L
    still = histogram.flip(1).cumsum(dim=1).flip(1)  # [a, L]: locations static for L steps from a
    frame = torch.arange(num_frames, device=device)
    length = frame[None, :] - frame[:-1, None]  # (T - 1, T): b - a
    removable = length * still.gather(1, length.clamp(min=0))
    counts[:-1] = torch.where(length > 0, removable, 0).float()
    return counts


def removable_counts(similarity: Tensor, tau: float) -> Tensor:
    """(T, T) float32: entry [a, b] (a <= b) is the tokens merged away by making frames a..b one
    window, (b - a) x the locations whose similarity stays above tau from a to b; 0 below the
    diagonal. similarity: (T - 1, P)."""
    return removable_from_runs(static_runs(similarity, tau))


def best_windows(counts: list[list[float]], max_window: int) -> tuple[list[Segment], int]:
    """`static_windows`' dynamic programme on the host, over `removable_counts` as nested lists."""
    num_frames = len(counts)
    best = [0.0] * num_frames
    first = [0] * num_frames  # the window ending at frame i starts at first[i]
    for i in range(num_frames):
        value, start = (best[i - 1] if i > 0 else 0.0), i
        for width in range(2, min(i + 1, max_window) + 1):
            before = i - width
            candidate = (best[before] if before >= 0 else 0.0) + counts[before + 1][i]
            if candidate > value:
                value, start = candidate, before + 1
        best[i], first[i] = value, start
    windows, end = [], num_frames - 1
    while end >= 0:
        windows.append((first[end], end + 1))
        end = first[end] - 1
    return windows[::-1], int(best[-1]) if num_frames else 0


def static_windows(similarity: Tensor, tau: float, max_window: int) -> tuple[list[Segment], int]:
    """The partition of the clip into windows of at most `max_window` frames that merges away the
    most static tokens, as half-open frame ranges, and that number of tokens.

    best[i] = max(best[i - 1], max over w in 2..min(i + 1, max_window) of
    best[i - w] + removable[i - w + 1, i]); a longer window must do strictly better than every
    shorter choice (ties: the single frame, then the shorter window), as the released code.
    The programme is sequential over frames: it runs in Python on the (T, T) table, moved to the
    host in one transfer.
    """
    return best_windows(removable_counts(similarity, tau).tolist(), max_window)


def to_device(columns: list[list[int]], device: torch.device) -> list[Tensor]:
    """Host integer lists as long tensors on `device`, in one copy that does not wait for the
    device queue (a blocking host-to-device copy would drain it)."""
    flat = torch.tensor([value for column in columns for value in column], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return list(flat.split([len(column) for column in columns]))


def members_first(mask: Tensor, width: int) -> Tensor:
    """(B, width) long: each row's True positions of mask (B, N) in increasing order, then (past
    the row's count) False positions, which callers mask out."""
    return torch.sort(~mask, dim=-1, stable=True).indices[:, :width]


def density_peaks(x: Tensor, sizes: Tensor, num_centres: Tensor, k: int, max_centres: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN centres of B padded sets x (B, N, C), set b being its first sizes[b] rows: the
    num_centres[b] tokens with the largest (distance to the nearest denser token) x exp(-mean
    squared distance to the min(k, num_centres[b]) nearest, self included). max_centres: the
    largest num_centres (a host int; 1 <= num_centres <= sizes).
    Returns (centres (B, max_centres) long, increasing within each set's first num_centres[b]
    entries, then N; distances (B, N, N) float32, +inf to and from padding).
    Equal densities: the lower index counts as denser (the released code adds random noise)."""
    batch, num_tokens, _ = x.shape
    slot = torch.arange(num_tokens, device=x.device)
    valid = slot < sizes[:, None]  # (B, N)
    max_k, k = min(k, max_centres), num_centres.clamp(max=k)  # (B,) neighbours per set
    pair = valid[:, :, None] & valid[:, None, :]  # (B, N, N)
    distances = padded_pairwise_distances(x, sizes).masked_fill(~pair, float("inf"))
    squared = distances.square()
    squared.diagonal(dim1=-2, dim2=-1).fill_(0.0)  # each token is one of its own k nearest
    nearest = torch.topk(squared, max_k, dim=-1, largest=False).values  # (B, N, max_k) ascending
    # a set with fewer neighbours than max_k averages its first k[b] with a masked sum
    beyond = torch.arange(max_k, device=x.device) >= k[:, None, None]
    partial = nearest.masked_fill(beyond, 0.0).sum(dim=-1) / k[:, None]
    log_density = -torch.where((k == max_k)[:, None], nearest.mean(dim=-1), partial)
    log_density = log_density.masked_fill(~valid, float("-inf"))  # padding: less dense than any token
    rank = density_rank(log_density)
    denser = rank[:, None, :] < rank[:, :, None]  # [b, i, j]: j denser than i (never padding)
    farthest = distances.masked_fill(~pair, float("-inf")).amax(dim=(-2, -1), keepdim=True)
    delta = torch.where(denser, distances, farthest).min(dim=-1).values
    log_score = (torch.log(delta) + log_density).masked_fill(~valid, float("-inf"))  # -inf where delta == 0
    # stable: equal scores go to the lower index, so a token always comes before padding
    order = torch.sort(log_score, dim=-1, descending=True, stable=True).indices
    chosen = torch.zeros_like(valid).scatter_(1, order, slot.expand(batch, -1) < num_centres[:, None])
    centres = torch.sort(torch.where(chosen, slot, num_tokens), dim=-1).values[:, :max_centres]
    return centres, distances


def cluster_weights(distances: Tensor, centres: Tensor, sizes: Tensor, num_centres: Tensor,
                    beta: float) -> tuple[Tensor, Tensor]:
    """Each non-centre joins its nearest centre (first on ties); a centre with m > 0 members is
    beta * itself + (1 - beta) * mean(members), else itself.

    distances: (B, N, N) of `density_peaks`; centres: (B, K) as it returns them; sizes,
    num_centres: (B,). Returns (cluster (B, N) in [0, num_centres[b]), weight (B, N) float32,
    0 on padding) such that every cluster is the weighted mean of its tokens."""
    batch, num_tokens, _ = distances.shape
    max_centres = centres.shape[1]
    valid = torch.arange(num_tokens, device=distances.device) < sizes[:, None]  # (B, N)
    real = torch.arange(max_centres, device=distances.device) < num_centres[:, None]  # (B, K)
    to_centres = distances.gather(2, centres.clamp(max=num_tokens - 1)[:, None, :].expand(batch, num_tokens, -1))
    cluster = to_centres.masked_fill(~real[:, None, :], float("inf")).argmin(dim=-1)  # (B, N)
    is_centre = torch.zeros(batch, num_tokens + 1, dtype=torch.bool, device=distances.device)
    is_centre = is_centre.scatter_(1, centres, True)[:, :num_tokens]  # unused centre slots hold N
    cluster = torch.where(is_centre, is_centre.cumsum(dim=-1) - 1, cluster)  # a centre is its own cluster
    joins = (valid & ~is_centre).float()
    members = torch.zeros(batch, max_centres, device=distances.device).scatter_add_(1, cluster, joins)  # (B, K)
    centre_weight = torch.where(members > 0, torch.full_like(members, beta), torch.ones_like(members))
    weight = torch.where(
        is_centre,
        centre_weight.gather(1, cluster),
        (1 - beta) / members.gather(1, cluster).clamp(min=1),
    )
    return cluster, weight.masked_fill(~valid, 0.0)


@dataclass(frozen=True)
class HoliTomMerge:
    """The outer-LLM result for a (T, P) token grid, flat token index t * P + p.

    rows: (T * P,) long, the output row of every token, -1 if dropped; weight: (T * P,) float32,
    its weight in its row's weighted mean; anchor: (M,) the token whose grid cell (and position)
    each row takes (the centre; a static row sits in its window's first frame); static: (M,) bool.
    windows: the segmentation; removed: tokens step 1 merges away; retention: the per-window ratio;
    static_rows: the number of static rows (static.sum(), known on the host).
    """

    rows: Tensor
    weight: Tensor
    anchor: Tensor
    static: Tensor
    windows: list[Segment]
    removed: int
    retention: float
    static_rows: int = 0

    @property
    def num_rows(self) -> int:
        return int(self.anchor.shape[0])


class MissingAttention(ValueError):
    """The merge had to rank dynamic tokens but was given no vision-encoder attention."""


@dataclass(frozen=True)
class WindowPlan:
    """Host-side counts of one window [start, end): `static` locations stay static across it,
    `count` static rows; each frame keeps `budget` rows, `dominant` of them by attention and
    `contextual` cluster centres of the rest; its rows begin at `offset`."""

    start: int
    end: int
    static: int
    count: int
    budget: int
    dominant: int
    contextual: int
    offset: int

    @property
    def width(self) -> int:
        return self.end - self.start


def plan_windows(windows: list[Segment], counts: list[list[float]], per_frame: int, retention: float,
                 context_share: float) -> list[WindowPlan]:
    """Every window's budgets, from the host copy of `removable_counts` (entry [a, b - 1] of a
    window [a, b) is (b - 1 - a) x its static locations), rounded as the released code does."""
    plans, offset = [], 0
    for start, end in windows:
        static = round(counts[start][end - 1] / (end - 1 - start)) if end - start > 1 else 0
        count = round(static * retention)
        budget = math.ceil((per_frame - static) * retention)
        dominant = round(budget * (1 - context_share))
        plans.append(WindowPlan(start, end, static, count, budget, dominant, budget - dominant, offset))
        offset += count + (end - start) * budget
    return plans


def holitom_merge(features: Tensor, attention: Tensor | None, ratio: float = 0.1, tau: float = 0.8,
                  beta: float = 0.6, context_share: float = 0.0, k: int = 7,
                  max_window: int = 1024) -> HoliTomMerge:
    """HoliTom's outer-LLM token merging (see the module docstring).

    features: (T, P, C) tokens as the LLM receives them; attention: (T, P) attention each token
    receives in the vision encoder (None is accepted while every dynamic token is kept, e.g. at
    ratio 1; otherwise MissingAttention). Rows come in the released code's order: per window, the
    static clusters (by centre location), then every frame's dynamic tokens by location.

    One host transfer (the (T, T) table that the window programme and every budget read), then
    whole-clip tensor work: all windows' static clusters at once, all frames' dynamic tokens at once.
    """
    num_frames, per_frame, _ = features.shape
    device = features.device
    run = static_runs(location_similarity(features), tau)  # (T - 1, P)
    counts = removable_from_runs(run).tolist()
    windows, removed = best_windows(counts, max_window)
    total = num_frames * per_frame
    retention = min(ratio / ((total - removed) / total), 1.0)
    plans = plan_windows(windows, counts, per_frame, retention, context_share)
    for plan in plans:
        if attention is None and 0 < plan.dominant < per_frame - plan.static:
            raise MissingAttention("vision-encoder attention is needed to choose among a frame's dynamic tokens")
    last = plans[-1]
    num_rows = last.offset + last.count + last.width * last.budget
    clustered = [plan for plan in plans if plan.count > 0]  # the windows with static rows
    by_frame = [(plan, frame) for plan in plans for frame in range(plan.start, plan.end)]
    context = [(plan, frame) for plan, frame in by_frame if plan.contextual > 0]  # frames that cluster a rest
    window_index = {plan.start: index for index, plan in enumerate(clustered)}
    (frame_start, frame_width, dominant, frame_offset, frame_window,  # (T,) each
     window_start, window_width, window_size, window_count, window_offset,  # (W,) each, clustered windows
     context_frame, context_size, context_count) = to_device([  # (F,) each, frames with a rest to cluster
        [plan.start for plan, _ in by_frame], [plan.width for plan, _ in by_frame],
        [plan.dominant for plan, _ in by_frame],
        [plan.offset + plan.count + (frame - plan.start) * plan.budget for plan, frame in by_frame],
        [window_index.get(plan.start, len(clustered)) for plan, _ in by_frame],
        [plan.start for plan in clustered], [plan.width for plan in clustered], [plan.static for plan in clustered],
        [plan.count for plan in clustered], [plan.offset for plan in clustered],
        [frame for _, frame in context], [per_frame - plan.static - plan.dominant for plan, _ in context],
        [plan.contextual for plan, _ in context],
    ], device)
    flat_features = features.reshape(total, -1)
    token = torch.arange(total, device=device).view(num_frames, per_frame)
    anchor = torch.zeros(num_rows + 1, dtype=torch.long, device=device)  # entry num_rows takes unused writes
    is_static = torch.zeros(num_rows + 1, dtype=torch.bool, device=device)

    static = static_locations(run, frame_start, frame_width)  # (T, P)
    rows = torch.full((num_frames, per_frame), -1, dtype=torch.long, device=device)
    weight = torch.zeros(num_frames, per_frame, dtype=torch.float32, device=device)
    if clustered:
        counts_max = max(plan.count for plan in clustered)
        rows, weight, row, centre = merge_static(
            flat_features, static, frame_window, (window_start, window_width, window_size, window_count, window_offset),
            max(plan.static for plan in clustered), counts_max, k, beta, num_rows)
        anchor.scatter_(0, row, centre)
        is_static.scatter_(0, row, True)

    dynamic = ~static
    chosen = attended(attention, dynamic, dominant)  # (T, P)
    anchored = chosen  # a frame's rows, by location: its kept tokens and the centres of its rest
    if context:
        max_rest = max(per_frame - plan.static - plan.dominant for plan, _ in context)
        max_centres = max(plan.contextual for plan, _ in context)
        location, centre_of, rest_weight, centre_at = cluster_rest(
            flat_features, dynamic & ~chosen, context_frame, context_size, context_count, max_rest, max_centres, k,
            beta)
        anchored = anchored.index_put((context_frame,), anchored[context_frame] | centre_at)
    anchor_row = frame_offset[:, None] + anchored.cumsum(dim=1) - 1  # (T, P)
    anchor.scatter_(0, torch.where(anchored, anchor_row, num_rows).flatten(), token.flatten())
    rows = torch.where(chosen, anchor_row, rows).flatten()
    weight = torch.where(chosen, 1.0, weight).flatten()
    if context:  # the rest joins the row of its centre
        real = torch.arange(max_rest, device=device) < context_size[:, None]  # (F, R)
        at = torch.where(real, context_frame[:, None] * per_frame + location, total).flatten()
        into = anchor_row[context_frame].gather(1, centre_of)  # (F, R)
        rows = torch.cat([rows, rows.new_full((1,), -1)]).scatter_(0, at, into.flatten())[:total]
        weight = torch.cat([weight, weight.new_zeros(1)]).scatter_(0, at, rest_weight.flatten())[:total]
    return HoliTomMerge(
        rows=rows, weight=weight, anchor=anchor[:num_rows], static=is_static[:num_rows], windows=windows,
        removed=removed, retention=retention, static_rows=sum(plan.count for plan in clustered),
    )


def static_locations(run: Tensor, frame_start: Tensor, frame_width: Tensor) -> Tensor:
    """(T, P) bool: location p is static in frame t when it stays above tau across t's window
    (first frame frame_start[t], frame_width[t] frames; a single frame has none); run: (T - 1, P)
    of `static_runs`."""
    if run.shape[0] == 0:
        return torch.zeros(len(frame_start), run.shape[1], dtype=torch.bool, device=run.device)
    at_start = run[frame_start.clamp(max=run.shape[0] - 1)]  # (T, P)
    return (at_start >= (frame_width - 1)[:, None]) & (frame_width > 1)[:, None]


def attended(attention: Tensor | None, dynamic: Tensor, dominant: Tensor) -> Tensor:
    """(T, P) bool: each frame's `dominant` (T,) dynamic tokens (dynamic: (T, P) bool) that get the
    most vision attention (T, P); equal attention: the lower location first (stable sort). With
    no attention, the first ones by location (the caller only allows none or all of them)."""
    if attention is None:
        return dynamic & (dynamic.cumsum(dim=1) - 1 < dominant[:, None])
    order = torch.argsort(attention.float(), dim=1, descending=True, stable=True)  # (T, P)
    ranked = dynamic.gather(1, order)  # the order among a frame's dynamic tokens is theirs alone
    return torch.zeros_like(dynamic).scatter_(1, order, ranked & (ranked.cumsum(dim=1) - 1 < dominant[:, None]))


def merge_static(flat_features: Tensor, static: Tensor, frame_window: Tensor, windows: tuple[Tensor, ...],
                 max_static: int, max_centres: int, k: int, beta: float, num_rows: int) -> tuple[Tensor, ...]:
    """Every window's static locations averaged over its frames and clustered, all windows at once.

    flat_features: (T * P, C); static: (T, P) bool; frame_window: (T,) each frame's window among
    `windows` (W otherwise); windows: (W,) long each, for the W windows with static rows: first
    frame, width, static locations, static rows, first row. max_static, max_centres: the most
    static locations and static rows of a window (host ints); k: DPC-KNN neighbours.
    Returns (rows (T, P) long, -1 off the static rows; weight (T, P) float32, the cluster weight
    / width since a row spans the window's frames; row (W * K,) the static rows, num_rows where
    unused; centre (W * K,) the token each row sits at: its centre's location in the window's
    first frame)."""
    start, width, size, count, offset = windows
    num_windows = len(start)
    num_frames, per_frame = static.shape
    device = static.device
    location = members_first(static[start], max_static)  # (W, S): a window's static locations first
    # the mean over the window's frames, in the features' dtype as the released code
    in_window = frame_window[None, :] == torch.arange(num_windows, device=device)[:, None]  # (W, T)
    sums = in_window.to(flat_features.dtype) @ flat_features.reshape(num_frames, -1)  # (W, P * C)
    averaged = sums.view(num_windows, per_frame, -1) / width.to(flat_features.dtype)[:, None, None]
    averaged = averaged.gather(1, location[:, :, None].expand(-1, -1, averaged.shape[-1]))  # (W, S, C)
    centres, distances = density_peaks(averaged, size, count, k, max_centres)
    cluster, location_weight = cluster_weights(distances, centres, size, count, beta)
    # each window's row and weight per location (padding writes to a spare column P), then per frame
    real = torch.arange(max_static, device=device) < size[:, None]  # (W, S)
    column = torch.where(real, location, per_frame)
    row_at = torch.full((num_windows + 1, per_frame + 1), -1, dtype=torch.long, device=device)
    row_at[:num_windows].scatter_(1, column, offset[:, None] + cluster)
    weight_at = torch.zeros(num_windows + 1, per_frame + 1, dtype=torch.float32, device=device)
    weight_at[:num_windows].scatter_(1, column, location_weight / width[:, None])
    real_centre = torch.arange(max_centres, device=device) < count[:, None]  # (W, K)
    row = torch.where(real_centre, offset[:, None] + torch.arange(max_centres, device=device), num_rows)
    centre = start[:, None] * per_frame + location.gather(1, centres.clamp(max=max_static - 1))
    return row_at[frame_window, :per_frame], weight_at[frame_window, :per_frame], row.flatten(), centre.flatten()


def cluster_rest(flat_features: Tensor, rest: Tensor, frames: Tensor, size: Tensor, count: Tensor, max_rest: int,
                 max_centres: int, k: int, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The dynamic tokens a frame does not keep (rest: (T, P) bool), clustered into count[f]
    rows in each of `frames` (F,), all frames at once; size: (F,) each frame's rest tokens.
    max_rest, max_centres: the largest size and count (host ints); k: DPC-KNN neighbours.
    Returns (location (F, R) long: the rest tokens' locations, in order, past size[f] padding;
    centre_of (F, R): the location of each one's centre; weight (F, R) float32, 0 on padding;
    centre_at (F, P) bool: the centres' locations)."""
    per_frame = rest.shape[1]
    location = members_first(rest[frames], max_rest)  # (F, R)
    centres, distances = density_peaks(flat_features[frames[:, None] * per_frame + location], size, count, k,
                                       max_centres)
    cluster, weight = cluster_weights(distances, centres, size, count, beta)
    centre_location = location.gather(1, centres.clamp(max=max_rest - 1))  # (F, K)
    real_centre = torch.arange(max_centres, device=rest.device) < count[:, None]
    centre_at = torch.zeros(len(frames), per_frame + 1, dtype=torch.bool, device=rest.device)
    centre_at.scatter_(1, torch.where(real_centre, centre_location, per_frame), True)
    return location, centre_location.gather(1, cluster), weight, centre_at[:, :per_frame]


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
            "static_rows": result.static_rows,
            "dynamic_rows": result.num_rows - result.static_rows,
        }
        return out


def sequential_average(kept: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor,
                       rounds: int | None = None) -> torch.Tensor:
    """Average every pruned state into its target, one at a time in pruned order:
    kept[t] <- (kept[t] + pruned[i]) / 2, in the states' own dtype (the released code's loop).

    kept: (k, C); pruned: (m, C); target: (m,) long in [0, k); rounds: the most states one target
    receives (None: read from target, one host sync). Returns the new (k, C).
    Vectorised by rounds: round r averages every target's r-th member in at once, bit for bit the
    loop's arithmetic."""
    out = kept.clone()
    if len(target) == 0:
        return out
    num_kept, num_pruned = kept.shape[0], len(target)
    order = torch.argsort(target, stable=True)  # grouped by target, pruned order within a group
    grouped = target[order]
    first_of_group = torch.searchsorted(grouped, grouped)  # index of each group's first member
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_pruned, device=order.device) - first_of_group
    if rounds is None:
        rounds = int(rank.max()) + 1
    # member[t, r]: the pruned state averaged into t in round r, or m (a spare zero row) if none
    member = torch.full((num_kept * rounds,), num_pruned, dtype=torch.long, device=target.device)
    member.scatter_(0, target * rounds + rank, torch.arange(num_pruned, device=target.device))
    member = member.view(num_kept, rounds)
    padded = torch.cat([pruned, pruned.new_zeros(1, pruned.shape[1])])
    for round_index in range(rounds):
        index = member[:, round_index]
        out = torch.where((index < num_pruned)[:, None], (out + padded[index]) / 2, out)
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

    def kept_at_ratio(self, num_in, num_original, meta, ratio):
        return round(num_in * ratio)

    def select(self, context):
        visual = context.visual_rows
        scores = context.attention(context.last_row()).mean(dim=0)[0, visual]  # (v,)
        budget = max(0, min(int(context.budget), len(visual)))
        by_attention = torch.argsort(scores, descending=True, stable=True)  # ties: lower index first
        keep = by_attention[:budget].sort().values
        pruned = by_attention[budget:].sort().values  # (m,) in sequence order
        if not len(keep):  # nothing kept: the dropped tokens have nowhere to go
            pruned = pruned[:0]
        states = context.hidden[0, visual]  # (v, C)
        kept_states = states[keep]
        target = torch.zeros(0, dtype=torch.long, device=keep.device)
        largest_group = torch.zeros(1, dtype=torch.long, device=keep.device)
        if len(pruned):
            # candidates in decreasing score, as the released top-k lists them: equal similarities
            # (frequent in bfloat16) go to the most attended kept token
            by_score = torch.argsort(scores[keep], descending=True, stable=True)
            similarity = cosine_matrix(states[pruned], kept_states[by_score])  # (m, k)
            target = by_score[similarity.argmax(dim=1)]  # (m,) into keep
            group_size = torch.zeros(len(keep), dtype=torch.long, device=keep.device)
            largest_group = group_size.scatter_add_(0, target, torch.ones_like(target)).max().view(1)  # no bincount: its size syncs
        source = context.row_source[visual]
        # one host transfer: the rows for the record and the rounds of the sequential average
        moved = torch.cat([source[pruned], source[keep[target]], largest_group.to(source.device)]).tolist()
        merged_rows, into_rows, rounds = moved[:len(pruned)], moved[len(pruned):-1], moved[-1]
        if len(pruned):
            kept_states = sequential_average(kept_states, states[pruned], target, rounds=rounds)
        context.state.record_merge(context.layer, torch.tensor(merged_rows, dtype=torch.long),
                                   torch.tensor(into_rows, dtype=torch.long))  # drawn by --show-kept
        context.state.details.setdefault(DETAILS_KEY, {})["inner"] = {
            "layer": context.layer,
            "kept": len(keep),
            "merged": len(pruned),
            # LLM-input rows: each merged token and the kept token it went into (for drawing)
            "merged_rows": merged_rows,
            "into_rows": into_rows,
        }
        return Selection(keep=keep, kept_hidden=kept_states)
