"""AdaTP preset: planted global (start, end and both ends of the video) and local
(same-position) attention bias,
segmentation, parity with `none` at identity settings, and the --keep budget end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import ask_json
from helpers import grid_tokens, layer_context, request_state

from vidqa.pruning.core.presets import load_preset
from vidqa.pruning.methods.adatp import DebiasedSegmentSelect, SegmentDedup
from vidqa.pruning.methods.fastv import LastTokenAttention
from vidqa.pruning.ops.budgets import adatp_segment_budgets

FRAMES, ROWS, COLS = 8, 4, 4
PER_FRAME = ROWS * COLS
NUM_TEXT = 6
HIDDEN = 64
QUESTION = "what happens in this video ?"


def scored_context(meta: dict, visual_scores: torch.Tensor, budget: int, hidden: torch.Tensor | None = None):
    """A LayerContext for v visual rows followed by NUM_TEXT text rows; every query row's
    attention over the visual rows is proportional to `visual_scores` (same for all heads)."""
    num_visual = len(visual_scores)
    n = num_visual + NUM_TEXT
    if hidden is None:
        hidden = torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(0))
    weights = torch.cat([visual_scores.double(), torch.full((NUM_TEXT,), float(visual_scores.mean()))])
    probs = (weights / weights.sum()).float()

    def attention(query_rows):
        return probs.expand(4, len(query_rows), n).clone()  # (heads, q, n)

    return layer_context(hidden, torch.arange(num_visual), attention, budget, text_rows=torch.arange(num_visual, n),
                         meta=meta)


def hidden_with_relevance(relevance_per_token: torch.Tensor) -> torch.Tensor:
    """(1, v + NUM_TEXT, D) hidden states: text rows are e0; visual row i has cosine
    relevance_per_token[i] with e0 exactly (rest of its direction random, orthogonal to e0)."""
    generator = torch.Generator().manual_seed(1)
    num_visual = len(relevance_per_token)
    other = torch.randn(num_visual, HIDDEN, generator=generator)
    other[:, 0] = 0
    other = torch.nn.functional.normalize(other, dim=-1)
    r = relevance_per_token[:, None]
    visual = r * torch.eye(HIDDEN)[0] + (1 - r**2).sqrt() * other
    text = torch.eye(HIDDEN)[0].expand(NUM_TEXT, HIDDEN)
    return torch.cat([visual, text])[None]


# --- global bias: at the end, at the start, at both ends of the visual sequence ------------------

# Attention weight per frame: grows steeply towards the biased end(s). The paper finds the top
# tokens piling up at both ends of the visual sequence; the end is the larger pile.
FRAME_BIAS = {
    "end": lambda frame: torch.exp(2.0 * frame),
    "start": lambda frame: torch.exp(2.0 * (FRAMES - 1 - frame)),
    "both_ends": lambda frame: torch.exp(2.0 * (frame - (FRAMES - 1) / 2).abs()),
}
# Where FastV's 32 picks (2 frames' worth) land under each bias.
FASTV_FRAMES = {"end": {FRAMES - 2, FRAMES - 1}, "start": {0, 1}, "both_ends": {0, FRAMES - 1}}


@pytest.mark.parametrize("bias", list(FRAME_BIAS))
@pytest.mark.parametrize("segment_relevance", [[0.2, 0.2, 0.2, 0.2], [0.1, 0.3, 0.1, 0.1]], ids=["equal", "skewed"])
def test_positional_bias_fastv_piles_up_adatp_spreads_by_segment_budgets(segment_relevance, bias):
    tokens = FRAMES * PER_FRAME
    frame = torch.arange(FRAMES).repeat_interleave(PER_FRAME)
    segment = frame // 2  # 4 segments of 2 frames
    noise = 0.5 + torch.rand(tokens, generator=torch.Generator().manual_seed(2))  # in [0.5, 1.5)
    scores = FRAME_BIAS[bias](frame.double()) * noise
    meta = {"frame": frame, "row": torch.zeros(tokens), "col": torch.zeros(tokens), "segment": segment}
    budget = 32

    fastv = LastTokenAttention().select(scored_context(meta, scores, budget)).keep
    assert len(fastv) == budget
    assert set(frame[fastv].tolist()) == FASTV_FRAMES[bias]  # all of FastV's picks: the biased frames

    relevance = torch.tensor(segment_relevance)
    context = scored_context(meta, scores, budget, hidden=hidden_with_relevance(relevance[segment]))
    adatp = DebiasedSegmentSelect().select(context).keep
    details = context.state.details["adatp"]
    expected_budgets = adatp_segment_budgets([32] * 4, relevance, budget, mix=0.5, temperature=0.1)
    assert details["segment_budgets"] == expected_budgets and sum(expected_budgets) == budget
    assert details["segment_relevance"] == pytest.approx(segment_relevance, abs=1e-5)
    assert torch.bincount(segment[adatp], minlength=4).tolist() == expected_budgets
    assert all(b > 0 for b in expected_budgets)
    if segment_relevance[0] == segment_relevance[1]:
        assert expected_budgets == [8, 8, 8, 8]
    else:
        assert expected_budgets[1] == max(expected_budgets) and expected_budgets[3] < budget // 2
    assert torch.equal(adatp, adatp.sort().values) and len(adatp.unique()) == budget
    # within a segment, the picks are the best by score / own-frame mean (the positional trend is gone)
    debiased = noise / noise.view(FRAMES, PER_FRAME).mean(dim=1).repeat_interleave(PER_FRAME)
    for s, quota in enumerate(expected_budgets):
        members = (segment == s).nonzero().flatten()
        best = members[torch.argsort(debiased[members], descending=True)[:quota]].sort().values
        assert torch.equal(adatp[segment[adatp] == s], best)
    assert set(frame[adatp].tolist()) == set(range(FRAMES))  # both frames of every segment


# --- local (same-position) bias and segmentation -------------------------------------------------


def scene_features(scene_of_frame: list[int], planted_position: int | None = None, seed: int = 0) -> torch.Tensor:
    """(T, PER_FRAME, HIDDEN) per-frame tokens whose frame mean is the same within a scene and different across scenes,
    while tokens at one position differ between adjacent frames (cosine well below 0.9): each
    frame holds a fixed zero-mean set of noise vectors, rolled by one position per frame, on top of
    the scene's vector. `planted_position` holds one identical vector in every frame."""
    generator = torch.Generator().manual_seed(seed)
    scenes = torch.randn(max(scene_of_frame) + 1, HIDDEN, generator=generator)
    positions = [p for p in range(PER_FRAME) if p != planted_position]
    noise = 3.0 * torch.randn(len(positions), HIDDEN, generator=generator)
    noise -= noise.mean(dim=0)
    planted = torch.randn(HIDDEN, generator=generator)
    frames = []
    for t, scene in enumerate(scene_of_frame):
        frame = torch.empty(PER_FRAME, HIDDEN)
        frame[positions] = scenes[scene] + noise.roll(t, dims=0)
        if planted_position is not None:
            frame[planted_position] = planted
        frames.append(frame)
    return torch.stack(frames)


def test_three_scenes_give_three_segments():
    scene_of_frame = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    tokens = grid_tokens(scene_features(scene_of_frame))
    state = request_state()
    out = SegmentDedup().apply(tokens, state)
    assert state.details["adatp"] == {"segments": [[0, 3], [3, 6], [6, 9]], "dedup_removed": 0}
    assert torch.equal(out.meta["segment"], torch.tensor(scene_of_frame).repeat_interleave(PER_FRAME))
    assert torch.equal(out.features, tokens.features) and torch.equal(out.seq_index, tokens.seq_index)

    capped = request_state()
    SegmentDedup(max_segments=2).apply(tokens, capped)
    segments = capped.details["adatp"]["segments"]
    assert len(segments) == 2 and segments[0][1] in (3, 6)


def test_same_position_bias_is_kept_once_per_segment_not_once_per_frame():
    planted = 5
    scene_of_frame = [0, 0, 0, 0, 1, 1, 1, 1]
    tokens = grid_tokens(scene_features(scene_of_frame, planted_position=planted))
    state = request_state()
    out = SegmentDedup().apply(tokens, state)
    assert state.details["adatp"] == {"segments": [[0, 4], [4, 8]], "dedup_removed": 6}
    position = out.row * COLS + out.col
    at_planted = position == planted
    assert out.frame[at_planted].tolist() == [0, 4]  # once per segment, at its first frame
    assert torch.equal(out.seq_index[at_planted], 3 + torch.tensor([0, 4]) * PER_FRAME + planted)  # earliest position
    assert torch.allclose(out.features[at_planted], tokens.features[planted])  # running mean of identical rows
    expected = [FRAMES if p != planted else 2 for p in range(PER_FRAME)]
    assert torch.bincount(position, minlength=PER_FRAME).tolist() == expected

    # attention that favours the planted position in every frame: FastV on the full grid spends a
    # token on it in every frame; AdaTP sees it once per segment
    def planted_scores(position_of_token):
        noise = 0.5 + torch.rand(len(position_of_token), generator=torch.Generator().manual_seed(3))
        return torch.where(position_of_token == planted, 50.0, noise)

    full_meta = {"frame": tokens.frame, "row": tokens.row, "col": tokens.col}
    full_position = tokens.row * COLS + tokens.col
    fastv = LastTokenAttention().select(scored_context(full_meta, planted_scores(full_position), 16)).keep
    assert int((full_position[fastv] == planted).sum()) == FRAMES
    meta = {"frame": out.frame, "row": out.row, "col": out.col, **out.meta}
    adatp = DebiasedSegmentSelect().select(scored_context(meta, planted_scores(position), 16)).keep
    assert len(adatp) == 16 and int((position[adatp] == planted).sum()) == 2


def test_preset_loads_with_its_parameters():
    preset = load_preset("adatp", ["tau_l=1.01", "max_segments=4"])
    assert "reconstruction" in preset.description.lower()
    params = preset.parameters()
    assert params["dedup"] == {"tau_s": 0.9, "max_segments": 4, "tau_l": 1.01}
    assert params["select"] == {"layer": 2, "ratio": 0.25, "mix": 0.5, "temperature": 0.1}
    assert [stage.where for _, stage in preset.stages] == ["before LLM", "inside LLM"]


# --- through the CLI --------------------------------------------------------------------------


def test_identity_settings_match_none(run_cli, tiny_llava, square_video):
    vanilla = ask_json(run_cli, tiny_llava, square_video)
    same = ask_json(run_cli, tiny_llava, square_video, "--prune", "adatp", "-P", "tau_l=1.01", "--keep", "1")
    assert same["answer"] == vanilla["answer"] and same["answer"]
    assert same["stats"]["tokens"]["visual_tokens_per_layer"] == [128] * 4
    assert same["pruning"]["adatp"]["dedup_removed"] == 0


def test_keep_is_met_over_the_original_token_count(run_cli, tiny_llava, square_video):
    # no dedup, cut at every frame (4 segments): the in-LLM budget meets --keep
    record = ask_json(run_cli, tiny_llava, square_video, "--prune", "adatp", "--keep", "0.3",
                      "-P", "tau_l=1.01", "-P", "tau_s=1.01", "-P", "max_segments=4")
    tokens, details = record["stats"]["tokens"], record["pruning"]
    per_layer, before = tokens["visual_tokens_per_layer"], tokens["visual_tokens_before"]
    assert abs(sum(per_layer) - 0.3 * len(per_layer) * before) <= len(per_layer)  # one token per layer
    assert per_layer[0] == before and per_layer[1] < before  # K = round(2*4/32) -> 1
    assert len(details["adatp"]["segments"]) == 4
    assert sum(details["adatp"]["segment_budgets"]) == details["budget"]["layers"]["1"] == per_layer[1]
    assert record["notes"] == []

    # defaults: dedup removes what it finds; retention is layer-averaged over the original count
    record = ask_json(run_cli, tiny_llava, square_video, "--prune", "adatp", "--keep", "0.3")
    tokens, details = record["stats"]["tokens"], record["pruning"]["adatp"]
    per_layer = tokens["visual_tokens_per_layer"]
    left = before - details["dedup_removed"]
    assert per_layer[0] == left == tokens["visual_tokens_per_stage"]["dedup"]
    assert sum(details["segment_budgets"]) == per_layer[1]
    if left <= 0.3 * before:  # dedup alone already goes below --keep: nothing more is dropped, and it says so
        assert per_layer == [left] * 4
        assert any("nothing more is dropped" in note for note in record["notes"])
        assert details["in_llm_dropped"] == 0 and "nothing is dropped" in details["note"]
    else:
        assert abs(sum(per_layer) - 0.3 * len(per_layer) * before) <= len(per_layer)
