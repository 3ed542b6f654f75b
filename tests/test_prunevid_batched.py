"""PruneVid's whole-tensor stage 1 (issue #30, launch-efficient stages): the padded, batched
functions give what the per-set / per-segment ones give, and the stage's op count does not grow
with the frames (CPU, small)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import grid_tokens, request_state
from torch.profiler import ProfilerActivity, profile

from vidqa.pruning.methods.prunevid import SpatioTemporalMerge
from vidqa.pruning.ops.cluster import dpc_knn, dpc_knn_padded, identical_row_ids
from vidqa.pruning.ops.merging import cluster_or_keep, prunevid_merge_video
from vidqa.pruning.ops.segments import segment_static_masks, static_mask


def test_dpc_knn_padded_equals_dpc_knn_set_by_set():
    gen = torch.Generator().manual_seed(0)
    for trial in range(24):
        lengths = torch.randint(1, 30, (5,), generator=gen)
        width = int(lengths.max()) + 2
        x = torch.randn(5, width, [8, 32][trial % 2], generator=gen)
        x[:, 2] = x[:, 0]  # identical tokens: exact ties
        if trial % 3 == 0:
            x = x.round()  # many ties
        clusters = torch.stack([torch.randint(1, int(n) + 2, (), generator=gen) for n in lengths])
        k = [1, 7, 20][trial % 3]  # 20: sets smaller than k
        for count_self, order in itertools.product((True, False), ("centre_score", "first_appearance")):
            labels = dpc_knn_padded(x, lengths, clusters, k, count_self_as_neighbour=count_self, label_order=order)
            for b, (n, c) in enumerate(zip(lengths.tolist(), clusters.tolist())):
                expected = dpc_knn(x[b, :n], c, k, count_self_as_neighbour=count_self, label_order=order)
                assert torch.equal(labels[b, :n], expected), (trial, b, count_self, order)
                assert (labels[b, n:] == -1).all()


def test_identical_row_ids_group_rows_as_unique_does():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (60, 6), generator=gen).float()
    x[7] = -0.0 * x[3]  # -0.0 equals 0.0
    x[8] = 0.0 * x[3]
    nan = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [float("nan"), 1.0], [float("nan"), 1.0], [0.0, 1.0]])
    for rows in (x, nan):  # NaN equals nothing: the fallback to unique
        ids = identical_row_ids(rows)
        expected = torch.unique(rows, dim=0, return_inverse=True)[1]
        assert torch.equal(ids[:, None] == ids[None], expected[:, None] == expected[None])
    assert identical_row_ids(x)[7] == identical_row_ids(x)[8] and identical_row_ids(nan)[0] == identical_row_ids(nan)[1]


def test_segment_static_masks_are_static_mask_per_segment():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1, 12, 16, generator=gen)
    noise = torch.rand(1, 12, 1, generator=gen) * 2.0
    tokens = base + noise * torch.randn(14, 12, 16, generator=gen)
    segments = [(0, 3), (3, 4), (4, 14)]
    masks = segment_static_masks(tokens, segments, tau=0.8)
    assert masks.shape == (3, 12) and not masks[1].any()  # one frame: nothing static
    for (start, end), mask in zip(segments, masks):
        assert torch.equal(mask, static_mask(tokens[start:end], tau=0.8))
    assert 0 < int(masks[2].sum()) < 12


def merge_segment_by_segment(tokens, segments, static, cluster_ratio, k, row_order):
    """The former stage 1, one segment at a time (cluster_or_keep per group)."""
    features, is_static = [], []
    for (start, end), mask in zip(segments, static):
        segment = tokens[start:end]
        static_features = segment[:, mask].float().mean(dim=0)
        rows, _, count = cluster_or_keep(static_features, cluster_ratio, k, 14, row_order)
        dynamic, _, per_frame = cluster_or_keep(segment[:, ~mask], cluster_ratio, k, 14, row_order)
        features += [rows.to(tokens.dtype), dynamic.reshape(-1, tokens.shape[-1])]
        is_static += [True] * count + [False] * (per_frame * (end - start))
    return torch.cat(features), is_static


@pytest.mark.parametrize("row_order", ["centre_score", "first_appearance"])
def test_prunevid_merge_video_equals_the_segment_by_segment_merge(row_order):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(24, 36, 32, generator=gen)
    tokens[:, :20] = tokens[:1, :20] + 0.05 * torch.randn(24, 20, 32, generator=gen)  # a static part
    tokens[:, 30:] = 0.0  # identical tokens (black bars)
    segments = [(0, 3), (3, 5), (5, 24)]  # 19 frames: static means summed in blocks
    static = segment_static_masks(tokens, segments, tau=0.8)
    static[1, :22] = True  # a static group of 22 (> 14: clustered) in the short segment
    merged = prunevid_merge_video(tokens, segments, static, cluster_ratio=0.5, k=7, row_order=row_order)
    features, is_static = merge_segment_by_segment(tokens, segments, static, 0.5, 7, row_order)
    assert torch.equal(merged.features, features)  # bit for bit (hidden size a multiple of 32)
    assert merged.is_static.tolist() == is_static
    assert merged.num_static_rows == sum(is_static)
    # every row is the mean of its members, all in the row's segment
    segment_of_frame = torch.tensor([s for s, (start, end) in enumerate(segments) for _ in range(start, end)])
    for row in range(merged.num_rows):
        frames, locations = torch.nonzero(merged.assignment == row, as_tuple=True)
        assert torch.allclose(merged.features[row], tokens[frames, locations].mean(dim=0), atol=1e-5)
        assert (segment_of_frame[frames] == merged.segment[row]).all()


def stage_counts(num_frames: int) -> tuple[int, int]:
    """(aten ops, host syncs) of stage 1 on a synthetic clip of `num_frames` 6 x 6 frames."""
    gen = torch.Generator().manual_seed(num_frames)
    grid = torch.randn(4, 36, 32, generator=gen)[torch.arange(num_frames) * 4 // num_frames]  # 4 scenes
    grid = grid + 0.3 * torch.randn(num_frames, 36, 32, generator=gen)
    grid[:, :16] = grid[:1, :16]  # static locations
    tokens = grid_tokens(grid, rows=6)
    stage = SpatioTemporalMerge()
    stage.apply(tokens, request_state())  # warm-up
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as benchmarks/ops.py: some CPU kernels split into more ops when threaded
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            stage.apply(tokens, request_state())
    finally:
        torch.set_num_threads(threads)
    names = [event.name for event in prof.events()]
    syncs = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim"}
    return sum(name.startswith("aten::") for name in names), sum(name in syncs for name in names)


def test_stage1_launches_the_same_ops_whatever_the_frames():
    ops8, syncs8 = stage_counts(8)
    ops32, syncs32 = stage_counts(32)
    assert ops32 == ops8 and syncs32 == syncs8
    assert syncs8 <= 6  # tokens.merge's, and two CPU-only exactness checks; no per-segment ones
