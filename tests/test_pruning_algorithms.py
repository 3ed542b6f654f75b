"""Tests for the pure tensor algorithms behind PruneVid, SparseVLM and AdaTP (CPU, small)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import canonical

from vidqa.pruning.methods.sparsevlm import recycle_pruned, select_raters
from vidqa.pruning.ops.budgets import adatp_segment_budgets, round_to_total
from vidqa.pruning.ops.cluster import best_member, cluster_means, dpc_knn, first_member
from vidqa.pruning.ops.merging import local_dedup, prunevid_merge_segment
from vidqa.pruning.ops.segments import (
    labels_to_segments,
    prunevid_segments,
    similarity_segments,
    static_mask,
)


def scenes(spec: list[tuple[int, int]], centres: torch.Tensor, noise: float, gen) -> torch.Tensor:
    """Per-frame features: for each (centre index, frame count), frames near that centre."""
    channels = centres.shape[-1]
    return torch.cat(
        [centres[c] + noise * torch.randn(n, channels, generator=gen) for c, n in spec]
    )


def assert_valid_segmentation(segments: list[tuple[int, int]], num_frames: int) -> None:
    assert segments[0][0] == 0 and segments[-1][1] == num_frames
    for (_, end), (start, _) in zip(segments, segments[1:]):
        assert end == start
    assert all(end > start for start, end in segments)


# --------------------------------------------------------------------------------- cluster.py


def make_blobs(gen, sizes=(20, 30, 40, 25), channels=8, spread=3.0, std=0.1):
    centres = spread * torch.randn(len(sizes), channels, generator=gen)
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    x = centres[truth] + std * torch.randn(len(truth), channels, generator=gen)
    order = torch.randperm(len(truth), generator=gen)  # interleave the blobs
    return x[order], truth[order]


def test_dpc_knn_recovers_blobs():
    gen = torch.Generator().manual_seed(0)
    x, truth = make_blobs(gen)
    labels = dpc_knn(x, num_clusters=4, k=7)
    assert labels.dtype == torch.long and labels.shape == truth.shape
    assert canonical(labels) == canonical(truth)
    # Labels are numbered by first appearance in the token sequence.
    assert labels.tolist() == canonical(labels)


def test_dpc_knn_is_deterministic_with_exact_density_ties():
    gen = torch.Generator().manual_seed(1)
    x, truth = make_blobs(gen, sizes=(20, 20, 20))
    doubled = torch.cat([x, x])  # every point duplicated: exact ties in density
    first = dpc_knn(doubled, 3, k=7)
    for _ in range(3):
        assert torch.equal(dpc_knn(doubled, 3, k=7), first)
    assert canonical(first) == canonical(torch.cat([truth, truth]))

    # Four tokens, two exact duplicates each: all densities tie; ties go by index, so the
    # centres are tokens 0 and 2 and the duplicates are grouped.
    a, b = torch.zeros(4), torch.ones(4)
    assert dpc_knn(torch.stack([a, a, b, b]), 2, k=1).tolist() == [0, 0, 1, 1]
    assert dpc_knn(torch.stack([a, b, a, b]), 2, k=1).tolist() == [0, 1, 0, 1]


def test_dpc_knn_edge_cases():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    assert dpc_knn(x, 5, k=7).tolist() == [0, 1, 2, 3, 4]
    assert dpc_knn(x, 9, k=2).tolist() == [0, 1, 2, 3, 4]
    assert dpc_knn(x, 1, k=7).tolist() == [0] * 5  # k > N - 1 is capped
    assert dpc_knn(x[:0], 3, k=7).shape == (0,)
    with pytest.raises(ValueError):
        dpc_knn(x, 0, k=7)
    # Low-precision input works (distances are computed in float32).
    gen = torch.Generator().manual_seed(3)
    blobs, truth = make_blobs(gen, sizes=(20, 20))
    assert canonical(dpc_knn(blobs.to(torch.bfloat16), 2, k=7)) == canonical(truth)


def test_dpc_knn_batched_equals_one_set_at_a_time():
    """A [B, N, C] call clusters each set on its own: identical labels to B separate calls,
    including sets with duplicate rows (exact density ties) and a set shared by two batch
    entries, where global duplicate ids must not leak across sets."""
    gen = torch.Generator().manual_seed(4)
    for num_tokens, channels, num_clusters in [(30, 8, 6), (17, 3, 16), (40, 12, 1)]:
        x = torch.randn(4, num_tokens, channels, generator=gen)
        x[1] = torch.randint(0, 3, (num_tokens, channels), generator=gen).float()  # many duplicates
        x[2, 5] = x[2, 0]
        x[3] = x[0]
        batched = dpc_knn(x, num_clusters, k=5)
        assert batched.shape == (4, num_tokens)
        for b in range(4):
            assert torch.equal(batched[b], dpc_knn(x[b], num_clusters, k=5))
        means = cluster_means(x, batched, num_clusters)
        for b in range(4):
            assert torch.equal(means[b], cluster_means(x[b], batched[b], num_clusters))


def test_cluster_means_and_members():
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    means = cluster_means(x, labels, 4)
    for c in range(3):
        assert torch.allclose(means[c], x[labels == c].mean(dim=0))
    assert torch.equal(means[3], torch.zeros(2))  # empty cluster
    assert cluster_means(x.to(torch.bfloat16), labels, 3).dtype == torch.bfloat16

    assert first_member(labels, 4).tolist() == [1, 3, 0, -1]
    scores = torch.tensor([0.5, 0.9, 0.7, 0.1, 0.9, 0.7])
    # Cluster 0 = {1, 4} tie at 0.9 -> 1; cluster 2 = {0, 2, 5}: 0.7 at 2 and 5 -> 2.
    assert best_member(labels, scores, 4).tolist() == [1, 3, 2, -1]


# -------------------------------------------------------------------------------- segments.py


def test_prunevid_segments_cluster_count_matches_scene_count():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen)
    three = scenes([(0, 4), (1, 6), (2, 6)], centres, 0.01, gen)
    # int(16 * 0.1875) == 3 clusters for 3 scenes.
    assert prunevid_segments(three, cluster_ratio=0.1875) == [(0, 4), (4, 10), (10, 16)]
    # Default ratio: int(16 * 0.25) == 4 clusters for 4 scenes.
    four = scenes([(0, 4), (1, 3), (3, 3), (2, 6)], centres, 0.01, gen)
    assert prunevid_segments(four) == [(0, 4), (4, 7), (7, 10), (10, 16)]


def test_prunevid_segments_more_clusters_than_scenes():
    # 3 scenes, 4 clusters: the spare centre goes to the most isolated frame, here an outlier
    # frame of scene C. It forms a 1-frame cluster, which is a stray and joins its longer
    # neighbouring run.
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen)
    x = scenes([(0, 4), (1, 6), (2, 6)], centres, 0.01, gen)
    x[15] = centres[2] + 0.3 * torch.randn(16, generator=gen)
    assert len(set(dpc_knn(x, 4, k=7).tolist())) == 4
    assert prunevid_segments(x) == [(0, 4), (4, 10), (10, 16)]  # last frame: only neighbour C
    # The rule looks at lengths only: an outlier at the end of scene B (5 frames left of it)
    # joins scene C (6 frames), the longer neighbour.
    y = scenes([(0, 4), (1, 6), (2, 6)], centres, 0.01, gen)
    y[9] = centres[1] + 0.3 * torch.randn(16, generator=gen)
    assert prunevid_segments(y) == [(0, 4), (4, 9), (9, 16)]
    # Whatever the split, segments are contiguous and have >= 2 frames.
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        z = scenes([(0, 4), (1, 6), (2, 6)], torch.randn(3, 16, generator=g), 0.05, g)
        segments = prunevid_segments(z)
        assert_valid_segmentation(segments, 16)
        assert all(end - start >= 2 for start, end in segments)


def test_prunevid_segments_repairs_stray_frame():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen)
    x = scenes([(0, 4), (1, 6), (2, 6)], centres, 0.01, gen)
    x[6] = centres[0] + 0.01 * torch.randn(16, generator=gen)  # a frame of scene A inside B
    labels = dpc_knn(x, 3, k=7).tolist()
    assert labels == [0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]  # non-contiguous
    # As PruneVid's refine_clusters: B keeps its longest run (frames 7..9), so frames 4..5 and
    # the stray A frame 6 are blanked together and the whole stretch joins the longer
    # neighbour, A (4 frames against 3).
    assert prunevid_segments(x, cluster_ratio=0.1875) == [(0, 7), (7, 10), (10, 16)]


def test_labels_to_segments_rules():
    # Stray run relabelled to its longer neighbour; ties -> the earlier (left) one.
    assert labels_to_segments([0, 0, 0, 1, 1, 1, 0, 1, 1]) == [(0, 3), (3, 9)]
    assert labels_to_segments([0, 0, 0, 1, 2, 2, 2]) == [(0, 4), (4, 7)]
    # All strays blanked at once, filled left to right: the first run of 0s (0 keeps frames
    # 7..9) joins its only neighbour, 1; the lone 1 at frame 6 joins the 0s (3 > 2 frames).
    assert labels_to_segments([0, 0, 1, 1, 2, 2, 1, 0, 0, 0]) == [(0, 4), (4, 6), (6, 10)]
    # Tied longest runs are all kept: cluster 0 owns two segments.
    assert labels_to_segments([0, 0, 1, 1, 1, 0, 0]) == [(0, 2), (2, 5), (5, 7)]
    # Adjacent strays of three clusters form one blank stretch, which joins its one neighbour.
    assert labels_to_segments([3, 0, 1, 2] + [3] * 10 + [0, 0]) == [(0, 14), (14, 16)]
    # A filled stretch counts as part of its run for the next one: frame 0 joins the 1s (its
    # only neighbour), making that run 3 long, so frame 3 ties 3 against 3 and joins it too
    # (judged on the labels before filling it would have joined the 2s, 3 > 2).
    assert labels_to_segments([9, 1, 1, 8, 2, 2, 2]) == [(0, 4), (4, 7)]
    # 1-frame clusters are merged into the longer neighbour (ties: left).
    assert labels_to_segments([0, 0, 1, 2, 2, 2]) == [(0, 2), (2, 6)]
    assert labels_to_segments([0, 0, 1, 2, 2]) == [(0, 3), (3, 5)]
    assert labels_to_segments([0, 1, 2, 3]) == [(0, 4)]
    assert labels_to_segments([5]) == [(0, 1)]
    assert labels_to_segments([]) == []
    rng = random.Random(0)
    for _ in range(50):
        num_frames = rng.randint(2, 24)
        labels = [rng.randrange(5) for _ in range(num_frames)]
        segments = labels_to_segments(labels)
        assert_valid_segmentation(segments, num_frames)
        assert all(end - start >= 2 for start, end in segments)


def test_similarity_segments():
    gen = torch.Generator().manual_seed(0)
    e = torch.eye(16)
    centres = torch.stack([e[0], e[1], (e[1] + e[2]) / 2**0.5])  # cos(A,B)=0, cos(B,C)=0.71
    x = scenes([(0, 4), (1, 6), (2, 6)], centres, 0.005, gen)
    assert similarity_segments(x, tau=0.9) == [(0, 4), (4, 10), (10, 16)]
    assert similarity_segments(x, tau=0.9, max_segments=2) == [(0, 4), (4, 16)]  # lowest sim
    assert similarity_segments(x, tau=0.9, max_segments=1) == [(0, 16)]
    assert similarity_segments(x, tau=0.5) == [(0, 4), (4, 16)]
    assert similarity_segments(x[:1]) == [(0, 1)]


def test_static_mask():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 16, generator=gen)
    left = base + 1e-3 * torch.randn(5, 4, 16, generator=gen)
    right = torch.randn(5, 4, 16, generator=gen)
    tokens = torch.cat([left, right], dim=1)  # [W=5, P=8, C=16]
    assert static_mask(tokens, tau=0.9).tolist() == [True] * 4 + [False] * 4
    assert static_mask(tokens.to(torch.bfloat16), tau=0.9).tolist() == [True] * 4 + [False] * 4
    assert not static_mask(tokens[:1], tau=0.9).any()


# --------------------------------------------------------------------------------- merging.py


def check_merge(tokens, static, result, expected_static_rows, expected_dynamic_rows):
    num_frames, num_locations, _ = tokens.shape
    num_rows = expected_static_rows + num_frames * expected_dynamic_rows
    assert result.features.shape == (num_rows, tokens.shape[-1])
    assert result.is_static.tolist() == [True] * expected_static_rows + [False] * (
        num_rows - expected_static_rows
    )
    assert result.frame.tolist() == [0] * expected_static_rows + [
        w for w in range(num_frames) for _ in range(expected_dynamic_rows)
    ]
    assignment = result.assignment
    assert assignment.shape == (num_frames, num_locations)
    assert assignment.min() >= 0 and assignment.max() < num_rows
    assert (torch.bincount(assignment.flatten(), minlength=num_rows) > 0).all()
    for m in range(num_rows):
        frames, locations = torch.nonzero(assignment == m, as_tuple=True)
        members = tokens[frames, locations]
        assert torch.allclose(result.features[m], members.mean(dim=0), atol=1e-5)
        if result.is_static[m]:
            assert static[locations].all()
            # all W frames of each member location
            assert torch.bincount(locations).max() == num_frames
            assert set(torch.bincount(locations)[locations].tolist()) == {num_frames}
        else:
            assert not static[locations].any()
            assert (frames == result.frame[m]).all()


def test_prunevid_merge_segment_clusters_static_and_dynamic():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 40, 8, generator=gen)  # W=3, P=40
    static = torch.zeros(40, dtype=torch.bool)
    static[::2] = True  # S = 20 > 14 -> 10 clusters; D = 20 per frame -> 10 clusters
    result = prunevid_merge_segment(tokens, static)
    check_merge(tokens, static, result, expected_static_rows=10, expected_dynamic_rows=10)


def test_prunevid_merge_segment_small_groups_are_kept():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 24, 8, generator=gen)
    static = torch.zeros(24, dtype=torch.bool)
    static[:10] = True  # S = 10 and D = 14: neither exceeds 14, nothing is clustered
    result = prunevid_merge_segment(tokens, static)
    check_merge(tokens, static, result, expected_static_rows=10, expected_dynamic_rows=14)
    assert torch.allclose(result.features[:10], tokens[:, :10].mean(dim=0))
    assert torch.equal(result.features[10:24], tokens[0, 10:])
    none_static = prunevid_merge_segment(tokens, torch.zeros(24, dtype=torch.bool))
    check_merge(tokens, torch.zeros(24, dtype=torch.bool), none_static, 0, 12)
    half = prunevid_merge_segment(tokens.to(torch.bfloat16), static)
    assert half.features.dtype == torch.bfloat16


def test_local_dedup():
    gen = torch.Generator().manual_seed(0)
    num_frames, channels = 6, 8
    tokens = torch.randn(num_frames, 3, channels, generator=gen)  # position 1: changes always
    base = torch.randn(channels, generator=gen)
    tokens[:, 0] = base + 0.01 * torch.randn(num_frames, channels, generator=gen)  # static
    a, b = torch.randn(2, channels, generator=gen)
    tokens[:, 2] = torch.stack([a, a, b, a, a, a])  # a run interrupted by a change

    result = local_dedup(tokens, [(0, 3), (3, 6)], tau=0.9)
    assert result.keep[:, 0].tolist() == [True, False, False, True, False, False]
    assert result.run_length[:, 0].tolist() == [3, 0, 0, 3, 0, 0]
    assert torch.allclose(result.features[0, 0], tokens[0:3, 0].mean(dim=0))
    assert torch.allclose(result.features[3, 0], tokens[3:6, 0].mean(dim=0))
    assert result.keep[:, 1].all() and (result.run_length[:, 1] == 1).all()
    assert torch.equal(result.features[:, 1], tokens[:, 1])
    assert result.keep[:, 2].tolist() == [True, False, True, True, False, False]
    assert result.run_length[:, 2].tolist() == [2, 0, 1, 3, 0, 0]

    one_segment = local_dedup(tokens, [(0, 6)], tau=0.9)
    assert one_segment.keep[:, 0].tolist() == [True] + [False] * 5
    assert one_segment.run_length[0, 0] == 6
    assert torch.allclose(one_segment.features[0, 0], tokens[:, 0].mean(dim=0))
    # Every token is counted exactly once.
    assert one_segment.run_length.sum() == num_frames * 3
    assert local_dedup(tokens.to(torch.bfloat16), [(0, 6)]).features.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        local_dedup(tokens, [(0, 3), (4, 6)])


# --------------------------------------------------------------------------------- budgets.py


def test_round_to_total():
    assert round_to_total([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert round_to_total([1, 1, 1], 10) == [4, 3, 3]  # remainder tie -> lower index
    assert round_to_total(torch.tensor([0.1, 0.6, 0.3]), 7) == [1, 4, 2]  # 0.7, 4.2, 2.1
    assert round_to_total([0, 0], 5) == [3, 2]
    assert round_to_total([10, 1, 1], 9, caps=[3, 10, 10]) == [3, 3, 3]
    assert round_to_total([1, 0], 4, caps=[2, 5]) == [2, 2]
    rng = random.Random(0)
    for _ in range(50):
        weights = [rng.random() for _ in range(rng.randint(1, 8))]
        caps = [rng.randint(0, 20) for _ in weights]
        total = rng.randint(0, sum(caps))
        out = round_to_total(weights, total, caps)
        assert sum(out) == total
        assert all(0 <= n <= c for n, c in zip(out, caps))
    with pytest.raises(ValueError):
        round_to_total([1, 1], 11, caps=[5, 5])


def test_adatp_segment_budgets():
    sizes = [100, 50, 50]
    flat = torch.zeros(3)
    assert adatp_segment_budgets(sizes, flat, 100) == [50, 25, 25]
    relevance = torch.tensor([0.0, 1.0, 0.2])
    assert adatp_segment_budgets(sizes, relevance, 100, mix=1.0) == [50, 25, 25]
    mixed = adatp_segment_budgets(sizes, relevance, 100, mix=0.5)
    assert sum(mixed) == 100 and mixed[1] > 25 and mixed[1] > mixed[2]
    assert mixed[0] < 50
    # Capped at the segment sizes; large logits stay finite.
    capped = adatp_segment_budgets([10, 100], torch.tensor([500.0, 0.0]), 50, mix=0.0)
    assert capped == [10, 40]
    assert adatp_segment_budgets([3, 4], torch.tensor([1.0, 2.0]), 7) == [3, 4]
    with pytest.raises(ValueError):
        adatp_segment_budgets([3, 4], torch.zeros(2), 8)


# ---------------------------------------------------------------------------------- raters.py


def test_select_raters():
    gen = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0)
    visual = 3 * direction + 0.1 * torch.randn(10, 16, generator=gen)
    text = 0.1 * torch.randn(6, 16, generator=gen)
    text[1] = 3 * direction
    text[4] = 2.5 * direction
    assert select_raters(visual, text).tolist() == [False, True, False, False, True, False]
    same = select_raters(visual, torch.ones(5, 16))
    assert same.all()
    assert select_raters(visual[:0], text).all()


def test_recycle_pruned():
    gen = torch.Generator().manual_seed(0)
    num_pruned, channels = 40, 16
    hidden = torch.randn(num_pruned, channels, generator=gen)
    # Top int(0.3 * 40) + 1 = 13 tokens by score, clustered into int(40 / 10) + 1 = 5 clusters.
    top = torch.randperm(num_pruned, generator=gen)[:13].sort().values
    scores = torch.rand(num_pruned, generator=gen)
    scores[top] = 1.0 + torch.rand(13, generator=gen)
    blob_of_top = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2])  # sizes 3,3,3,2,2
    centres = torch.randn(5, channels, generator=gen)
    hidden[top] = centres[blob_of_top] + 0.01 * torch.randn(13, channels, generator=gen)

    merged, representative = recycle_pruned(hidden, scores)
    assert merged.shape == (5, channels) and representative.shape == (5,)
    for blob in range(5):  # blobs appear in this order among the top tokens
        members = top[blob_of_top == blob]
        assert torch.allclose(merged[blob], hidden[members].mean(dim=0))
        assert representative[blob] == members[scores[members].argmax()]

    empty, empty_index = recycle_pruned(hidden[:0], scores[:0])
    assert empty.shape == (0, channels) and empty_index.shape == (0,)
    single, single_index = recycle_pruned(hidden[:1], scores[:1])
    assert torch.equal(single, hidden[:1]) and single_index.tolist() == [0]
    few, few_index = recycle_pruned(hidden[:5], torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3]))
    assert torch.allclose(few, hidden[[1, 3]].mean(dim=0, keepdim=True))  # 2 taken, 1 cluster
    assert few_index.tolist() == [1]
