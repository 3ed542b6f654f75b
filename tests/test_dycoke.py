"""DyCoke: the released merge's kept sets, planted signals (merge and decode), --keep, every
family at identity settings, decode-time KV selection, the CLI.

tests/fixtures/dycoke/dycoke_reference.pt was made by the script beside it, which runs the
authors' `dycole_ttm` (KD-TAO/DyCoke) on seeded inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_FRAMES
from helpers import answer_clip, grid_tokens, numbered_cases, run_stage

from vidqa.models import load_model
from vidqa.pruning.core.decode_kv import DecodeKVSelection, decode_attention, top_visual_entries
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.methods.dycoke import WindowTemporalMerge, dycoke_keep, window_plan

FIXTURES = Path(__file__).parent / "fixtures" / "dycoke"
QUESTION = "what happens in this video ?"
IDENTITY = ["merge_ratio=0", "decode_keep=1"]


def load_cases() -> list[dict]:
    return numbered_cases(FIXTURES / "dycoke_reference.pt")


# --- the released code's outputs ------------------------------------------------------------


@pytest.mark.parametrize("case", load_cases(), ids=lambda case: f"T{int(case['frames'])}-K{float(case['ratio'])}")
def test_merge_keeps_the_released_functions_tokens(case):
    features, frames, per_frame = case["features"], int(case["frames"]), int(case["per_frame"])
    ratio = float(case["ratio"])
    # which input row each output row of the released function is (features are distinct)
    released = torch.cdist(case["output"].double(), features.double()).argmin(dim=1)
    assert torch.equal(features[released], case["output"])
    kept = dycoke_keep(features.view(frames, per_frame, -1), int((1 - ratio) * per_frame))
    assert torch.equal(kept, released.sort().values)  # the same set; vidqa keeps grid order
    tokens = grid_tokens(features.view(frames, per_frame, -1), rows=1, text_before=10)
    out, state = run_stage(WindowTemporalMerge(merge_ratio=ratio), tokens)
    assert torch.equal(out.seq_index, kept + 10)
    assert state.details["dycoke"]["merge"]["kept"] == len(case["output"])


def test_window_plan_follows_the_released_loops():
    assert window_plan(8) == [(1, 0), (2, 0), (3, 2), (5, 4), (7, 6)]  # the last window's 3rd frame stays whole
    assert window_plan(12) == [(1, 0), (2, 0), (3, 2), (5, 4), (6, 4), (7, 6), (9, 8), (11, 10)]
    assert window_plan(5) == [(1, 0), (2, 0), (3, 2)]  # an unpaired last frame (4) stays whole


# --- planted signals ------------------------------------------------------------------------


def test_a_static_window_keeps_only_what_moved():
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(8, 16, 24, generator=generator)
    grid[1:4] = grid[0] + 0.001 * torch.randn(3, 16, 24, generator=generator)  # window 0 is still...
    moving = torch.tensor([2, 5, 11, 14])
    grid[1:4, moving] = torch.randn(3, 4, 24, generator=generator)  # ...except 4 positions
    out, _ = run_stage(WindowTemporalMerge(merge_ratio=0.75), grid_tokens(grid, rows=1, text_before=10))  # keep 4 of 16
    for frame in (1, 2, 3):
        assert torch.equal(out.col[out.frame == frame], moving)
    assert (out.frame == 0).sum() == 16


def test_decode_scores_match_eager_attention(tiny_llava):
    adapter = load_model(str(tiny_llava), device="cpu", dtype="float32")
    attention = adapter.decoder_layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 1, adapter.text_config.hidden_size, generator=generator)
    keys = torch.randn(1, attention.config.num_key_value_heads, 9, attention.head_dim, generator=generator)
    cos, sin = torch.ones(1, 1, attention.head_dim), torch.zeros(1, 1, attention.head_dim)  # phase 0
    probabilities = decode_attention(attention, hidden, (cos, sin), keys, adapter.apply_rotary)
    queries = attention.q_proj(hidden).view(1, -1, attention.head_dim)[0]  # (heads, d)
    groups = queries.shape[0] // keys.shape[1]
    expected = torch.stack([(keys[0, head // groups] @ queries[head]) * attention.scaling
                            for head in range(queries.shape[0])]).softmax(-1)
    assert torch.allclose(probabilities, expected, atol=1e-6)
    # a planted key along every head's query wins the selection among the visual rows
    planted = torch.zeros_like(probabilities)
    planted[:, 5] = 1.0
    visual = torch.tensor([2, 3, 4, 5, 6])
    assert top_visual_entries(probabilities + planted, visual, 1).tolist() == [5]
    assert top_visual_entries(probabilities, visual, 5).tolist() == visual.tolist()


# --- every family ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_identity_settings_match_none(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    reference = answer_clip(adapter, clip, max_new_tokens=8)
    for pruner in (build_pruner(load_preset("dycoke", IDENTITY), adapter),
                   build_pruner(load_preset("dycoke", ["decode_keep=1"]), adapter, keep=1.0)):
        pruned = answer_clip(adapter, clip, pruner, max_new_tokens=8)
        assert pruned.stats.tokens.layer_avg_retention == 1.0
        assert pruned.text == reference.text
        assert pruned.stats.tokens.generated_tokens == reference.stats.tokens.generated_tokens
        decode = pruned.details["dycoke"]["decode"]
        assert decode["attended_per_step"] == decode["visual_kv_entries"] == len(reference_visual(adapter, clip))
        assert decode["decode_steps"] == pruned.stats.tokens.generated_tokens - 1
        assert decode["restricted_steps"] == 0  # keep 1 gathers nothing


def reference_visual(adapter, clip):
    return adapter.build_prompt(clip.frames, clip.timestamps, QUESTION).visual_index


@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_defaults_merge_and_attend_a_fifth_at_each_decode_step(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    answer = answer_clip(adapter, clip, build_pruner(load_preset("dycoke"), adapter), max_new_tokens=8)
    merged = answer.stats.tokens.visual_tokens_after
    frames, rows, cols = adapter.encode_video(adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)).grid
    assert merged == len(dycoke_keep(torch.zeros(frames, rows * cols, 1) + torch.arange(rows * cols)[None, :, None],
                                     int(0.3 * rows * cols)))
    decode = answer.details["dycoke"]["decode"]
    assert decode["visual_kv_entries"] == merged and decode["attended_per_step"] == int(0.2 * merged)
    assert decode["decode_steps"] == decode["restricted_steps"] == answer.stats.tokens.generated_tokens - 1


@pytest.mark.parametrize("keep", [0.5, 0.75])
def test_keep_sets_the_prefill_retention(family_adapters, family_clips, keep):
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    answer = answer_clip(adapter, clip, build_pruner(load_preset("dycoke"), adapter, keep=keep), max_new_tokens=8)
    tokens = answer.stats.tokens
    assert abs(tokens.visual_tokens_after - keep * tokens.visual_tokens_before) <= len(window_plan(8)) / 2
    assert answer.details["budget"]["stage"] == "merge"


def test_keep_below_the_anchor_frames_is_a_clear_error(family_adapters, family_clips):
    from vidqa.errors import BadInput

    adapter, clip = family_adapters["llava"], family_clips["llava"]
    with pytest.raises(BadInput, match="below what 'dycoke' can reach"):
        pruner = build_pruner(load_preset("dycoke"), adapter, keep=0.2)  # 3 whole of 8 frames
        answer_clip(adapter, clip, pruner, max_new_tokens=8)


def test_entries_never_attended_do_not_matter(family_adapters, family_clips):
    """Decode with 1 visual entry per step; then corrupt, in layers >= L, every visual entry no
    step chose: the generated tokens stay the same (they were really skipped), while corrupting
    the chosen ones changes them."""
    adapter, clip = family_adapters["llava"], family_clips["llava"]
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    tokens = adapter.encode_video(prompt)
    inputs = adapter.generation_inputs(prompt, tokens, positions="original")
    layer = 2

    def generate(corrupt=None):
        chosen = []
        selection = DecodeKVSelection(adapter, layer, 1 / len(inputs.visual_rows), inputs.visual_rows)
        original_select = selection._select

        def record(module, args, kwargs, output):
            original_select(module, args, kwargs, output)
            if selection._attend is not None:
                chosen.extend(selection._attend[torch.isin(selection._attend, inputs.visual_rows)].tolist())

        def corrupt_after_prefill(module, args, kwargs, output):
            if corrupt is not None and selection._forwards == 1:
                cache = kwargs.get("cache") or kwargs.get("past_key_values")
                for index in range(layer, len(adapter.decoder_layers)):
                    cache.layers[index].values[:, :, corrupt] = 1e3

        selection._select = record
        with torch.inference_mode(), selection:
            handle = adapter.language_model.register_forward_hook(corrupt_after_prefill, with_kwargs=True)
            try:
                output = adapter.model.generate(**inputs.kwargs, max_new_tokens=8, do_sample=False)
            finally:
                handle.remove()
        return output, sorted(set(chosen))

    baseline, chosen = generate()
    assert 0 < len(chosen) < len(inputs.visual_rows)
    skipped = [row for row in inputs.visual_rows.tolist() if row not in chosen]
    same, _ = generate(corrupt=torch.tensor(skipped))
    assert torch.equal(same, baseline)
    different, _ = generate(corrupt=torch.tensor(chosen))
    assert not torch.equal(different, baseline)


# --- CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_each_family_end_to_end(run_cli, family_checkpoints, square_video, family):
    result = run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints[family], "--frames", FAMILY_FRAMES[family],
                      "--max-new-tokens", "4", "--prune", "dycoke", "--keep", "0.6", "-P", "decode_keep=0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    tokens = record["stats"]["tokens"]
    assert record["preset"] == "dycoke" and tokens["visual_tokens_after"] < tokens["visual_tokens_before"]
    decode = record["pruning"]["dycoke"]["decode"]
    assert decode["attended_per_step"] == int(0.5 * tokens["visual_tokens_after"])
    assert decode["decode_steps"] == tokens["generated_tokens"] - 1
    assert record["stats"]["time"]["decode_tokens_per_s"] >= 0


def test_preset_is_listed_with_its_reference(run_cli):
    listing = {row["name"]: row for row in json.loads(run_cli(["presets", "--json"]).stdout)}
    assert "CVPR 2025" in listing["dycoke"]["reference"] and "KD-TAO/DyCoke" in listing["dycoke"]["reference"]
    assert "during decode" in listing["dycoke"]["where"]
    shown = json.loads(run_cli(["presets", "show", "dycoke", "-P", "decode_keep=0.3", "--json"]).stdout)
    assert shown["stages"][1]["decode_keep"] == 0.3 and "decode_keep" in shown["keep"]


def test_decode_stage_with_an_in_llm_stage_is_refused(family_adapters, tmp_path):
    from vidqa.errors import BadInput

    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("name: mixed\nstages:\n  - type: last_token_attention\n  - type: decode_attention_kv\n")
    with pytest.raises(BadInput, match="decode-time stage cannot be combined"):
        build_pruner(load_preset(str(mixed)), family_adapters["llava"])
