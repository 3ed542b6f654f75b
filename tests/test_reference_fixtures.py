"""vidqa reproduces the authors' released PruneVid and SparseVLM functions on seeded inputs.

The expected outputs were made by tests/fixtures/prunevid/make_fixtures.py, which runs the
released code (Visual-AI/PruneVid, Gumpest/SparseVLMs) from git mirrors; here they are data.
Where vidqa's order of rows differs from the release on purpose, the comparison says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import canonical, grid_tokens, layer_context, request_state

from vidqa.errors import BadInput
from vidqa.pruning.methods.prunevid import QuestionAttentionSelect, SpatioTemporalMerge
from vidqa.pruning.methods.sparsevlm import recycle_pruned
from vidqa.pruning.ops.cluster import cluster_means, dpc_knn
from vidqa.pruning.ops.segments import labels_to_segments, make_clusters_contiguous

FIXTURES = torch.load(Path(__file__).parent / "fixtures" / "prunevid" / "reference.pt", weights_only=True)


def same_rows_up_to_order(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    """True when the rows of `a` are the rows of `b` in some order (a one-to-one match)."""
    if a.shape != b.shape:
        return False
    nearest = torch.cdist(a.double(), b.double()).argmin(dim=1)
    return len(nearest.unique()) == len(b) and torch.allclose(a, b[nearest], atol=atol)


# -- DPC-KNN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FIXTURES["dpc_knn"], ids=lambda c: f"{c['x'].shape[0]}x{c['x'].shape[1]}")
def test_dpc_knn_labels_match_the_release(case):
    x, clusters, k = case["x"], case["num_clusters"], case["k"]
    released = case["labels"]
    # Same rule and the release's numbering (label i = i-th centre by delta * density): equal.
    exact = dpc_knn(x, clusters, k, count_self_as_neighbour=True, label_order="centre_score")
    assert exact.tolist() == released.tolist()
    # vidqa's default numbering: the same partition.
    first = dpc_knn(x, clusters, k, count_self_as_neighbour=True)
    assert canonical(first) == canonical(released)


def test_leaving_self_out_of_the_neighbours_changes_the_clusters():
    """The rule matters: without self, some fixture partitions differ from the release."""
    differ = 0
    for case in FIXTURES["dpc_knn"]:
        other = dpc_knn(case["x"], case["num_clusters"], case["k"], count_self_as_neighbour=False)
        differ += canonical(other) != canonical(case["labels"])
    assert differ >= 1


# -- temporal segment repair ------------------------------------------------------------------


@pytest.mark.parametrize("case", FIXTURES["refine"], ids=lambda c: "".join(map(str, c["labels"].tolist()))[:24])
def test_refined_labels_and_segment_lengths_match_refine_clusters(case):
    labels = case["labels"].tolist()
    assert make_clusters_contiguous(labels) == case["refined"].tolist()
    segments = labels_to_segments(labels)
    assert [end - start for start, end in segments] == case["lengths"].tolist()


def test_refine_fixtures_include_ties_and_multi_cluster_strays():
    """The hand-made cases the issue names are in the fixture, with the release's answers."""
    by_labels = {tuple(c["labels"].tolist()): c for c in FIXTURES["refine"]}
    three = by_labels[tuple([3, 0, 1, 2] + [3] * 10 + [0, 0])]
    assert three["lengths"].tolist() == [14, 2]
    tied = by_labels[(0, 0, 1, 1, 1, 0, 0)]
    assert tied["lengths"].tolist() == [2, 3, 2]  # both tied longest runs of cluster 0 kept


# -- stage 1: spatio-temporal merge -----------------------------------------------------------


def merge(case, row_order: str):
    """Run vidqa's stage 1 on the fixture's [T, P, C] tokens; (merged tokens, stage details)."""
    num_frames, rows, cols = case["grid"].tolist()
    tokens = case["tokens"]
    visual = grid_tokens(tokens.reshape(num_frames, rows * cols, -1), rows=rows, text_before=0)
    state = request_state()
    merged = SpatioTemporalMerge(row_order=row_order).apply(visual, state)
    return merged, state.details["prunevid"]


@pytest.mark.parametrize("case", FIXTURES["stage1"], ids=lambda c: "x".join(map(str, c["grid"].tolist())))
def test_stage1_merged_features_match_merge_frames_dynamic(case):
    merged, details = merge(case, "centre_score")
    segments = details["segments"]
    assert [end - start for start, end in segments] == case["window_sizes"].tolist()
    assert len(segments) >= 2  # the case exercises more than one segment
    static_per_segment = [int(merged.meta["static"][merged.meta["segment"] == s].sum()) for s in range(len(segments))]
    assert static_per_segment == case["static_sizes"].tolist()
    assert sum(case["static_sizes"].tolist()) > 0 and merged.meta["static"].sum() < len(merged)
    # the release's row order (static clusters by centre score, then each frame's): row for row
    assert merged.features.shape == case["features"].shape
    assert torch.allclose(merged.features, case["features"], atol=1e-5)


@pytest.mark.parametrize("case", FIXTURES["stage1"], ids=lambda c: "x".join(map(str, c["grid"].tolist())))
def test_stage1_first_appearance_order_is_a_permutation_within_groups(case):
    by_score, _ = merge(case, "centre_score")
    by_first, _ = merge(case, "first_appearance")
    groups = by_score.meta["segment"] * 1000 + torch.where(by_score.meta["static"], 0, by_score.frame + 1)
    first_groups = by_first.meta["segment"] * 1000 + torch.where(by_first.meta["static"], 0, by_first.frame + 1)
    assert torch.equal(groups, first_groups)  # groups in the same places
    for group in groups.unique():
        chosen = groups == group
        assert same_rows_up_to_order(by_first.features[chosen], by_score.features[chosen])
        # first_appearance: positions increase within the group
        assert torch.equal(by_first.seq_index[chosen], by_first.seq_index[chosen].sort().values)
    assert not torch.equal(by_first.features, by_score.features)  # the order does differ


def test_row_order_must_be_a_known_order():
    with pytest.raises(BadInput, match="row_order 'by_size'"):
        SpatioTemporalMerge(row_order="by_size")


# -- stage 2: question-attention selection ----------------------------------------------------


def stage2_context(case):
    attention = case["attention"]  # (heads, q, v)
    heads, queries, num_visual = attention.shape
    frame, segment, static = [], [], []
    start = 0
    for s, (static_size, dynamic_size, window) in enumerate(
        zip(case["static_sizes"].tolist(), case["dynamic_sizes"].tolist(), case["window_sizes"].tolist())
    ):
        frame += [start] * static_size
        static += [True] * static_size
        for w in range(window):
            frame += [start + w] * (dynamic_size // window)
            static += [False] * (dynamic_size // window)
        segment += [s] * (static_size + dynamic_size)
        start += window
    meta = {"frame": torch.tensor(frame), "segment": torch.tensor(segment), "static": torch.tensor(static)}
    n = num_visual + queries
    probs = torch.cat([attention, torch.full((heads, queries, queries), 0.01)], dim=-1)

    def attend(query_rows):
        assert len(query_rows) == queries
        return probs

    # at the release's alpha; the budget is the count it keeps (kept_at_ratio, checked below)
    context = layer_context(torch.zeros(1, n, 8), torch.arange(num_visual), attend, len(case["kept"]),
                            text_rows=torch.arange(num_visual, n), meta=meta, layer=3, ratio=float(case["alpha"]))
    return context, meta


@pytest.mark.parametrize("case", FIXTURES["stage2"], ids=lambda c: f"alpha{float(c['alpha'])}")
def test_stage2_kept_set_matches_process_attention(case):
    alpha = float(case["alpha"])
    context, meta = stage2_context(case)
    stage = QuestionAttentionSelect()
    keep = stage.select(context).keep
    assert keep.tolist() == case["kept"].tolist()
    # the --keep solver counts with the same rule
    assert stage.kept_at_ratio(len(meta["frame"]), len(meta["frame"]), meta, alpha) == len(case["kept"])


def test_stage2_truncates_fractional_quotas():
    case = FIXTURES["stage2"][0]  # one segment: 37 static tokens and 2 frames of 37 dynamic, alpha 0.4
    assert float(case["alpha"]) == 0.4 and case["static_sizes"].tolist() == [37]
    assert len(case["kept"]) == 3 * 14  # int(14.8) per group, not round(14.8) = 15


# -- SparseVLM recycling ----------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in FIXTURES["recycling"] if c["kind"] == "cluster"],
                         ids=lambda c: f"{c['x'].shape[0]}to{c['num_clusters']}")
def test_dpc_knn_means_match_cluster_and_merge(case):
    x, clusters = case["x"], case["num_clusters"]
    labels = dpc_knn(x, clusters, k=clusters, count_self_as_neighbour=True, label_order="centre_score")
    # the release divides by (count + 1e-6): equal to a plain mean within ~1e-6 relative
    assert torch.allclose(cluster_means(x, labels, clusters), case["merged"], atol=1e-5)


@pytest.mark.parametrize("case", [c for c in FIXTURES["recycling"] if c["kind"] == "recycle"],
                         ids=lambda c: f"m{c['x'].shape[0]}")
def test_recycle_pruned_matches_the_release_up_to_row_order(case):
    merged, representative = recycle_pruned(case["x"], case["scores"], count_self_as_neighbour=True)
    assert merged.shape[0] == case["num_clusters"]
    # vidqa orders recycled rows by first member (each goes to its best member's position)
    assert same_rows_up_to_order(merged, case["merged"])
    assert set(representative.tolist()) <= set(case["taken"].tolist())
