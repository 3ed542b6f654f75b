"""EVS and VidCom2: the released code's kept sets, planted signals, --keep, every family, the CLI.

The reference fixtures in tests/fixtures/{evs,vidcom2}/ were made by the scripts beside them,
which run vLLM's `compute_retention_mask` and the authors' VidCom2 functions on seeded inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_FRAMES
from helpers import answer_clip, grid_tokens, numbered_cases, request_state, run_stage

from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.methods.evs import TemporalChangeSelect, evs_keep
from vidqa.pruning.methods.vidcom2 import FrameUniquenessSelect, vidcom2_keep

FIXTURES = Path(__file__).parent / "fixtures"
QUESTION = "what happens in this video ?"
IDENTITY = {"evs": ["pruning_rate=0"], "vidcom2": ["ratio=1"]}


def load_cases(name: str) -> list[dict]:
    return numbered_cases(FIXTURES / name / f"{name}_reference.pt")


# --- the released code's outputs ------------------------------------------------------------


@pytest.mark.parametrize("case", load_cases("evs"), ids=lambda case: f"q{float(case['q'])}")
def test_evs_reproduces_vllms_retention_mask(case):
    frames, rows, cols = case["grid"].tolist()
    grid = case["features"].view(frames, rows * cols, -1)
    assert torch.equal(evs_keep(grid, float(case["q"])), case["kept"])
    assert len(case["kept"]) == int(case["count"])
    out, _ = run_stage(TemporalChangeSelect(pruning_rate=float(case["q"])), grid_tokens(grid, rows=1, text_before=10))
    assert torch.equal(out.seq_index, case["kept"] + 10)  # the kept rows, in order, with their positions


@pytest.mark.parametrize("case", load_cases("vidcom2"), ids=lambda case: f"base{float(case['base'])}")
def test_vidcom2_reproduces_the_released_budgets_and_kept_sets(case):
    frames, per_frame = case["grid"].tolist()
    grid = case["features"].view(frames, per_frame, -1)
    kept, budgets = vidcom2_keep(grid, float(case["base"]))
    assert torch.equal(budgets, case["budgets"])
    assert torch.equal(kept, case["kept"])
    out, state = run_stage(FrameUniquenessSelect(ratio=float(case["base"])), grid_tokens(grid, rows=1, text_before=10))
    assert torch.equal(out.seq_index, case["kept"] + 10)
    assert state.details["vidcom2"]["frame_budgets"] == case["budgets"].tolist()


# --- planted signals ------------------------------------------------------------------------


def test_evs_drops_the_static_half_of_every_frame_first():
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(8, 16, 24, generator=generator)
    grid[:, :8] = grid[:1, :8] + 0.01 * torch.randn(8, 8, 24, generator=generator)  # positions 0-7 barely move
    tokens = grid_tokens(grid, rows=1, text_before=10)
    out, _ = run_stage(TemporalChangeSelect(pruning_rate=0.5), tokens)  # 64 = frame 0 + 48 more
    later = out.col[out.frame > 0]
    assert len(out) == 64 and (out.frame == 0).sum() == 16
    assert len(later) == 48 and bool((later >= 8).all())  # only moving positions after frame 0
    out, _ = run_stage(TemporalChangeSelect(pruning_rate=0.25), tokens)  # 96 = 16 + all 56 moving + 24 static
    assert (out.col[out.frame > 0] >= 8).sum() == 56


def test_static_half_of_the_clip_gets_the_least():
    generator = torch.Generator().manual_seed(1)
    grid = torch.randn(8, 16, 32, generator=generator)
    grid[5:] = grid[4]  # frames 4-7: one still picture
    evs, _ = run_stage(TemporalChangeSelect(pruning_rate=0.5), grid_tokens(grid, rows=1, text_before=10))
    assert not bool((evs.frame >= 5).any())  # nothing of the repeated frames while anything moves
    _, state = run_stage(FrameUniquenessSelect(ratio=0.25), grid_tokens(grid, rows=1, text_before=10))
    budgets = state.details["vidcom2"]["frame_budgets"]
    assert max(budgets[4:]) <= min(budgets[:4]) and sum(budgets[4:]) < sum(budgets[:4])
    assert max(range(8), key=budgets.__getitem__) < 4


@pytest.mark.parametrize("odd_frame", [0, 3, 6])
def test_vidcom2_gives_the_frame_unlike_all_others_the_largest_budget(odd_frame):
    generator = torch.Generator().manual_seed(odd_frame)
    scene = torch.randn(16, 32, generator=generator)
    grid = scene + 0.2 * torch.randn(7, 16, 32, generator=generator)
    grid = torch.cat([grid[:odd_frame], torch.randn(1, 16, 32, generator=generator) * 2, grid[odd_frame:]])
    out, state = run_stage(FrameUniquenessSelect(ratio=0.25), grid_tokens(grid, rows=1, text_before=10))
    budgets = state.details["vidcom2"]["frame_budgets"]
    others = budgets[:odd_frame] + budgets[odd_frame + 1:]
    assert budgets[odd_frame] > max(others)
    assert (out.frame == odd_frame).sum() == budgets[odd_frame] and len(out) == sum(budgets)


# --- every family ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(IDENTITY))
@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_identity_settings_match_none(family_adapters, family_clips, family, preset):
    adapter, clip = family_adapters[family], family_clips[family]
    reference = answer_clip(adapter, clip)
    for pruner in (build_pruner(load_preset(preset, IDENTITY[preset]), adapter),
                   build_pruner(load_preset(preset), adapter, keep=1.0)):
        pruned = answer_clip(adapter, clip, pruner)
        assert pruned.stats.tokens.layer_avg_retention == 1.0
        assert pruned.text == reference.text
        assert pruned.stats.tokens.generated_tokens == reference.stats.tokens.generated_tokens


@pytest.mark.parametrize("keep", [0.25, 0.5])
@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_keep_sets_the_retained_fraction(family_adapters, family_clips, family, keep):
    adapter, clip = family_adapters[family], family_clips[family]
    evs = answer_clip(adapter, clip, build_pruner(load_preset("evs"), adapter, keep=keep))
    total = evs.stats.tokens.visual_tokens_before
    assert evs.stats.tokens.visual_tokens_after == int(total * keep)  # vLLM: int(T*P*(1 - q)), q = 1 - keep
    assert evs.details["evs"]["pruning_rate"] == pytest.approx(1 - keep)
    vidcom2 = answer_clip(adapter, clip, build_pruner(load_preset("vidcom2"), adapter, keep=keep))
    budgets = vidcom2.details["vidcom2"]["frame_budgets"]
    assert vidcom2.stats.tokens.visual_tokens_after == sum(budgets)
    assert abs(sum(budgets) - keep * total) <= len(budgets) / 2  # per-frame rounding only, below the cap
    assert vidcom2.details["budget"] == {"stage": "select", "ratio": keep, "keep": keep}


def test_flops_target_sets_a_pre_llm_budget(family_adapters, family_clips):
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    answer = answer_clip(adapter, clip, build_pruner(load_preset("evs"), adapter, flops=0.4))
    flops, tokens = answer.stats.flops, answer.stats.tokens
    per_token = flops.paper_vanilla_macs / tokens.visual_tokens_before
    assert abs(flops.paper_fraction - 0.4) * flops.paper_vanilla_macs <= 4 * per_token * 2


def test_positions_follow_each_methods_code(family_adapters, family_clips):
    """EVS keeps original 1-D positions; VidCom2 renumbers the shortened prompt (its LLaVA code)."""
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    for preset, compact in (("evs", False), ("vidcom2", True)):
        pruner = build_pruner(load_preset(preset), adapter)
        prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
        state = request_state(adapter, prompt, clip, QUESTION)
        tokens = adapter.encode_video(prompt)
        state.record_stage("vision encoder", len(tokens))
        kept = pruner.before_llm(tokens, state)
        inputs = adapter.generation_inputs(prompt, kept, positions=pruner.positions)
        positions = inputs.kwargs["position_ids"][0].cpu()
        assert len(kept) < len(tokens)
        if compact:
            assert torch.equal(positions, torch.arange(len(positions)))
        else:
            assert torch.equal(positions, inputs.seq_index)


def test_evs_floor_of_one_frame_is_reported(family_adapters, family_clips):
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    answer = answer_clip(adapter, clip, build_pruner(load_preset("evs"), adapter, keep=0.05))
    assert answer.stats.tokens.visual_tokens_after == 16  # the first frame, whole
    assert any("first frame" in note for note in answer.notes)


# --- CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["evs", "vidcom2"])
@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_each_family_end_to_end(run_cli, family_checkpoints, square_video, family, preset):
    result = run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints[family], "--frames", FAMILY_FRAMES[family],
                      "--max-new-tokens", "2", "--prune", preset, "--keep", "0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    tokens = record["stats"]["tokens"]
    assert record["preset"] == preset and tokens["visual_tokens_after"] < tokens["visual_tokens_before"]
    assert abs(tokens["layer_avg_retention"] - 0.5) <= FAMILY_FRAMES[family] / 2 / tokens["visual_tokens_before"]
    assert record["pruning"]["budget"]["keep"] == 0.5


def test_presets_are_listed_with_references(run_cli):
    listing = {row["name"]: row for row in json.loads(run_cli(["presets", "--json"]).stdout)}
    assert listing["evs"]["where"] == listing["vidcom2"]["where"] == "before LLM"
    assert "vllm" in listing["evs"]["reference"] and "arXiv:2510.14624" in listing["evs"]["reference"]
    assert "EMNLP 2025" in listing["vidcom2"]["reference"] and "xuyang-liu16/VidCom2" in listing["vidcom2"]["reference"]
    assert listing["evs"]["default_keep"] == listing["vidcom2"]["default_keep"] == 0.25
    shown = json.loads(run_cli(["presets", "show", "evs", "-P", "pruning_rate=0.6", "--json"]).stdout)
    assert shown["stages"][0]["pruning_rate"] == 0.6 and "1 - R" in shown["keep"]


def test_keep_without_a_budget_to_set_is_one_line(run_cli, tiny_llava, square_video, tmp_path):
    from conftest import assert_one_line_error

    merge_only = tmp_path / "merge_only.yaml"  # a data-dependent pre-LLM stage: nothing for --keep to set
    merge_only.write_text("name: merge_only\ndescription: dedup only\nstages:\n  - type: segment_dedup\n")
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8",
                      "--prune", str(merge_only), "--keep", "0.5"])
    assert_one_line_error(result, "merge_only", "no budget for --keep/--flops")
