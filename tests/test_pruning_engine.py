"""The pruning engine: parity, recomputed attention, planted signals, invariants, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error
from helpers import grid_tokens, request_state
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vidqa import flops
from vidqa.engine import request as engine
from vidqa.models import load_model
from vidqa.pruning.core.decoder import LayerContext, Selection
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.methods.prunevid import SpatioTemporalMerge, top_k_per_group
from vidqa.testing.builders import build_tiny_llava_onevision
from vidqa.video.decode import load_clip

QUESTION = "what happens in this video ?"
IDENTITY = {
    "fastv": ["--keep", "1"],
    "prunevid": ["-P", "tau=1.01", "-P", "cluster_ratio=1", "-P", "ratio=1"],
}


@pytest.fixture(scope="module")
def adapter(tiny_llava):
    return load_model(str(tiny_llava), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def clip(square_video):
    return load_clip(square_video, num_frames=8)


def prefill_inputs(adapter, clip, pruner, question=QUESTION):
    """Run the engine's steps up to generate; returns (inputs, state)."""
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, question)
    state = request_state(adapter, prompt, clip, question)
    tokens = adapter.encode_video(prompt)
    state.record_stage("vision encoder", len(tokens))
    tokens = pruner.before_llm(tokens, state)
    state.llm_tokens = tokens
    return adapter.generation_inputs(prompt, tokens, positions=pruner.positions), state


class Recorder:
    """Wraps an in-LLM stage and keeps what it saw and chose."""

    def __init__(self, bound):
        self.bound, self.layer, self.calls = bound, bound.layer, []

    def select(self, context):
        selection = self.bound.select(context)
        self.calls.append((context, selection))
        return selection


# --- parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(IDENTITY))
def test_identity_settings_match_none_token_for_token(run_cli, tiny_llava, square_video, preset):
    base = ["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8", "--max-new-tokens", "8", "--json"]
    reference = json.loads(run_cli(base).stdout)
    pruned = run_cli(base + ["--prune", preset, *IDENTITY[preset]])
    assert pruned.exit_code == 0, pruned.stderr
    record = json.loads(pruned.stdout)
    assert record["preset"] == preset
    assert record["stats"]["tokens"]["layer_avg_retention"] == 1.0
    assert record["answer"] == reference["answer"]
    assert record["stats"]["tokens"]["generated_tokens"] == reference["stats"]["tokens"]["generated_tokens"]


# --- recomputed attention rows ---------------------------------------------------------------


def test_recomputed_attention_rows_equal_eager_attention(tmp_path, clip):
    path = build_tiny_llava_onevision(tmp_path / "eager", text_layers=4)
    sdpa = load_model(str(path), device="cpu", dtype="float32", attn="sdpa")
    eager = load_model(str(path), device="cpu", dtype="float32", attn="eager")
    pruner = build_pruner(load_preset("fastv", ["layer=24"]), sdpa)  # K = round(24*4/32) = 3
    inputs, state = prefill_inputs(sdpa, clip, pruner)
    seen = {}

    class Probe:
        layer = 3

        def select(self, context):
            rows = torch.tensor([0, 5, len(context.hidden[0]) // 2, len(context.hidden[0]) - 1])
            seen["rows"], seen["probs"] = rows, context.attention(rows)
            return Selection(keep=torch.arange(len(context.visual_rows)))

    from vidqa.pruning.core.decoder import DecoderPruning

    with torch.no_grad(), DecoderPruning(sdpa, [Probe()], {3: 128}, inputs, {"frame": state.llm_tokens.frame}, state):
        sdpa.model(**inputs.kwargs)
    with torch.no_grad():
        reference = eager.model(**inputs.kwargs, output_attentions=True).attentions[2][0]  # layer K-1 = 2
    assert torch.allclose(seen["probs"], reference[:, seen["rows"]].float(), atol=1e-5)


# --- planted signals -----------------------------------------------------------------------


def test_fastv_keeps_what_the_last_token_attends_to(tmp_path, clip):
    """FastV's kept set is the top of eager attention's last row at layer K-1 (mean over heads)."""
    path = build_tiny_llava_onevision(tmp_path / "planted", text_layers=4)
    sdpa = load_model(str(path), device="cpu", dtype="float32", attn="sdpa")
    eager = load_model(str(path), device="cpu", dtype="float32", attn="eager")
    pruner = build_pruner(load_preset("fastv", ["ratio=0.25"]), sdpa)
    inputs, state = prefill_inputs(sdpa, clip, pruner)
    manager = pruner.inside_llm(inputs, state)
    recorder = Recorder(manager.stages[0])
    manager.stages = [recorder]
    with torch.no_grad(), manager:
        sdpa.model(**inputs.kwargs)
    context, selection = recorder.calls[0]
    with torch.no_grad():
        attention = eager.model(**inputs.kwargs, output_attentions=True).attentions[context.layer - 1][0]
    scores = attention[:, -1, inputs.visual_rows].mean(dim=0)
    expected = torch.topk(scores, 32).indices.sort().values
    assert torch.equal(selection.keep, expected)


def test_fastv_in_bfloat16_past_256_rows(tiny_llava, square_video):
    """Found on the first GPU run: FastV (and HoliTom) made the last row's number from the bf16
    hidden states, where 267 rounds to 268, one past the end of a 268-row prompt (a CUDA index
    assert; at other lengths it rounds down and silently scores another token)."""
    bf16 = load_model(str(tiny_llava), device="cpu", dtype="bfloat16")
    clip16 = load_clip(square_video, num_frames=16)
    pruner = build_pruner(load_preset("fastv"), bf16)
    result = engine.answer(bf16, clip16, QUESTION, engine.GenerationOptions(max_new_tokens=2), pruner=pruner)
    last = result.stats.tokens.prompt_tokens - 1
    assert torch.tensor(float(last), dtype=torch.bfloat16).item() > last  # the case that failed
    assert result.stats.tokens.visual_tokens_per_layer[-1] < result.stats.tokens.visual_tokens_before


def test_the_last_row_is_exact_whatever_the_dtype():
    hidden = torch.zeros(1, 6295, 4, dtype=torch.bfloat16)
    context = LayerContext(layer=2, hidden=hidden, visual_rows=torch.arange(6272), text_rows=torch.arange(6272, 6295),
                           visual_meta={}, embeddings=hidden, row_source=torch.arange(6295), budget=0, state=None)
    row = context.last_row()
    assert row.dtype == torch.long and row.tolist() == [6294]


def test_fastv_keeps_planted_tokens(adapter, clip):
    """q/k arranged so the last token's query matches only chosen visual tokens' keys."""
    pruner = build_pruner(load_preset("fastv", ["ratio=0.25"]), adapter)
    inputs, state = prefill_inputs(adapter, clip, pruner)
    chosen = torch.tensor([3, 17, 40, 41, 77, 100, 101, 127])
    attention = adapter.decoder_layers[0].self_attn  # K = 1 on 4 layers, scored at layer 0
    hidden = adapter.model.config.text_config.hidden_size
    features = inputs.kwargs["mm_encoder_outputs"]["video"].pooler_output.clone()
    features[0, :, 0] = 0.0
    features[0, chosen, 0] = features.abs().max()  # a large feature only the chosen tokens carry
    inputs.kwargs["mm_encoder_outputs"]["video"].pooler_output = features
    original = (attention.q_proj.weight.clone(), attention.q_proj.bias.clone(),
                attention.k_proj.weight.clone(), attention.k_proj.bias.clone())
    head_dim = attention.head_dim
    slow = head_dim // 2 - 1  # the slowest RoPE frequency barely rotates over a few hundred positions
    try:
        with torch.no_grad():
            attention.q_proj.weight.zero_()
            attention.q_proj.bias.zero_()
            attention.k_proj.weight.zero_()
            attention.k_proj.bias.zero_()
            attention.q_proj.bias.view(-1, head_dim)[:, slow] = 10.0
            attention.k_proj.weight.view(-1, head_dim, hidden)[:, slow, 0] = 10.0
        manager = pruner.inside_llm(inputs, state)
        recorder = Recorder(manager.stages[0])
        manager.stages = [recorder]
        with torch.no_grad(), manager:
            adapter.model(**inputs.kwargs)
    finally:
        with torch.no_grad():
            for parameter, value in zip((attention.q_proj.weight, attention.q_proj.bias,
                                         attention.k_proj.weight, attention.k_proj.bias), original):
                parameter.copy_(value)
    kept = set(recorder.calls[0][1].keep.tolist())
    assert set(chosen.tolist()) <= kept
    assert len(kept) == 32


def test_prunevid_marks_the_static_left_half_and_merges_it():
    frames, rows, cols, channels = 8, 4, 4, 16
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(frames, rows, cols, channels, generator=generator)
    grid[:, :, :2] = torch.randn(1, rows, 2, channels, generator=generator)  # left half identical in time
    grid[:, :, :2] += 0.01 * torch.randn(frames, rows, 2, channels, generator=generator)
    tokens = grid_tokens(grid.reshape(frames, rows * cols, channels), text_before=5)
    state = request_state()
    merged = SpatioTemporalMerge(temporal_ratio=0.125, tau=0.8, cluster_ratio=1.0).apply(tokens, state)
    assert state.details["prunevid"]["segments"] == [[0, 8]]
    static = merged.meta["static"]
    # 8 static locations (the left half), each averaged over the 8 frames into one token
    assert int(static.sum()) == rows * 2
    assert (merged.col[static] < 2).all() and (merged.col[~static] >= 2).all()
    assert int((~static).sum()) == frames * rows * 2
    expected = grid[:, :, :2].mean(dim=0).reshape(-1, channels)
    assert torch.allclose(merged.features[static], expected, atol=1e-5)


def test_top_k_per_group_respects_quotas_and_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    kept = top_k_per_group(scores, groups, torch.tensor([2, 1, 0]))
    assert kept.tolist() == [1, 2, 3]


# --- invariants -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset,params", [("fastv", ["ratio=0.3"]), ("prunevid", [])])
def test_kept_indices_budgets_and_cache_lengths(adapter, clip, preset, params):
    pruner = build_pruner(load_preset(preset, params), adapter)
    inputs, state = prefill_inputs(adapter, clip, pruner)
    manager = pruner.inside_llm(inputs, state)
    recorder = Recorder(manager.stages[0])
    manager.stages = [recorder]
    with torch.no_grad(), manager:
        output = adapter.model.generate(
            **inputs.kwargs, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True
        )
    context, selection = recorder.calls[0]
    keep = selection.keep
    assert torch.equal(keep, keep.unique())  # unique and sorted
    budget = manager.budgets[recorder.layer]
    assert len(keep) == budget
    prompt_length = inputs.kwargs["input_ids"].shape[1]
    removed = len(context.visual_rows) - budget
    generated = output.sequences.shape[1] - prompt_length
    cache = output.past_key_values
    for layer_index, layer in enumerate(cache.layers):
        expected = prompt_length + generated - 1
        if layer_index >= recorder.layer or manager.prune_cache:
            expected -= removed
        assert layer.keys.shape[2] == expected, (layer_index, layer.keys.shape)
    assert manager.prune_cache == (preset == "prunevid")


def test_pruned_prefill_flops_match_flop_counter(adapter, clip):
    pruner = build_pruner(load_preset("fastv", ["ratio=0.3"]), adapter)
    inputs, state = prefill_inputs(adapter, clip, pruner)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), pruner.inside_llm(inputs, state), counter:
        adapter.model(**inputs.kwargs, logits_to_keep=1)
    num_layers = adapter.text_config.num_hidden_layers
    visual = state.visual_tokens_per_layer(num_layers)
    prompt = inputs.kwargs["input_ids"].shape[1]
    lengths = [prompt - (visual[0] - n) for n in visual]
    llm, _ = flops.shapes_from_model_config(adapter.model.config)
    analytic = 2 * flops.prompt_prefill_macs(llm, lengths)
    assert visual[0] > visual[-1]
    assert abs(counter.get_total_flops() - analytic) / analytic < 0.01


# --- --keep / --flops -----------------------------------------------------------------------


@pytest.mark.parametrize("preset,keep", [("fastv", 0.5), ("fastv", 0.3), ("prunevid", 0.1)])
def test_keep_is_the_layer_averaged_retention(run_cli, tiny_llava, square_video, preset, keep):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8", "--max-new-tokens", "2",
                      "--prune", preset, "--keep", str(keep), "--json"])
    assert result.exit_code == 0, result.stderr
    tokens = json.loads(result.stdout)["stats"]["tokens"]
    assert abs(tokens["layer_avg_retention"] - keep) <= 1 / tokens["visual_tokens_before"]


def test_flops_target_is_met(run_cli, tiny_llava, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8", "--max-new-tokens", "2",
                      "--prune", "fastv", "--flops", "0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    per_token = stats["flops"]["paper_vanilla_macs"] / stats["tokens"]["visual_tokens_before"]
    assert abs(stats["flops"]["paper_fraction"] - 0.5) * stats["flops"]["paper_vanilla_macs"] <= 2 * per_token * 4


# --- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["fastv", "prunevid"])
def test_each_preset_end_to_end(run_cli, tiny_llava, square_video, preset):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8", "--max-new-tokens", "3",
                      "--prune", preset, "--stats"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert f"preset {preset}" in result.stderr and "pruning overhead" in result.stderr


def test_presets_listing_and_show(run_cli):
    listing = json.loads(run_cli(["presets", "--json"]).stdout)
    assert {"none", "fastv", "prunevid"} <= {row["name"] for row in listing}
    fastv = next(row for row in listing if row["name"] == "fastv")
    assert fastv["where"] == "inside LLM" and abs(fastv["default_keep"] - (2 + 26 * 0.5) / 28) < 1e-3
    shown = json.loads(run_cli(["presets", "show", "prunevid", "-P", "ratio=0.3", "--json"]).stdout)
    select = next(stage for stage in shown["stages"] if stage["name"] == "select")
    assert select["ratio"] == 0.3 and select["layer"] == 10


def test_preset_from_a_yaml_file(run_cli, tiny_llava, square_video, tmp_path):
    custom = tmp_path / "mine.yaml"
    custom.write_text("name: mine\ndescription: FastV at layer 8\nstages:\n  - type: last_token_attention\n    layer: 8\n    ratio: 0.25\n")
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8", "--max-new-tokens", "2",
                      "--prune", str(custom), "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["preset"] == "mine"
    assert record["stats"]["tokens"]["visual_tokens_per_layer"] == [128, 32, 32, 32]  # layer round(8*4/32) = 1


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--prune", "fastvv"], ["fastvv", "did you mean 'fastv'", "available"]),
        (["--prune", "fastv", "-P", "ratoi=0.3"], ["ratoi", "did you mean 'ratio'"]),
        (["--prune", "fastv", "-P", "ratio=1.5"], ["ratio", "1.5", "out of range"]),
        (["--prune", "fastv", "-P", "ratio=abc"], ["ratio", "abc", "not a number"]),
        (["--prune", "fastv", "-P", "ratio"], ["key=value"]),
        (["--prune", "fastv", "--keep", "0"], ["--keep", "(0, 1]"]),
        (["--prune", "fastv", "--keep", "1.5"], ["--keep", "1.5"]),
        (["--prune", "fastv", "--keep", "0.1"], ["--keep 0.1", "at least 0.250"]),
        (["--prune", "fastv", "--keep", "0.5", "--flops", "0.5"], ["--keep or --flops"]),
        (["--prune", "none", "--keep", "0.5"], ["does not prune"]),
        (["--prune", "missing.yaml"], ["missing.yaml", "not found"]),
    ],
)
def test_bad_pruning_options_get_one_line(run_cli, tiny_llava, square_video, args, fragments):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "8", *args])
    assert_one_line_error(result, *fragments)
