"""LLaVA-OneVision-1.5 adapter: the one-line refusal on transformers releases without the model
(simulated here, real on the lowest tested release), the token grid of its per-frame RICE tower,
1-D positions, parity with the model's own generate, every preset at identity settings and
through `vidqa ask` (EarlyTom refused in one line), in-LLM and vision attention against eager,
FLOPs shapes.

A tiny random checkpoint (real model and processor classes, word-level tokenizer; 4 frames x 4x4
tokens, 4 LLM layers) is saved to a temp dir and loaded by path, offline.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error
from helpers import eager_attention_calls, identity_settings, recomputed_and_eager_rows, tower_block_attention

from vidqa import flops
from vidqa.engine import request as engine
from vidqa.errors import BadInput
from vidqa.models import base, load_model
from vidqa.models.llava_onevision1_5 import LlavaOnevision15Adapter
from vidqa.pruning.core.presets import available_presets, build_pruner, load_preset
from vidqa.pruning.core.runtime import NO_PRUNING, RequestState
from vidqa.pruning.core.verify import CHECKS
from vidqa.video.decode import load_clip

AVAILABLE = base.has_transformers_module(LlavaOnevision15Adapter.transformers_module)
needs_model = pytest.mark.skipif(not AVAILABLE, reason="LLaVA-OneVision-1.5 is in transformers >= 5.25 only")
QUESTION = "what happens in this video ?"
FRAMES = 4  # 4 frames x 4x4 tokens = 64 video tokens (no temporal patches)
REFUSED = {"earlytom": "packed sequence"}  # in-encoder frame merging: per-frame SigLIP towers only
PRESETS = sorted(available_presets())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vidqa.testing.llava_onevision1_5 import build_tiny_llava_onevision1_5

    return build_tiny_llava_onevision1_5(tmp_path_factory.mktemp("tiny-llava-ov15"))


@pytest.fixture(scope="module")
def adapter(checkpoint):
    return load_model(str(checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def clip(square_video):
    return load_clip(square_video, num_frames=FRAMES)


def ask(adapter, clip, pruner=NO_PRUNING, max_new_tokens=6):
    return engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=max_new_tokens), pruner=pruner)


# --- the gate on older transformers (runs on every release) --------------------------------


def minimal_checkpoint(path):
    """A directory whose config.json names the family (enough to reach the gate: no weights)."""
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llava_onevision1_5"}))
    return path


def test_an_older_transformers_is_refused_in_one_line(run_cli, square_video, tmp_path, monkeypatch):
    """Simulated: the release lacks transformers.models.llava_onevision1_5 (on 5.18 it really does,
    and AutoConfig cannot read the config: the same line comes from the raw config's model_type)."""
    monkeypatch.setattr(base, "has_transformers_module", lambda name: False)
    model = minimal_checkpoint(tmp_path / "ov15")
    result = run_cli(["ask", square_video, QUESTION, "--model", model, "--frames", FRAMES])
    assert_one_line_error(result, "LLaVA-OneVision-1.5", "llava_onevision1_5", "needs transformers >= 5.25",
                          "pip install 'transformers>=5.25'")
    with pytest.raises(BadInput, match="needs transformers >= 5.25"):
        load_model(str(model), device="cpu")


def test_the_gate_follows_the_installed_release(tmp_path):
    if AVAILABLE:
        LlavaOnevision15Adapter.check_transformers()  # nothing to refuse
        return
    with pytest.raises(BadInput, match="needs transformers >= 5.25") as error:
        load_model(str(minimal_checkpoint(tmp_path / "ov15")), device="cpu")
    assert "\n" not in str(error.value)


def test_models_command_lists_the_family(run_cli):
    rows = {row["family"]: row for row in json.loads(run_cli(["models", "--json"]).stdout)}
    row = rows["LLaVA-OneVision-1.5"]
    assert row["model_types"] == ["llava_onevision1_5"] and row["class"] == "LlavaOnevision15ForConditionalGeneration"
    assert row["max_pixels"] is True and row["checkpoints"]


# --- tokens, positions, parity --------------------------------------------------------------


@needs_model
def test_one_span_of_per_frame_grids(adapter, clip):
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    assert prompt.inputs["video_grid_thw"].tolist() == [[FRAMES, 8, 8]]  # no temporal patches
    rows = prompt.visual_index
    assert len(rows) == 64 and torch.equal(rows, rows[0] + torch.arange(64))  # one span, no timestamps
    tokens = adapter.encode_video(prompt)
    assert tokens.grid == (FRAMES, 4, 4) and tokens.frame.tolist() == [f for f in range(FRAMES) for _ in range(16)]
    assert tokens.row.tolist()[:16] == [r for r in range(4) for _ in range(4)]
    assert tokens.fixed_features.shape == (0, adapter.text_config.hidden_size)
    output = adapter.model.get_video_features(pixel_values_videos=prompt.inputs["pixel_values_videos"],
                                              video_grid_thw=prompt.inputs["video_grid_thw"], return_dict=True)
    assert torch.equal(tokens.features, output.pooler_output[0])


@needs_model
def test_none_matches_the_models_own_generate(adapter, clip):
    ours = ask(adapter, clip, max_new_tokens=8)
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    eos = [adapter.model.generation_config.eos_token_id, *adapter.stop_token_ids()]
    output = adapter.model.generate(**prompt.inputs, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    theirs = adapter.processor.tokenizer.decode(output[0, prompt.length:], skip_special_tokens=True)
    assert ours.text == theirs.strip()
    assert ours.stats.verified["checks"] == [check for check in CHECKS if check != "stages"]


@needs_model
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_positions_are_one_dimensional(adapter, clip, positions):
    """Kept tokens keep their row numbers (original) or the prompt is renumbered (compact); text stays."""
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    tokens = adapter.encode_video(prompt)
    kept = torch.arange(0, 64, 3)
    inputs = adapter.generation_inputs(prompt, tokens.select(kept), positions=positions)
    ids = inputs.kwargs["input_ids"][0]
    expected = inputs.seq_index if positions == "original" else torch.arange(len(ids))
    assert torch.equal(inputs.kwargs["position_ids"][0].cpu(), expected)
    assert torch.equal(inputs.seq_index[inputs.visual_rows], prompt.visual_index[kept])
    text = prompt.input_ids[0][prompt.input_ids[0] != adapter.video_token_id]
    assert torch.equal(ids[ids != adapter.video_token_id], text)
    assert inputs.text_start == int(inputs.visual_rows.max()) + 1  # the question side starts at <|vision_end|>


# --- presets --------------------------------------------------------------------------------


@needs_model
@pytest.mark.parametrize("preset", PRESETS)
def test_identity_settings_match_none(adapter, clip, preset):
    if preset in REFUSED:
        with pytest.raises(BadInput, match=REFUSED[preset]):
            build_pruner(load_preset(preset), adapter)
        return
    reference = ask(adapter, clip)
    params, keep = identity_settings(preset)
    pruned = ask(adapter, clip, build_pruner(load_preset(preset, params), adapter, keep=keep))
    assert pruned.stats.tokens.layer_avg_retention == 1.0
    assert pruned.text == reference.text, f"'{preset}' at {params}, keep {keep}: list it in IDENTITY_SETTINGS"


@needs_model
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_through_the_cli(run_cli, checkpoint, square_video, preset):
    """`vidqa ask --prune P --json` at the paper defaults: the run-time check passes and the token
    counts add up; EarlyTom is refused in one line naming why."""
    args = ["ask", square_video, QUESTION, "--model", checkpoint, "--frames", FRAMES, "--max-new-tokens", "2",
            "--prune", preset, "--json"]
    result = run_cli(args)
    if preset in REFUSED:
        assert_one_line_error(result, f"preset '{preset}'", "LLaVA-OneVision-1.5", REFUSED[preset])
        return
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    tokens, verified = record["stats"]["tokens"], record["stats"]["verified"]
    assert tokens["visual_tokens_before"] == 64 and len(tokens["visual_tokens_per_layer"]) == 4
    dropped_before_llm = 64 - tokens["visual_tokens_per_layer"][0]
    assert tokens["llm_prompt_tokens"] == tokens["prompt_tokens"] - dropped_before_llm
    assert (tokens["layer_avg_retention"] == 1.0) == (preset == "none")
    in_llm = len(set(tokens["visual_tokens_per_layer"])) > 1
    assert verified["layers"] == 4 and ("stages" in verified["checks"]) == in_llm
    assert set(verified["checks"]) >= {"llm_input", "visual_features", "positions", "layer_tokens", "kv_cache"}
    assert record["stats"]["flops"]["vision_encoder_macs"] == 0  # not modelled (dynamic resolution)


# --- attention recomputed, in the LLM and in the tower -----------------------------------------


@needs_model
def test_recomputed_attention_rows_equal_eager(checkpoint, adapter, clip):
    """The in-LLM scorers' rows (Qwen3: q_norm, rotate-half RoPE on 1-D positions) = eager attention's."""
    eager = load_model(str(checkpoint), device="cpu", dtype="float32", attn="eager")
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    tokens = adapter.encode_video(prompt)
    inputs = adapter.generation_inputs(prompt, tokens.select(torch.arange(0, 64, 2)), positions="original")
    state = RequestState(adapter=adapter, prompt=prompt, clip=clip, question=QUESTION, device=torch.device("cpu"))
    recomputed, reference = recomputed_and_eager_rows(adapter, eager, inputs, state, {"frame": tokens.frame[::2]}, 32)
    assert torch.allclose(recomputed, reference, atol=1e-5)


@needs_model
@pytest.mark.parametrize("layer", [0, -1])
def test_vision_attention_matches_eager(checkpoint, adapter, clip, monkeypatch, layer):
    """Each frame is one attention block of its class token + 8x8 patches: the probe's values are
    eager attention's; tokens average 4 consecutive patches once the class-token rows are dropped."""
    import transformers.models.llava_onevision1_5.modeling_llava_onevision1_5 as modeling

    eager = load_model(str(checkpoint), device="cpu", dtype="float32", attn="eager")
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    probe = adapter.observe_vision_layer(prompt, layer)
    with probe, torch.inference_mode():
        tokens = adapter.encode_video(prompt)
    observed = probe.result()
    assert observed.layer == (0 if layer == 0 else 1)

    recorded = eager_attention_calls(modeling.__name__, monkeypatch)
    with torch.inference_mode():
        eager.encode_video(prompt)
    target = eager.model.model.visual.blocks[observed.layer].attn
    blocks = tower_block_attention(recorded, target)
    assert len(blocks) == FRAMES and all(block.shape == (65,) for block in blocks)  # class token + 8x8
    torch.testing.assert_close(observed.patch_received, torch.cat(blocks), atol=1e-6, rtol=1e-5)
    patches = torch.cat([block[1:] for block in blocks])
    assert observed.received.shape == (len(tokens),) == (64,)
    torch.testing.assert_close(observed.received, patches.view(64, 4).mean(dim=1), atol=1e-6, rtol=1e-5)


@needs_model
def test_flops_shapes(adapter):
    llm, vision = flops.shapes_from_model_config(adapter.model.config)
    assert (llm.num_layers, llm.hidden, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.intermediate) == (4, 64, 4, 2, 16, 128)
    assert vision is None  # dynamic-resolution tower: not modelled, reported as 0


# --- sessions and decode paths -----------------------------------------------------------------


@needs_model
def test_a_video_session_reuses_the_prefix_with_the_same_answers(adapter, clip):
    from vidqa.engine.session import VideoSession

    options = engine.GenerationOptions(max_new_tokens=6)
    questions = [QUESTION, "which colour is the square ?"]
    expected = [engine.answer(adapter, clip, question, options).text for question in questions]
    session = VideoSession(adapter, clip, NO_PRUNING, options)
    got = [session.ask(question) for question in questions]
    assert [answer.text for answer in got] == expected
    assert got[1].stats.prefix_reused


@needs_model
@pytest.mark.parametrize("preset", ["none", "fastv", "dycoke"])
def test_the_static_decode_path_gives_the_eager_tokens(adapter, clip, preset):
    answers = {}
    for decode in ("eager", "static"):
        options = engine.GenerationOptions(max_new_tokens=8, decode=decode)
        answers[decode] = engine.answer(adapter, clip, QUESTION, options, pruner=build_pruner(load_preset(preset), adapter))
    assert answers["static"].stats.decode_path == "static"
    assert answers["static"].text == answers["eager"].text
