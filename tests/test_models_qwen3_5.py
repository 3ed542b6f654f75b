"""Qwen3.5 adapter (dense and MoE): hybrid layers, the pre-LLM presets end to end, the one-line
refusal of in-LLM and decode-time presets, the run-time check on hybrid caches, FLOPs.

Tiny random Qwen3.5 checkpoints (real model and processor classes; Qwen3_5Tokenizer trained in
code; 4 LLM layers, linear and full attention alternating) are saved to temp dirs and loaded by
path, offline.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import assert_one_line_error
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vidqa import flops
from vidqa.engine import request as engine
from vidqa.errors import BadInput
from vidqa.models import load_model
from vidqa.pruning.core import verify
from vidqa.pruning.core.compat import PruningMismatch, cache_argument, cache_keyword, returned_cache
from vidqa.pruning.core.presets import available_presets, build_pruner, load_preset
from vidqa.pruning.core.runtime import NO_PRUNING
from vidqa.pruning.core.verify import CHECKS, cache_lengths
from vidqa.testing.families import QWEN_CHAT_TEMPLATE
from vidqa.testing.qwen3_5 import build_tiny_qwen3_5
from vidqa.video.decode import load_clip

QUESTION = "what happens in this video ?"
FRAMES = 8  # 4 temporal patches x 4x4 tokens = 64 video tokens
MAX_PIXELS = 128 * 128  # one 128 px frame: 4x4 tokens per temporal patch
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
# settings at which a pre-LLM preset changes nothing; one not listed runs at --keep 1
IDENTITY = {
    "evs": ["pruning_rate=0"],
    "vidcom2": ["ratio=1"],
    "visionzip": ["ratio=1", "dominant_share=1"],  # all dominant: every token, in order
}
PRE_LLM_CHECKS = [check for check in CHECKS if check != "stages"]


def pre_llm_only(name: str) -> bool:
    """Every stage of the preset acts on the visual features before the LLM."""
    preset = load_preset(name)
    return bool(preset.stages) and len(preset.before_llm) == len(preset.stages)


PRE_LLM = sorted(name for name in available_presets() if pre_llm_only(name))
REFUSED = sorted(name for name in available_presets() if name != "none" and not pre_llm_only(name))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_qwen3_5(tmp_path_factory.mktemp("tiny-qwen3_5"))


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return build_tiny_qwen3_5(tmp_path_factory.mktemp("tiny-qwen3_5_moe"), moe=True)


@pytest.fixture(scope="module")
def adapter(checkpoint):
    return load_model(str(checkpoint), device="cpu", dtype="float32", max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def moe_adapter(moe_checkpoint):
    return load_model(str(moe_checkpoint), device="cpu", dtype="float32", max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def clip(square_video):
    return load_clip(square_video, num_frames=FRAMES)


def ask(adapter, clip, pruner=NO_PRUNING, max_new_tokens=6):
    return engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=max_new_tokens), pruner=pruner)


def test_the_presets_split_into_pre_llm_and_refused():
    """The split the tests (and the refusal message) rely on: the pre-LLM presets vLLM runs on
    Qwen3.5 (EVS, VidCom2) are among the ones that work; DyCoke's decode-time step is refused."""
    assert {"evs", "vidcom2", "visionzip", "fastvid"} <= set(PRE_LLM)
    assert {"fastv", "sparsevlm", "prunevid", "adatp", "flashvid", "holitom", "dycoke"} <= set(REFUSED)


# --- the model: hybrid layers, vision side, parity ----------------------------------------------


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_loads_the_hybrid_model_and_encodes_without_deepstack(adapter, moe_adapter, clip, variant):
    adapter = adapter if variant == "dense" else moe_adapter
    expected = "Qwen3_5ForConditionalGeneration" if variant == "dense" else "Qwen3_5MoeForConditionalGeneration"
    assert type(adapter.model).__name__ == expected and adapter.family == "Qwen3.5"
    assert adapter.text_config.layer_types == LAYER_TYPES
    layers = adapter.decoder_layers
    assert [hasattr(layer, "linear_attn") for layer in layers] == [True, False, True, False]
    assert adapter.deepstack_layers == 0
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    tokens = adapter.encode_video(prompt)
    assert tokens.grid == (4, 4, 4) and len(tokens) == 64 and tokens.deepstack is None
    assert torch.equal(tokens.seq_index, prompt.visual_index)
    output = adapter.model.get_video_features(pixel_values_videos=prompt.inputs["pixel_values_videos"],
                                              video_grid_thw=prompt.inputs["video_grid_thw"], return_dict=True)
    assert torch.equal(tokens.features, output.pooler_output[0])  # the tower's own features, in token order


def test_timestamps_and_spans_are_qwen3_vl_s(adapter, clip):
    """One `<t seconds>` per temporal patch, then its 16 `<|video_pad|>` rows: 4 spans."""
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    text = adapter.processor.tokenizer.decode(prompt.input_ids[0]).replace(" ", "")
    times = [(clip.timestamps[i] + clip.timestamps[i + 1]) / 2 for i in range(0, FRAMES, 2)]
    assert all(f"<{t:.1f}seconds>" in text for t in times), text
    spans = prompt.visual_index.view(4, 16)
    assert torch.equal(spans, spans[:, :1] + torch.arange(16))


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_none_matches_the_models_own_generate(adapter, moe_adapter, clip, variant):
    """Our path (features fed back, explicit positions) = transformers' own generate."""
    adapter = adapter if variant == "dense" else moe_adapter
    ours = ask(adapter, clip, max_new_tokens=8)
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    adapter.model.model.rope_deltas = None
    output = adapter.model.generate(**prompt.inputs, max_new_tokens=8, do_sample=False)
    theirs = adapter.processor.tokenizer.decode(output[0, prompt.length:], skip_special_tokens=True)
    assert ours.text == theirs.strip()
    assert ours.stats.verified["checks"] == PRE_LLM_CHECKS


def test_direct_answers_are_asked_for(adapter, clip):
    """The released templates think unless `enable_thinking` is false: the adapter passes it."""
    marker = "{% if enable_thinking is defined and enable_thinking is false %}no thinking {% endif %}"
    processor = adapter.processor
    original = processor.chat_template
    processor.chat_template = QWEN_CHAT_TEMPLATE + marker
    try:
        prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    finally:
        processor.chat_template = original
    assert prompt.text.endswith("assistant no thinking ")


# --- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRE_LLM)
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_pre_llm_presets_at_identity_match_none(adapter, moe_adapter, clip, variant, preset):
    """Every pre-LLM preset (including ones added later) changes nothing at its identity settings."""
    adapter = adapter if variant == "dense" else moe_adapter
    reference = ask(adapter, clip)
    params = IDENTITY.get(preset, [])
    pruned = ask(adapter, clip, build_pruner(load_preset(preset, params), adapter, keep=None if params else 1.0))
    assert pruned.stats.tokens.layer_avg_retention == 1.0
    assert pruned.text == reference.text, f"'{preset}' at {params or '--keep 1'}: add its identity settings to IDENTITY"
    assert pruned.stats.verified["checks"] == PRE_LLM_CHECKS


@pytest.mark.parametrize("preset", REFUSED)
def test_in_llm_and_decode_time_presets_are_refused_in_one_line(adapter, preset):
    with pytest.raises(BadInput) as error:
        build_pruner(load_preset(preset), adapter)
    message = str(error.value)
    assert "\n" not in message and f"preset '{preset}'" in message and "Qwen3.5" in message
    assert all(name in message for name in PRE_LLM)


@pytest.mark.parametrize("preset", PRE_LLM)
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_every_pre_llm_preset_runs_through_the_cli(run_cli, checkpoint, moe_checkpoint, square_video, variant, preset):
    """`vidqa ask --prune P --keep 0.5 --json`: fewer tokens, every layer of either kind sees them,
    and the run-time check passes (the KV cache of the full-attention layers, the linear ones skipped)."""
    model = checkpoint if variant == "dense" else moe_checkpoint
    result = run_cli(["ask", square_video, QUESTION, "--model", model, "--frames", FRAMES, "--max-pixels", MAX_PIXELS,
                      "--max-new-tokens", "2", "--prune", preset, "--keep", "0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    tokens = record["stats"]["tokens"]
    assert record["preset"] == preset and tokens["visual_tokens_before"] == 64
    assert 0 < tokens["layer_avg_retention"] <= 0.55
    assert len(set(tokens["visual_tokens_per_layer"])) == 1  # the same kept tokens in all 4 layers
    assert record["stats"]["verified"]["checks"] == PRE_LLM_CHECKS and record["stats"]["verified"]["layers"] == 4
    assert 0 < record["stats"]["flops"]["paper_fraction"] < 0.6


def test_cli_refuses_an_in_llm_preset_in_one_line(run_cli, checkpoint, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", checkpoint, "--frames", FRAMES,
                      "--max-pixels", MAX_PIXELS, "--prune", "fastv"])
    assert_one_line_error(result, "preset 'fastv'", "inside the LLM", "Qwen3.5", *PRE_LLM)


def test_a_video_session_prefills_in_full(adapter, clip):
    """The hybrid cache (recurrent states) cannot be cropped back to the video prefix: every
    question is prefilled in full, with the same answers."""
    from vidqa.engine.session import VideoSession

    options = engine.GenerationOptions(max_new_tokens=6)
    questions = [QUESTION, "which colour is the square ?"]
    expected = [engine.answer(adapter, clip, q, options) for q in questions]
    session = VideoSession(adapter, clip, NO_PRUNING, options)
    got = [session.ask(q) for q in questions]
    assert [a.text for a in got] == [a.text for a in expected]
    assert [a.stats.prefix_reused for a in got] == [False, False] and not session.reuse
    assert any("cannot be cropped" in note for note in got[0].notes), got[0].notes  # the user is told why


def test_the_static_decode_path_names_the_linear_layers(adapter, clip):
    answer = engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=3, decode="static"))
    assert answer.stats.decode_path == "eager"
    assert any("linear-attention layers" in note for note in answer.notes), answer.notes


# --- the run-time check on hybrid caches ---------------------------------------------------------


def prefill_cache(adapter, clip):
    """The cache after one prefill of the unpruned prompt (our generation inputs)."""
    from transformers import DynamicCache

    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    inputs = adapter.generation_inputs(prompt, adapter.encode_video(prompt), positions="original")
    cache = DynamicCache(config=adapter.model.config)
    with torch.no_grad():
        adapter.model(**inputs.kwargs, **{cache_keyword(adapter.model): cache}, use_cache=True)
    return cache, inputs.kwargs["input_ids"].shape[1]


def test_cache_lengths_skip_the_linear_layers(adapter, clip):
    """Linear-attention layers hold a fixed-size state (None: nothing per row to count); the
    full-attention layers one entry per prompt row."""
    cache, rows = prefill_cache(adapter, clip)
    assert cache_lengths(cache, 4) == [None, rows, None, rows]


class TruncateCache:
    """A forward hook on the language model that drops the first entry of one full-attention
    layer's KV cache right after the prefill (as a transformers change might)."""

    def __init__(self, adapter, layer):
        self.adapter, self.layer, self.calls = adapter, layer, 0

    def __enter__(self):
        self.handle = self.adapter.language_model.register_forward_hook(self.hook, with_kwargs=True, prepend=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, module, args, kwargs, output):
        self.calls += 1
        if self.calls == 1:
            cache = cache_argument(kwargs)
            layer = (cache if cache is not None else returned_cache(output)).layers[self.layer]
            layer.keys, layer.values = layer.keys[:, :, 1:], layer.values[:, :, 1:]


def test_the_check_still_counts_the_full_attention_layers(adapter, clip):
    with TruncateCache(adapter, 3), pytest.raises(PruningMismatch, match="decoder layer 3's KV cache holds"):
        ask(adapter, clip, build_pruner(load_preset("evs"), adapter, keep=0.5))


def test_the_check_compares_the_cache_kinds_with_the_config(adapter, clip, monkeypatch):
    """Only the layers the config calls linear may hold a state instead of KV entries: a check
    that expects other kinds (as after a transformers change of the cache) fails."""

    class AllLinear(verify.PrefillCheck):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            assert self.recurrent == {0, 2}  # what the config says
            self.recurrent = {0, 1, 2, 3}

    monkeypatch.setattr(engine, "PrefillCheck", AllLinear)
    with pytest.raises(PruningMismatch, match="decoder layer 1's cache holds .* KV entries, but the config makes it a linear"):
        ask(adapter, clip)


# --- FLOPs --------------------------------------------------------------------------------------


def counted_flops(module, hidden: int, rows: int, skip: str = "") -> int:
    """FlopCounterMode's count for one forward of a text model over `rows` random embeddings,
    less what modules whose name contains `skip` counted."""
    embeddings = torch.randn(1, rows, hidden)
    # 5.25 hands the conv weight to a kernel submodule as an argument: FlopCounterMode's module
    # tracker cannot follow a parameter that requires grad into a module under no_grad
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            module(inputs_embeds=embeddings, use_cache=False)
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)
    total = counter.get_total_flops()
    if skip:
        skipped = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()
                   if name.endswith(skip)}
        total -= sum(skipped.values())
    return total


def test_flops_shape_reads_the_hybrid_config(adapter, moe_adapter):
    llm, vision = flops.shapes_from_model_config(adapter.model.config)
    assert (llm.num_layers, llm.hidden, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.intermediate) == (4, 64, 4, 2, 16, 128)
    assert llm.layer_types == tuple(LAYER_TYPES) and llm.attention_gate
    assert llm.linear == flops.LinearAttentionShape(num_key_heads=2, num_value_heads=4, key_head_dim=16,
                                                    value_head_dim=16, conv_kernel=4)
    assert vision is None  # dynamic-resolution ViT: not modelled, as for Qwen3-VL
    moe, _ = flops.shapes_from_model_config(moe_adapter.model.config)
    assert moe.intermediate == 2 * 32 + 32  # 2 active experts + the shared expert, each 32 wide


@pytest.mark.parametrize("rows", [128, 256])
def test_prefill_flops_match_the_flop_counter(adapter, rows):
    """Projections, gated attention, conv and the chunked delta rule, against FlopCounterMode on
    a real forward of the hybrid LLM (rows a multiple of the 64-token chunk: no padding)."""
    llm, _ = flops.shapes_from_model_config(adapter.model.config)
    counted = counted_flops(adapter.language_model, llm.hidden, rows)
    predicted = flops.macs_to_flops(flops.prompt_prefill_macs(llm, [rows] * 4, include_lm_head=False))
    assert abs(counted - predicted) <= 0.01 * counted, (counted, predicted)


def test_moe_flops_match_the_flop_counter_outside_the_routed_experts(moe_adapter):
    """The routed experts run as grouped matmuls, which FlopCounterMode does not count on every
    torch: everything else (the shared expert included) is compared, the experts left out on both
    sides (the router and the shared expert's gate, not modelled, are within the tolerance)."""
    llm, _ = flops.shapes_from_model_config(moe_adapter.model.config)
    counted = counted_flops(moe_adapter.language_model, llm.hidden, 128, skip="mlp.experts")
    without_routed = replace(llm, intermediate=32)  # the shared expert only
    predicted = flops.macs_to_flops(flops.prompt_prefill_macs(without_routed, [128] * 4, include_lm_head=False))
    assert abs(counted - predicted) <= 0.02 * counted, (counted, predicted)


def test_linear_attention_layers_are_linear_in_the_tokens(adapter):
    llm, _ = flops.shapes_from_model_config(adapter.model.config)
    linear, full = 0, 1
    for n in (64, 1000, 6272):
        assert flops.layer_macs(llm, 2 * n, layer=linear) == 2 * flops.layer_macs(llm, n, layer=linear)
        # a full-attention layer is quadratic: 2 (2n)^2 h_q d_h against 2 x 2 n^2 h_q d_h
        excess = flops.layer_macs(llm, 2 * n, layer=full) - 2 * flops.layer_macs(llm, n, layer=full)
        assert excess == 4 * n * n * llm.q_width
    # the formula of docs/models.md, term by term, at n = 1000 (C = 64)
    n, D, lin = 1000, 64, llm.linear
    expected = (n * D * (2 * 32 + 2 * 64 + 2 * 4) + n * (2 * 32 + 64) * 4 + n * 4 * (2 * 64 * 16 + 64 * 16 + 3 * 16 * 16)
                + n * 64 * D + 3 * n * D * 128)
    assert lin.key_width == 32 and lin.value_width == 64
    assert flops.layer_macs(llm, n, layer=linear) == expected
    # one decoded token: the recurrent form, no chunk terms; the keys before it do not matter
    assert flops.layer_macs(llm, 1, 5000, layer=linear) == flops.layer_macs(llm, 1, 1, layer=linear)
    # the paper convention sums each layer's own kind
    counts = [100, 100, 40, 40]
    assert flops.visual_prefill_macs(llm, counts) == sum(flops.layer_macs(llm, c, layer=i) for i, c in enumerate(counts))


def test_flops_of_a_released_sized_config():
    """Qwen3.5-9B-sized defaults of the config class (32 layers, one full-attention layer in
    four): a linear-attention layer costs about what a full one does at 1k visual tokens, and
    less and less of it as the tokens grow (its cost is linear, the full layer's quadratic)."""
    from transformers import Qwen3_5TextConfig

    llm = flops.LLMShape.from_config(Qwen3_5TextConfig())
    assert llm.layer_types.count("linear_attention") == 24 and llm.attention_gate
    linear, full = llm.layer_types.index("linear_attention"), llm.layer_types.index("full_attention")
    ratios = [flops.layer_macs(llm, n, layer=linear) / flops.layer_macs(llm, n, layer=full) for n in (1024, 8192, 16384)]
    assert 0.95 < ratios[0] < 1.05 and ratios[1] < 0.85 and ratios[2] < 0.7
    assert flops.visual_prefill_macs(llm, [8192] * 32) == 24 * flops.layer_macs(llm, 8192, layer=linear) + 8 * (
        flops.layer_macs(llm, 8192, layer=full))


def test_models_command_lists_qwen3_5(run_cli):
    rows = {row["family"]: row for row in json.loads(run_cli(["models", "--json"]).stdout)}
    assert rows["Qwen3.5"]["model_types"] == ["qwen3_5", "qwen3_5_moe"]
    assert "Qwen/Qwen3.5-9B" in rows["Qwen3.5"]["checkpoints"] and rows["Qwen3.5"]["max_pixels"] is True
