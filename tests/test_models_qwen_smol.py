"""Qwen2.5-VL and SmolVLM2 adapters: every preset on both, positions, per-frame text, CLI, FLOPs.

Tiny random checkpoints of each family (real model and processor classes, word-level tokenizer)
are saved to a temp dir and loaded by path, offline.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error
from helpers import recomputed_and_eager_rows
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vidqa import flops
from vidqa.engine import request as engine
from vidqa.models import load_model
from vidqa.pruning.core.compat import cache_keyword, returned_cache
from vidqa.pruning.core.decoder import DecoderPruning, Selection
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.core.runtime import NO_PRUNING, RequestState

QUESTION = "what happens in this video ?"
FRAMES = {"qwen": 8, "smol": 4}  # as FAMILY_FRAMES: Qwen 8 frames = 4 temporal patches x 16 tokens; SmolVLM 4 x 16
# the repo's identity settings (tests/test_pruning_engine.py, test_sparsevlm.py, test_adatp.py)
IDENTITY = {
    "fastv": ([], 1.0),
    "prunevid": (["tau=1.01", "cluster_ratio=1", "ratio=1"], None),
    "sparsevlm": ([], 1.0),
    "adatp": (["tau_l=1.01"], 1.0),
}


def ask(adapter, clip, pruner=NO_PRUNING, max_new_tokens=6):
    return engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=max_new_tokens), pruner=pruner)


def prepare(adapter, clip, pruner=NO_PRUNING):
    """The engine's steps up to generate: (prompt, inputs, state)."""
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    state = RequestState(adapter=adapter, prompt=prompt, clip=clip, question=QUESTION, device=adapter.model.device)
    tokens = adapter.encode_video(prompt)
    state.record_stage("vision encoder", len(tokens))
    tokens = pruner.before_llm(tokens, state)
    state.llm_tokens = tokens
    return prompt, adapter.generation_inputs(prompt, tokens, positions=pruner.positions), state


# --- tokens, grids, parity -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen", "smol"])
def test_visual_tokens_grid(family_adapters, family_clips, family):
    adapter, clip = family_adapters[family], family_clips[family]
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    tokens = adapter.encode_video(prompt)
    frames = 4  # Qwen: 8 frames = 4 temporal patches (2 frames each); SmolVLM: 4 frames
    assert tokens.grid == (frames, 4, 4) and len(tokens) == frames * 16
    assert tokens.frame.tolist() == [f for f in range(frames) for _ in range(16)]
    assert tokens.row.tolist()[:16] == [r for r in range(4) for _ in range(4)]
    assert tokens.col.tolist()[:16] == list(range(4)) * 4
    assert torch.equal(tokens.seq_index, prompt.visual_index)
    assert tokens.fixed_features.shape == (0, adapter.text_config.hidden_size)


@pytest.mark.parametrize("family", ["qwen", "smol"])
def test_none_matches_the_models_own_generate(family_adapters, family_clips, family):
    """Our path (encoder output fed back, explicit positions) = transformers' own path."""
    adapter, clip = family_adapters[family], family_clips[family]
    ours = ask(adapter, clip, max_new_tokens=8)
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    if family == "qwen":
        adapter.model.model.rope_deltas = None
    output = adapter.model.generate(**prompt.inputs, max_new_tokens=8, do_sample=False)
    theirs = adapter.processor.tokenizer.decode(output[0, prompt.length:], skip_special_tokens=True)
    assert ours.text == theirs.strip()
    if family == "qwen":  # a stale rope_deltas from another request changes nothing
        adapter.model.model.rope_deltas = torch.tensor([[12345]])
        assert ask(adapter, clip, max_new_tokens=8).text == ours.text


@pytest.mark.parametrize("preset", sorted(IDENTITY))
@pytest.mark.parametrize("family", ["qwen", "smol"])
def test_identity_settings_match_none(family_adapters, family_clips, family, preset):
    adapter, clip = family_adapters[family], family_clips[family]
    reference = ask(adapter, clip)
    params, keep = IDENTITY[preset]
    pruned = ask(adapter, clip, build_pruner(load_preset(preset, params), adapter, keep=keep))
    assert pruned.stats.tokens.layer_avg_retention == 1.0
    assert pruned.text == reference.text
    assert pruned.stats.tokens.generated_tokens == reference.stats.tokens.generated_tokens


# --- Qwen2.5-VL positions ------------------------------------------------------------------


def unpruned_positions(adapter, prompt) -> torch.Tensor:
    inputs = prompt.inputs
    positions, _ = adapter.model.model.get_rope_index(
        input_ids=inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=inputs["second_per_grid_ts"],
        attention_mask=inputs["attention_mask"],
    )
    return positions  # (3, 1, N)


def test_qwen_pre_llm_positions_are_the_unpruned_ones(family_adapters, family_clips):
    adapter, clip = family_adapters["qwen"], family_clips["qwen"]
    pruner = build_pruner(load_preset("adatp", ["tau_l=0.5"]), adapter)  # dedup drops tokens before the LLM
    prompt, inputs, state = prepare(adapter, clip, pruner)
    tokens = state.llm_tokens
    assert len(tokens) < len(prompt.visual_index)
    ids, mm_types = inputs.kwargs["input_ids"][0], inputs.kwargs["mm_token_type_ids"][0]
    assert ids.shape == mm_types.shape == inputs.kwargs["attention_mask"][0].shape
    assert int((ids == adapter.video_token_id).sum()) == int((mm_types == 2).sum()) == len(tokens)
    position_ids = inputs.kwargs["position_ids"]  # (4, 1, n): 1-D row, then temporal, height, width
    full = unpruned_positions(adapter, prompt)
    assert torch.equal(position_ids[1:], full[:, :, inputs.seq_index])
    assert torch.equal(position_ids[0, 0], torch.arange(len(ids)))
    # independently of get_rope_index: a video token at (patch t, row r, col c) sits at
    # (start + int(t * tokens_per_second * seconds per patch), start + r, start + c)
    start = int(prompt.visual_index[0])  # the text before the video holds positions 0..start-1
    interval = adapter.model.config.vision_config.tokens_per_second * float(prompt.inputs["second_per_grid_ts"][0])
    expected = torch.stack([start + (tokens.frame * interval).long(), start + tokens.row, start + tokens.col])
    assert torch.equal(position_ids[1:, 0, inputs.visual_rows], expected)
    assert interval > 1  # the clip's real timing spaces the temporal positions out
    assert adapter.model.model.rope_deltas.item() == int(full.max()) + 1 - len(ids)


def test_qwen_in_llm_position_embeddings_are_the_unpruned_rows(family_adapters, family_clips):
    """After FastV drops tokens at layer K, layer K's rotary tables are the unpruned ones at the kept columns."""
    adapter, clip = family_adapters["qwen"], family_clips["qwen"]
    pruner = build_pruner(load_preset("fastv"), adapter, keep=0.5)
    prompt, inputs, state = prepare(adapter, clip, pruner)
    manager = pruner.inside_llm(inputs, state)
    layer = manager.stages[0].layer
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("cos_sin", kwargs["position_embeddings"])

    handle = adapter.decoder_layers[layer].self_attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad(), manager:
            adapter.model(**inputs.kwargs)
    finally:
        handle.remove()
    kept_rows = manager._prefill.row_source.cpu()
    assert len(kept_rows) < inputs.kwargs["input_ids"].shape[1]
    full = unpruned_positions(adapter, prompt)[:, :, inputs.seq_index[kept_rows]]
    hidden = torch.zeros(1, len(kept_rows), adapter.text_config.hidden_size)
    cos, sin = adapter.language_model.rotary_emb(hidden, full)
    assert torch.allclose(seen["cos_sin"][0], cos) and torch.allclose(seen["cos_sin"][1], sin)


def test_qwen_decode_continues_the_unpruned_positions(family_adapters, family_clips):
    """Logits of the first decoded tokens of a pruned run = a reference with explicit positions
    that continue the UNPRUNED sequence (and differ from positions continuing the pruned length)."""
    adapter, clip = family_adapters["qwen"], family_clips["qwen"]
    model = adapter.model
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    tokens = adapter.encode_video(prompt)
    kept = tokens.select(torch.arange(0, len(tokens), 2))  # half the video before the LLM
    inputs = adapter.generation_inputs(prompt, kept, positions="original")
    steps = 3
    with torch.no_grad():
        output = model.generate(**inputs.kwargs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    ids = inputs.kwargs["input_ids"]
    length = ids.shape[1]
    full = unpruned_positions(adapter, prompt)
    next_position = int(full.max()) + 1  # = unpruned length + its rope delta

    def reference(first_decode_position):
        features = {"video": BaseModelOutputWithPooling(pooler_output=(kept.features,))}
        logits = []
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=full[:, :, inputs.seq_index],
                        mm_encoder_outputs=features, use_cache=True)
            logits.append(out.logits[0, -1])
            cache = returned_cache(out)
            for step in range(steps - 1):
                token = output.sequences[:, length + step : length + step + 1]
                position = torch.full((3, 1, 1), first_decode_position + step)
                out = model(input_ids=token, attention_mask=torch.ones(1, length + step + 1, dtype=torch.long),
                            position_ids=position, use_cache=True, **{cache_keyword(model): cache})
                logits.append(out.logits[0, -1])
                cache = returned_cache(out)
        return torch.stack(logits)

    generated = torch.stack([step[0] for step in output.logits])
    assert torch.allclose(generated, reference(next_position), atol=1e-4)
    assert next_position != length
    assert not torch.allclose(generated[1:], reference(length)[1:], atol=1e-4)


def test_qwen_recomputed_attention_rows_equal_eager(family_checkpoints, family_adapters, family_clips):
    """The in-LLM scorers' attention rows under M-RoPE = eager attention's."""
    sdpa = family_adapters["qwen"]
    eager = load_model(str(family_checkpoints["qwen"]), device="cpu", dtype="float32", attn="eager")
    _, inputs, state = prepare(sdpa, family_clips["qwen"])
    recomputed, reference = recomputed_and_eager_rows(sdpa, eager, inputs, state, {"frame": state.llm_tokens.frame}, 64)
    assert torch.allclose(recomputed, reference, atol=1e-5)


# --- SmolVLM2: per-frame spans --------------------------------------------------------------


def test_smolvlm_pre_llm_pruning_keeps_every_text_token(family_adapters, family_clips):
    adapter, clip = family_adapters["smol"], family_clips["smol"]
    pruner = build_pruner(load_preset("prunevid", ["positions=original"]), adapter)  # merges before the LLM
    prompt, inputs, state = prepare(adapter, clip, pruner)
    image = adapter.image_token_id
    before, after = prompt.input_ids[0], inputs.kwargs["input_ids"][0]
    assert len(state.llm_tokens) < len(prompt.visual_index)
    assert int((after == image).sum()) == len(state.llm_tokens)
    assert torch.equal(after[after != image], before[before != image])  # the per-frame text survives
    positions = inputs.kwargs["position_ids"][0]
    text = after != image
    assert torch.equal(positions[text], (before != image).nonzero().flatten())  # at its original positions
    # every kept token lies inside its own frame's span: between the text rows around it
    rows = torch.arange(len(after))
    for row in rows[~text]:
        previous = positions[rows[text & (rows < row)].max()]
        following = positions[rows[text & (rows > row)].min()]
        assert previous < positions[row] < following
    assert torch.equal(positions[inputs.visual_rows], state.llm_tokens.seq_index)


def test_smolvlm_in_llm_pruning_touches_only_visual_rows(family_adapters, family_clips):
    adapter, clip = family_adapters["smol"], family_clips["smol"]
    pruner = build_pruner(load_preset("fastv"), adapter, keep=0.5)
    prompt, inputs, state = prepare(adapter, clip, pruner)
    manager = pruner.inside_llm(inputs, state)
    seen = {}
    bound = manager.stages[0]

    class Recorder:
        layer = bound.layer

        def select(self, context):
            seen["text_rows"], seen["visual_rows"] = context.text_rows.clone(), context.visual_rows.clone()
            return bound.select(context)

    manager.stages = [Recorder()]
    with torch.no_grad(), manager:
        adapter.model(**inputs.kwargs)
    ids = inputs.kwargs["input_ids"][0]
    image_rows = (ids == adapter.image_token_id).nonzero().flatten()
    assert torch.equal(seen["visual_rows"], image_rows)
    # the question tokens are what follows the LAST frame's span; text between frames is not "question"
    assert torch.equal(seen["text_rows"], torch.arange(int(image_rows.max()) + 1, len(ids)))
    survivors = manager._prefill.row_source.cpu()
    text_rows = (ids != adapter.image_token_id).nonzero().flatten()
    assert set(text_rows.tolist()) <= set(survivors.tolist())
    assert len(survivors) - len(text_rows) == manager.budgets[bound.layer] < len(image_rows)


def test_smolvlm_tokens_out_of_frame_order_go_to_their_own_frames(family_adapters, family_clips):
    """Tokens handed over in any order land in their frame's span; stages see rows and meta aligned."""
    adapter, clip = family_adapters["smol"], family_clips["smol"]
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    tokens = adapter.encode_video(prompt)
    shuffled = tokens.select(torch.arange(len(tokens)).flip(0)[::3].contiguous())
    inputs = adapter.generation_inputs(prompt, shuffled, positions="original")
    positions = inputs.kwargs["position_ids"][0]
    assert torch.equal(positions[inputs.visual_rows], shuffled.seq_index)  # each token at its own row
    features = inputs.kwargs["mm_encoder_outputs"]["image"].pooler_output[0]
    order = inputs.visual_rows.argsort()
    assert torch.equal(features, shuffled.features[order])  # features follow the sequence
    seen = {}

    class Probe:
        layer = 1

        def select(self, context):
            seen["frame"] = context.visual_meta["frame"].clone()
            return Selection(keep=torch.arange(len(context.visual_rows)))

    state = RequestState(adapter=adapter, prompt=prompt, clip=clip, question=QUESTION, device=torch.device("cpu"))
    with torch.no_grad(), DecoderPruning(adapter, [Probe()], {1: len(shuffled)}, inputs, {"frame": shuffled.frame}, state):
        adapter.model(**inputs.kwargs)
    assert torch.equal(seen["frame"], shuffled.frame[order])
    assert torch.equal(seen["frame"], seen["frame"].sort().values)  # frame spans in order


# --- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["fastv", "prunevid", "sparsevlm", "adatp"])
@pytest.mark.parametrize("family", ["qwen", "smol"])
def test_each_preset_end_to_end(run_cli, family_checkpoints, square_video, family, preset):
    result = run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints[family], "--frames", FRAMES[family],
                      "--max-new-tokens", "2", "--prune", preset, "--keep", "0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    tokens = record["stats"]["tokens"]
    assert record["preset"] == preset and tokens["visual_tokens_before"] == 64
    assert tokens["layer_avg_retention"] <= 0.5 + 1 / 64
    assert record["stats"]["flops"]["paper_fraction"] < 1


def test_qwen_max_pixels(run_cli, family_checkpoints, square_video):
    base = ["ask", square_video, QUESTION, "--model", family_checkpoints["qwen"], "--frames", "8", "--max-new-tokens", "1"]
    result = run_cli(base + ["--max-pixels", "3136", "--json"])  # 56 x 56: 2x2 tokens per temporal patch
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["stats"]["tokens"]["visual_tokens_before"] == 4 * 2 * 2
    assert record["parameters"]["max_pixels"] == 3136
    assert_one_line_error(run_cli(base + ["--max-pixels", "100"]), "--max-pixels", "784")


def test_max_pixels_is_refused_for_fixed_size_families(run_cli, family_checkpoints, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints["smol"], "--max-pixels", "50000"])
    assert_one_line_error(result, "--max-pixels", "SmolVLM2")


def test_models_command(run_cli):
    rows = json.loads(run_cli(["models", "--json"]).stdout)
    by_family = {row["family"]: row for row in rows}
    assert by_family["Qwen2.5-VL"]["model_types"] == ["qwen2_5_vl"]
    assert by_family["Qwen2.5-VL"]["class"] == "Qwen2_5_VLForConditionalGeneration"
    assert "HuggingFaceTB/SmolVLM2-256M-Video-Instruct" in by_family["SmolVLM2"]["checkpoints"]
    assert {"LLaVA-OneVision", "Qwen2.5-VL", "SmolVLM2"} <= set(by_family)
    table = run_cli(["models"])
    assert table.exit_code == 0 and "Qwen2.5-VL" in table.stdout and "smolvlm" in table.stdout


# --- FLOPs ----------------------------------------------------------------------------------


def test_flops_shapes_from_both_configs(family_adapters):
    qwen_llm, qwen_vision = flops.shapes_from_model_config(family_adapters["qwen"].model.config)
    assert (qwen_llm.num_layers, qwen_llm.hidden, qwen_llm.num_heads, qwen_llm.num_kv_heads, qwen_llm.head_dim) == (4, 64, 4, 2, 16)
    assert qwen_vision is None  # dynamic-resolution windowed ViT: not modelled, reported as 0
    smol_llm, smol_vision = flops.shapes_from_model_config(family_adapters["smol"].model.config)
    assert (smol_llm.num_layers, smol_llm.num_kv_heads, smol_llm.intermediate) == (4, 2, 128)
    assert smol_vision.tokens_per_image == 64 and smol_vision.projector == "linear"


def test_smolvlm_vision_flops_match_flop_counter(family_adapters, family_clips):
    adapter = family_adapters["smol"]
    prompt = adapter.build_prompt(family_clips["smol"].frames, family_clips["smol"].timestamps, QUESTION)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        adapter.encode_video(prompt)
    llm, vision = flops.shapes_from_model_config(adapter.model.config)
    analytic = flops.vision_encoder_macs(vision, FRAMES["smol"], projector_hidden=llm.hidden)
    assert abs(counter.get_total_flops() - flops.macs_to_flops(analytic)) / flops.macs_to_flops(analytic) < 0.02
    answer = ask(adapter, family_clips["smol"], max_new_tokens=1)
    assert answer.stats.flops.vision_encoder_macs == analytic
    assert ask(family_adapters["qwen"], family_clips["qwen"], max_new_tokens=1).stats.flops.vision_encoder_macs == 0
