"""GLM-4.1V / GLM-4.5V adapter (dense and MoE): video rows as image tokens in timestamped
spans, 3-D positions gathered from the unpruned prompt, GLM's partial rotary in the recomputed
attention rows, parity with the model's own generate, every preset at identity settings and
through `vidqa ask` (EarlyTom refused in one line), vision attention against eager, the frame
rule, FLOPs shapes (MoE included).

Tiny random checkpoints (real model and processor classes, word-level tokenizer; 8 frames = 4
temporal patches x 4x4 tokens, 4 LLM layers) are saved to temp dirs and loaded by path, offline.
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
from vidqa.models import load_model
from vidqa.models.glm4v import Glm4vFrames
from vidqa.pruning.core.presets import available_presets, build_pruner, load_preset
from vidqa.pruning.core.runtime import NO_PRUNING, RequestState
from vidqa.pruning.core.verify import CHECKS
from vidqa.testing.glm4v import build_tiny_glm4v
from vidqa.video.decode import load_clip

QUESTION = "what happens in this video ?"
FRAMES = 8  # 4 temporal patches x 4x4 tokens = 64 video tokens
VARIANTS = ["dense", "moe"]
REFUSED = {"earlytom": "temporal patches"}  # in-encoder frame merging: per-frame SigLIP towers only
PRESETS = sorted(available_presets())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"dense": build_tiny_glm4v(tmp_path_factory.mktemp("tiny-glm4v")),
            "moe": build_tiny_glm4v(tmp_path_factory.mktemp("tiny-glm4v-moe"), moe=True)}


@pytest.fixture(scope="module")
def adapters(checkpoints):
    return {name: load_model(str(path), device="cpu", dtype="float32") for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def clip(square_video):
    return load_clip(square_video, num_frames=FRAMES)


def ask(adapter, clip, pruner=NO_PRUNING, max_new_tokens=6):
    return engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=max_new_tokens), pruner=pruner)


# --- prompt, tokens, positions ----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_video_rows_are_image_tokens_in_timestamped_spans(adapters, clip, variant):
    adapter = adapters[variant]
    expected = "Glm4vForConditionalGeneration" if variant == "dense" else "Glm4vMoeForConditionalGeneration"
    assert type(adapter.model).__name__ == expected and adapter.family == "GLM-4.1V/4.5V"
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    ids, types = prompt.input_ids[0], prompt.inputs["mm_token_type_ids"][0]
    assert adapter.video_token_id == adapter.model.config.image_token_id
    assert torch.equal(prompt.visual_index, (types == 2).nonzero().flatten())  # the video's rows, all of them
    spans = prompt.visual_index.view(4, 16)
    assert torch.equal(spans, spans[:, :1] + torch.arange(16))  # 4 runs of 16 rows
    tokenizer = adapter.processor.tokenizer
    begin, end = tokenizer.convert_tokens_to_ids(["<|begin_of_image|>", "<|end_of_image|>"])
    assert (ids[spans[:, 0] - 1] == begin).all() and (ids[spans[:, -1] + 1] == end).all()
    seconds = [tokenizer.decode(ids[row + 2:row + 3]) for row in spans[:, -1].tolist()]
    assert seconds == [str(int(clip.timestamps[i])) for i in range(0, FRAMES, 2)]  # first frame of each pair
    tokens = adapter.encode_video(prompt)
    assert tokens.grid == (4, 4, 4) and len(tokens) == 64 and tokens.deepstack is None
    output = adapter.model.get_video_features(pixel_values_videos=prompt.inputs["pixel_values_videos"],
                                              video_grid_thw=prompt.inputs["video_grid_thw"], return_dict=True)
    assert torch.equal(tokens.features, output.pooler_output[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_none_matches_the_models_own_generate(adapters, clip, variant):
    """Our path (features fed back, explicit 3-D positions) = transformers' own generate, with the
    chat end markers vidqa stops on."""
    adapter = adapters[variant]
    ours = ask(adapter, clip, max_new_tokens=8)
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    adapter.model.model.rope_deltas = None
    eos = [adapter.model.generation_config.eos_token_id, *adapter.stop_token_ids()]
    output = adapter.model.generate(**prompt.inputs, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    theirs = adapter.processor.tokenizer.decode(output[0, prompt.length:], skip_special_tokens=True)
    assert ours.text == theirs.strip()
    assert ours.stats.verified["checks"] == [check for check in CHECKS if check != "stages"]
    adapter.model.model.rope_deltas = torch.tensor([[12345]])  # a stale delta from another request changes nothing
    assert ask(adapter, clip, max_new_tokens=8).text == ours.text


def test_kept_tokens_keep_their_3d_positions(adapters, clip):
    adapter = adapters["dense"]
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    full, _ = adapter.model.model.get_rope_index(
        input_ids=prompt.input_ids, mm_token_type_ids=prompt.inputs["mm_token_type_ids"],
        video_grid_thw=prompt.inputs["video_grid_thw"], attention_mask=prompt.inputs["attention_mask"])
    tokens = adapter.encode_video(prompt)
    kept = torch.arange(0, 64, 3)
    for positions in ("original", "compact"):  # compact changes nothing under 3-D positions
        inputs = adapter.generation_inputs(prompt, tokens.select(kept), positions=positions)
        position_ids = inputs.kwargs["position_ids"]
        assert position_ids.shape == (4, 1, len(inputs.seq_index))
        assert torch.equal(position_ids[1:, 0], full[:, 0, inputs.seq_index])
        assert torch.equal(inputs.seq_index[inputs.visual_rows], prompt.visual_index[kept])
    assert int(adapter.model.model.rope_deltas) == int(full.max()) + 1 - len(inputs.seq_index)


def test_the_frame_rule_follows_the_processor():
    """Glm4vVideoProcessor.sample_frames: floor(duration x 2) frames at ceil(i x fps / 2), and
    max_duration x 2 frames over a longer video."""
    from transformers import Glm4vVideoProcessor
    from transformers.video_utils import VideoMetadata

    processor = Glm4vVideoProcessor()
    for total, fps in [(24, 8.0), (95, 30.0), (30 * 400, 30.0), (7, 25.0)]:
        metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
        reference = sorted(set(processor.sample_frames(metadata).tolist()))
        assert Glm4vFrames().plan(total, fps).offsets.tolist() == reference, (total, fps)


def test_max_pixels_sets_the_processors_clip_budget(checkpoints, clip):
    adapter = load_model(str(checkpoints["dense"]), device="cpu", dtype="float32", max_pixels=56 * 56)
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    assert prompt.inputs["video_grid_thw"].tolist() == [[4, 4, 4]]  # 56 px frames: 2x2 tokens per temporal patch
    assert len(prompt.visual_index) == 16


# --- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_identity_settings_match_none(adapters, clip, preset):
    adapter = adapters["dense"]
    if preset in REFUSED:
        with pytest.raises(BadInput, match=REFUSED[preset]):
            build_pruner(load_preset(preset), adapter)
        return
    reference = ask(adapter, clip)
    params, keep = identity_settings(preset)
    pruned = ask(adapter, clip, build_pruner(load_preset(preset, params), adapter, keep=keep))
    assert pruned.stats.tokens.layer_avg_retention == 1.0
    assert pruned.text == reference.text, f"'{preset}' at {params}, keep {keep}: list it in IDENTITY_SETTINGS"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_through_the_cli(run_cli, checkpoints, square_video, preset):
    """`vidqa ask --prune P --json` at the paper defaults: the run-time check passes and the token
    counts add up; EarlyTom is refused in one line naming why."""
    result = run_cli(["ask", square_video, QUESTION, "--model", checkpoints["dense"], "--frames", FRAMES,
                      "--max-new-tokens", "2", "--prune", preset, "--json"])
    if preset in REFUSED:
        assert_one_line_error(result, f"preset '{preset}'", "GLM-4.1V/4.5V", REFUSED[preset])
        return
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    tokens, verified = record["stats"]["tokens"], record["stats"]["verified"]
    assert tokens["visual_tokens_before"] == 64 and len(tokens["visual_tokens_per_layer"]) == 4
    assert tokens["llm_prompt_tokens"] == tokens["prompt_tokens"] - (64 - tokens["visual_tokens_per_layer"][0])
    assert (tokens["layer_avg_retention"] == 1.0) == (preset == "none")
    in_llm = len(set(tokens["visual_tokens_per_layer"])) > 1
    assert verified["layers"] == 4 and ("stages" in verified["checks"]) == in_llm
    assert set(verified["checks"]) >= {"llm_input", "visual_features", "positions", "layer_tokens", "kv_cache"}
    assert record["stats"]["flops"]["vision_encoder_macs"] == 0  # not modelled (dynamic resolution)


@pytest.mark.parametrize("preset", ["fastv", "prunevid", "visionzip"])
def test_the_moe_runs_in_llm_and_pre_llm_presets(run_cli, checkpoints, square_video, preset):
    result = run_cli(["ask", square_video, QUESTION, "--model", checkpoints["moe"], "--frames", FRAMES,
                      "--max-new-tokens", "2", "--prune", preset, "--keep", "0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["stats"]["tokens"]["layer_avg_retention"] <= 0.55
    assert record["stats"]["verified"]["layers"] == 4


# --- attention recomputed, in the LLM and in the tower -----------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_apply_rotary_is_the_layers_own(adapters, variant):
    """GLM-4.1V rotates adjacent pairs, GLM-4.5V halves; both only the first half of each head."""
    import importlib

    adapter = adapters[variant]
    module = "glm4v" if variant == "dense" else "glm4v_moe"
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    language_model = adapter.language_model
    states = torch.randn(1, 4, 10, 16, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(10).view(1, 1, -1).expand(3, 1, -1) * torch.tensor([1, 2, 3]).view(3, 1, 1)
    cos, sin = language_model.rotary_emb(states, position_ids)
    assert cos.shape == (1, 10, 8)  # partial rotary: 8 of 16 dims
    expected, _ = modeling.apply_rotary_pos_emb(states, states, cos, sin)
    torch.testing.assert_close(adapter.apply_rotary(states, cos, sin), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_recomputed_attention_rows_equal_eager(checkpoints, adapters, clip, variant):
    adapter = adapters[variant]
    eager = load_model(str(checkpoints[variant]), device="cpu", dtype="float32", attn="eager")
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    tokens = adapter.encode_video(prompt)
    inputs = adapter.generation_inputs(prompt, tokens, positions="original")
    state = RequestState(adapter=adapter, prompt=prompt, clip=clip, question=QUESTION, device=torch.device("cpu"))
    recomputed, reference = recomputed_and_eager_rows(adapter, eager, inputs, state, {"frame": tokens.frame}, 64)
    assert torch.allclose(recomputed, reference, atol=1e-5)


@pytest.mark.parametrize("layer", [0, -1])
def test_vision_attention_matches_eager(checkpoints, adapters, clip, monkeypatch, layer):
    """Every block attends within one temporal patch; tokens average 4 consecutive patches."""
    import transformers.models.glm4v.modeling_glm4v as modeling

    adapter = adapters["dense"]
    eager = load_model(str(checkpoints["dense"]), device="cpu", dtype="float32", attn="eager")
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
    assert len(blocks) == 4 and all(block.shape == (64,) for block in blocks)  # 4 temporal patches of 8x8
    reference = torch.cat(blocks)
    torch.testing.assert_close(observed.patch_received, reference, atol=1e-6, rtol=1e-5)
    assert observed.received.shape == (len(tokens),) == (64,)
    torch.testing.assert_close(observed.received, reference.view(64, 4).mean(dim=1), atol=1e-6, rtol=1e-5)


# --- FLOPs, listing --------------------------------------------------------------------------


def test_flops_shapes(adapters):
    llm, vision = flops.shapes_from_model_config(adapters["dense"].model.config)
    assert (llm.num_layers, llm.hidden, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.intermediate) == (4, 64, 4, 2, 16, 128)
    assert vision is None  # its `image_size` sizes a position table; the tower is dynamic-resolution
    moe, _ = flops.shapes_from_model_config(adapters["moe"].model.config)
    # the first layer dense (first_k_dense_replace 1); then 2 routed experts + 1 shared, 32 wide each
    assert moe.layer_intermediate == (128, 96, 96, 96)


def test_flops_of_the_dense_llm_match_the_counter(adapters):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    adapter = adapters["dense"]
    llm, _ = flops.shapes_from_model_config(adapter.model.config)
    rows = 40
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        adapter.language_model(inputs_embeds=torch.randn(1, rows, 64), use_cache=False)
    expected = flops.macs_to_flops(flops.prompt_prefill_macs(llm, [rows] * 4, include_lm_head=False))
    # up to 5.24 the rotary tables come from a small matmul (3 x rows x rotary/2), which the model omits
    assert abs(counter.get_total_flops() - expected) <= 1e-3 * expected


def test_models_command_lists_the_family(run_cli):
    rows = {row["family"]: row for row in json.loads(run_cli(["models", "--json"]).stdout)}
    row = rows["GLM-4.1V/4.5V"]
    assert row["model_types"] == ["glm4v", "glm4v_moe"] and row["max_pixels"] is True
    assert "zai-org/GLM-4.1V-9B-Thinking" in row["checkpoints"]


# --- sessions and decode paths -----------------------------------------------------------------


def test_a_video_session_reuses_the_prefix_with_the_same_answers(adapters, clip):
    from vidqa.engine.session import VideoSession

    adapter = adapters["dense"]
    options = engine.GenerationOptions(max_new_tokens=6)
    questions = [QUESTION, "which colour is the square ?"]
    expected = [engine.answer(adapter, clip, question, options).text for question in questions]
    session = VideoSession(adapter, clip, NO_PRUNING, options)
    got = [session.ask(question) for question in questions]
    assert [answer.text for answer in got] == expected
    assert got[1].stats.prefix_reused


@pytest.mark.parametrize("preset", ["none", "fastv", "dycoke"])
def test_the_static_decode_path_gives_the_eager_tokens(adapters, clip, preset):
    adapter = adapters["dense"]
    answers = {}
    for decode in ("eager", "static"):
        options = engine.GenerationOptions(max_new_tokens=8, decode=decode)
        answers[decode] = engine.answer(adapter, clip, QUESTION, options, pruner=build_pruner(load_preset(preset), adapter))
    assert answers["static"].stats.decode_path == "static"
    assert answers["static"].text == answers["eager"].text
