"""SparseVLM: raters, planted attention over three layers, recycling, budgets, CLI end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import ask_json, assert_one_line_error
from helpers import fake_adapter, request_state

from vidqa.errors import BadInput
from vidqa.pruning.core.decoder import DecoderPruning, LayerContext, Prefill
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.methods.sparsevlm import (
    RaterAttentionPrune,
    rater_source_rows,
    recycled_count,
    split_budget,
)
from vidqa.pruning.ops.cluster import dpc_knn
from vidqa.testing.builders import build_tiny_llava_onevision

QUESTION = "what happens in this video ?"
ALL_STAGES = ("prune1", "prune2", "prune3")


def every_stage(setting: str) -> list[str]:
    return [arg for name in ALL_STAGES for arg in ("-P", f"{name}.{setting}")]


@pytest.fixture(scope="module")
def deep_llava(tmp_path_factory):
    """8 LLM layers, so the three SparseVLM layers resolve to 1, 2, 4."""
    return build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny-llava-ov-8"), text_layers=8)


def ask(run_cli, model, video, *extra, max_new_tokens=6):
    args = ["ask", video, QUESTION, "--model", model, "--frames", "8", "--max-new-tokens", str(max_new_tokens)]
    return run_cli(args + list(extra))


# --- a simulated prefill through the real row bookkeeping (DecoderPruning._apply) -----------


class Sequence:
    """Rows of one prompt: `before` text rows, `visual` rows, then `text` rows (question +
    template); applies selections with the decoder's own `_apply`."""

    def __init__(self, embeddings: torch.Tensor, before: int, visual: int, head_dim: int = 4):
        n = embeddings.shape[1]
        is_visual = torch.zeros(n, dtype=torch.bool)
        is_visual[before:before + visual] = True
        grid = torch.arange(visual)
        table = torch.arange(n, dtype=torch.float32)[None, :, None].expand(1, n, head_dim)
        self.text_start = before + visual
        self.embeddings = embeddings
        self.hidden = embeddings.clone()
        self.decoder = DecoderPruning.__new__(DecoderPruning)
        self.decoder._prefill = Prefill(
            row_source=torch.arange(n), is_visual=is_visual,
            visual_meta={"frame": grid // 16, "row": grid % 16 // 4, "col": grid % 4},
            full_position_embeddings=(table, table), full_position_ids=torch.arange(n)[None],
        )
        self.state = request_state()

    @property
    def prefill(self):
        return self.decoder._prefill

    def context(self, layer: int, budget: int, attention) -> LayerContext:
        prefill = self.prefill
        return LayerContext(
            layer=layer, hidden=self.hidden, visual_rows=prefill.is_visual.nonzero().flatten(),
            text_rows=(prefill.row_source >= self.text_start).nonzero().flatten(),
            visual_meta=prefill.visual_meta, embeddings=self.embeddings, row_source=prefill.row_source,
            budget=budget, state=self.state, _attention=lambda rows: attention(self, rows),
        )

    def apply(self, context, selection) -> None:
        self.hidden = self.decoder._apply(selection, self.hidden, context.visual_rows)

    def visual_sources(self) -> torch.Tensor:
        return self.prefill.row_source[self.prefill.is_visual]


def planted_embeddings(before=3, visual=128, text=10, raters=(3, 7), hidden=16, seed=0):
    """Visual tokens share a direction u; the text tokens at `raters` are 6u, the rest small noise."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.zeros(hidden)
    u[0] = 1.0
    embeddings = 0.05 * torch.randn(before + visual + text, hidden, generator=generator)
    embeddings[before:before + visual] += u
    for index in raters:
        embeddings[before + visual + index] = 6 * u
    return embeddings[None]


def test_planted_raters_are_exactly_the_two_similar_text_tokens():
    before, visual, text = 3, 128, 10
    sequence = Sequence(planted_embeddings(before, visual, text, raters=(3, 7)), before, visual)
    context = sequence.context(layer=1, budget=visual, attention=None)
    expected = [before + visual + 3, before + visual + 7]
    assert rater_source_rows(context).tolist() == expected

    uniform = lambda seq, rows: torch.full((2, len(rows), seq.hidden.shape[1]), 1.0 / seq.hidden.shape[1])  # noqa: E731
    context = sequence.context(layer=1, budget=visual, attention=uniform)
    RaterAttentionPrune().select(context)
    details = sequence.state.details["sparsevlm"]
    assert details["raters"] == 2 and details["rater_rows"] == expected
    assert details["recycled"] == {"1": 0}  # budget = all tokens: nothing pruned, nothing recycled


def test_planted_attention_favourites_survive_all_three_layers():
    before, visual, text = 3, 128, 10
    rater_index = (3, 7)
    sequence = Sequence(planted_embeddings(before, visual, text, raters=rater_index), before, visual)
    rater_rows = {before + visual + i for i in rater_index}
    favourites = set(range(before + 5, before + 128, 10))  # 12 tokens spread over the clip
    decoys = set(range(before + 1, before + 91, 3)) - favourites  # 30 tokens only non-raters like

    def attention(seq, rows):
        """Raters look at the favourites, every other text row at the decoys (logit 8 vs ~0)."""
        sources = seq.prefill.row_source
        noise = torch.Generator().manual_seed(len(sources))
        logits = 0.1 * torch.randn(2, len(rows), len(sources), generator=noise)
        is_favourite = torch.tensor([int(s) in favourites for s in sources])
        is_decoy = torch.tensor([int(s) in decoys for s in sources])
        from_rater = torch.tensor([int(sources[r]) in rater_rows for r in rows])
        target = torch.where(from_rater[:, None], is_favourite[None], is_decoy[None])  # (r, n)
        return (logits + 8.0 * target).softmax(dim=-1)

    preset = load_preset("sparsevlm")
    stages = [stage for _, stage in preset.inside_llm]
    layers = [stage.resolved_layer(8) for stage in stages]
    assert layers == [1, 2, 4]
    num_in = visual
    for layer, stage in zip(layers, stages):
        budget = stage.kept_at_ratio(num_in, visual, {}, stage.ratio)
        context = sequence.context(layer, budget, attention)
        selection = stage.select(context)
        sources_before = sequence.visual_sources()
        sequence.apply(context, selection)
        assert torch.equal(selection.keep, selection.keep.unique())  # sorted, unique
        assert len(sequence.visual_sources()) == budget  # recycled tokens count towards the budget
        recycled = sequence.state.details["sparsevlm"]["recycled"][str(layer)]
        assert recycled == recycled_count(num_in - len(selection.keep)) and recycled > 0
        assert len(selection.inserted) == recycled
        # a recycled token sits after the kept ones, at the position of a pruned member
        pruned = set(sources_before.tolist()) - set(sources_before[selection.keep].tolist())
        assert set(sequence.visual_sources()[-recycled:].tolist()) <= pruned
        assert favourites <= set(sequence.visual_sources().tolist()), layer
        num_in = budget
    # the schedule at ratio 0.5 is the paper's: 576 -> 300 -> 200 -> 110, scaled to 128 tokens
    assert num_in == round(128 * 110 / 576)
    # the decoys only non-raters attend to are mostly gone: scoring used the raters' rows
    assert len(decoys & set(sequence.visual_sources().tolist())) < len(decoys) // 2
    positions = sequence.prefill.position_ids[0]
    assert torch.equal(positions, sequence.prefill.row_source)  # original positions


def test_rank_budget_keeps_rank_times_lambda():
    before, visual, text = 3, 64, 10
    sequence = Sequence(planted_embeddings(before, visual, text, raters=(3, 7)), before, visual)

    def rank_two(seq, rows):  # the two raters give two independent rows
        n = seq.hidden.shape[1]
        probs = torch.zeros(2, len(rows), n)
        probs[:, :, before:before + visual] = torch.rand(1, len(rows), visual, generator=torch.Generator().manual_seed(0))
        return probs / probs.sum(dim=-1, keepdim=True)

    stage = RaterAttentionPrune(budget="rank", rank_lambda=5.0)
    context = sequence.context(1, visual, rank_two)
    selection = stage.select(context)
    sequence.apply(context, selection)
    details = sequence.state.details["sparsevlm"]
    assert details["rank"] == {"1": 2}
    assert len(sequence.visual_sources()) == 10  # int(2 * 5.0), recycled included


# --- recycling ------------------------------------------------------------------------------


def test_recycled_tokens_are_the_means_of_their_clusters():
    torch.manual_seed(0)
    visual, hidden_size, budget = 40, 8, 25
    kept, recycled = split_budget(visual, budget, recycle=True)
    assert (kept, recycled) == (23, 2)  # 23 + int(17/10) + 1 = 25
    scores = torch.zeros(visual)
    hidden = torch.randn(visual, hidden_size)
    order = torch.randperm(visual)
    top, candidates = order[:kept], order[kept:kept + int(0.3 * (visual - kept)) + 1]  # 6 candidates
    scores[top] = 100 + torch.arange(kept, dtype=torch.float32)
    scores[candidates] = 50 + torch.arange(len(candidates), dtype=torch.float32)
    groups = [candidates[0::2], candidates[1::2]]  # two tight groups far apart
    centres = [torch.full((hidden_size,), 10.0), torch.full((hidden_size,), -10.0)]
    for group, centre in zip(groups, centres):
        hidden[group] = centre + 0.01 * torch.randn(len(group), hidden_size)

    selection, count = RaterAttentionPrune().prune(hidden, scores, budget)
    assert count == recycled == recycled_count(visual - kept) == int((visual - kept) / 10) + 1
    assert torch.equal(selection.keep, top.sort().values)
    expected = {}
    for group in groups:
        best = group[scores[group].argmax()]
        expected[int(best)] = hidden[group].mean(dim=0)
    assert sorted(selection.inserted_from.tolist()) == sorted(expected)
    for row, source in zip(selection.inserted, selection.inserted_from.tolist()):
        assert torch.allclose(row, expected[source], atol=1e-6)
    # the same clusters as DPC-KNN with k = cluster count on the candidates, in sequence order
    taken = candidates.sort().values
    labels = dpc_knn(hidden[taken], recycled, k=recycled)
    means = torch.stack([hidden[taken][labels == j].mean(dim=0) for j in range(recycled)])
    assert torch.allclose(selection.inserted, means, atol=1e-6)


def test_without_recycling_exactly_the_budget_is_kept():
    scores = torch.arange(40, dtype=torch.float32).flip(0)
    selection, count = RaterAttentionPrune(recycle=False).prune(torch.randn(40, 4), scores, 25)
    assert count == 0 and selection.inserted is None
    assert selection.keep.tolist() == list(range(25))


def test_split_budget_always_meets_the_budget():
    for num_in in range(0, 160):
        for budget in range(0, num_in + 3):
            kept, recycled = split_budget(num_in, budget, recycle=True)
            assert kept + recycled == min(budget, num_in)
            if recycled:
                assert recycled == recycled_count(num_in - kept)
                # the most real tokens possible: one more kept would overshoot
                assert kept + 1 + recycled_count(num_in - kept - 1) > budget
            elif budget < num_in:
                assert budget < recycled_count(num_in)


# --- layers and budgets without a model ----------------------------------------------------


@pytest.mark.parametrize("num_layers,expected", [(4, [1, 2, 3]), (8, [1, 2, 4]), (28, [2, 5, 13]), (32, [2, 6, 15])])
def test_layers_scale_with_depth_and_stay_distinct(num_layers, expected):
    preset = load_preset("sparsevlm")
    assert [stage.resolved_layer(num_layers) for _, stage in preset.inside_llm] == expected


def test_too_shallow_model_and_rank_with_keep_are_refused():
    with pytest.raises(BadInput, match="same layer"):
        build_pruner(load_preset("sparsevlm"), fake_adapter(3))
    rank = load_preset("sparsevlm", [arg for arg in every_stage("budget=rank") if arg != "-P"])
    with pytest.raises(BadInput, match="rank"):
        build_pruner(rank, fake_adapter(8), keep=0.3)
    with pytest.raises(BadInput, match="schedule, rank"):
        load_preset("sparsevlm", ["prune1.budget=ranked"])


def test_default_schedule_is_the_papers():
    preset = load_preset("sparsevlm")
    counts, current = [], 576
    for _, stage in preset.inside_llm:
        current = stage.kept_at_ratio(current, 576, {}, stage.ratio)
        counts.append(current)
    assert counts == [300, 200, 110]
    stage = preset.inside_llm[0][1]
    assert stage.kept_at_ratio(576, 576, {}, 1.0) == 576 and stage.kept_at_ratio(576, 576, {}, 0.0) == 0


# --- through the CLI on the 8-layer tiny model ---------------------------------------------


def test_identity_settings_match_none_token_for_token(run_cli, deep_llava, square_video):
    reference = ask_json(run_cli, deep_llava, square_video)
    for extra in (["--keep", "1"], every_stage("ratio=1")):
        record = ask_json(run_cli, deep_llava, square_video, "--prune", "sparsevlm", *extra)
        tokens = record["stats"]["tokens"]
        assert tokens["visual_tokens_per_layer"] == [128] * 8 and tokens["layer_avg_retention"] == 1.0
        assert record["pruning"]["sparsevlm"]["raters"] > 0  # the stages ran
        assert record["pruning"]["sparsevlm"]["recycled"] == {"1": 0, "2": 0, "4": 0}
        assert record["answer"] == reference["answer"]
        assert tokens["generated_tokens"] == reference["stats"]["tokens"]["generated_tokens"]


def test_default_runs_the_paper_schedule(run_cli, deep_llava, square_video):
    record = ask_json(run_cli, deep_llava, square_video, "--prune", "sparsevlm", max_new_tokens=2)
    per_layer = record["stats"]["tokens"]["visual_tokens_per_layer"]
    b1, b2, b3 = (round(128 * k / 576) for k in (300, 200, 110))
    assert per_layer == [128, b1, b2, b2, b3, b3, b3, b3]
    details = record["pruning"]["sparsevlm"]
    assert details["raters"] >= 1 and len(details["rater_rows"]) == details["raters"]
    entering = {"1": 128, "2": b1, "4": b2}
    leaving = {"1": b1, "2": b2, "4": b3}
    for layer, recycled in details["recycled"].items():
        kept = leaving[layer] - recycled
        assert recycled == int((entering[layer] - kept) / 10) + 1


@pytest.mark.parametrize("keep", [0.3, 0.2])
def test_keep_is_the_layer_averaged_retention(run_cli, deep_llava, square_video, keep):
    record = ask_json(run_cli, deep_llava, square_video, "--prune", "sparsevlm", "--keep", str(keep), max_new_tokens=2)
    tokens = record["stats"]["tokens"]
    assert abs(tokens["layer_avg_retention"] - keep) <= 1 / tokens["visual_tokens_before"]
    per_layer = tokens["visual_tokens_per_layer"]
    budgets = record["pruning"]["budget"]["layers"]
    assert {layer: per_layer[int(layer)] for layer in budgets} == budgets  # select met kept_at_ratio
    assert per_layer[0] > per_layer[1] > per_layer[2] == per_layer[3] > per_layer[4]


def test_end_to_end_keep_0_3(run_cli, deep_llava, square_video):
    result = ask(run_cli, deep_llava, square_video, "--prune", "sparsevlm", "--keep", "0.3", "--stats")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert "preset sparsevlm" in result.stderr


def test_rank_mode_runs_and_refuses_keep(run_cli, deep_llava, square_video):
    record = ask_json(run_cli, deep_llava, square_video, "--prune", "sparsevlm", *every_stage("budget=rank"),
                      *every_stage("rank_lambda=2"), max_new_tokens=2)
    details = record["pruning"]["sparsevlm"]
    per_layer = record["stats"]["tokens"]["visual_tokens_per_layer"]
    assert set(details["rank"]) == {"1", "2", "4"}
    assert per_layer[1] == min(128, 2 * details["rank"]["1"])
    refused = ask(run_cli, deep_llava, square_video, "--prune", "sparsevlm", *every_stage("budget=rank"), "--keep", "0.3")
    assert_one_line_error(refused, "rank", "--keep")
