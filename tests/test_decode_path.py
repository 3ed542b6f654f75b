"""The static decode path (vidqa/engine/decode.py) against transformers' eager `generate`: the
same greedy tokens, logits and positions on every family and every preset (per-layer cache
lengths, PruneVid's sliced early layers, DyCoke's per-step selection, M-RoPE), the same
streamed pieces, the same answers when sampling with a seed, with a repetition penalty and from
a reused video prefix; the stats that say which path ran; the flag and its errors.

CUDA graphs (the same steps replayed) are checked in tests/test_cuda.py, on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_FRAMES, assert_one_line_error

from vidqa import api
from vidqa.engine import decode as decoding
from vidqa.engine import request as engine
from vidqa.engine.session import VideoSession
from vidqa.errors import BadInput
from vidqa.models import load_model
from vidqa.pruning.core.presets import available_presets, build_pruner, load_preset
from vidqa.testing.qwen3 import build_tiny_qwen3_vl
from vidqa.video.decode import load_clip

QUESTION = "what happens in this video ?"
PRESETS = sorted(available_presets())
FAMILIES = ["llava", "qwen", "smol", "qwen3"]
TOKENS = 8


@pytest.fixture(scope="module")
def adapters(family_adapters, tmp_path_factory):
    qwen3 = build_tiny_qwen3_vl(tmp_path_factory.mktemp("decode-qwen3"))
    return {**family_adapters, "qwen3": load_model(str(qwen3), device="cpu", dtype="float32", max_pixels=128 * 128)}


@pytest.fixture(scope="module")
def clips(square_video):
    frames = {**FAMILY_FRAMES, "qwen3": 8}
    return {name: load_clip(square_video, num_frames=count) for name, count in frames.items()}


class Recorder:
    """Every forward of the whole model: the last row's logits; every decode-step forward of the
    language model: its position ids (what the step's rotary phase is computed from)."""

    def __init__(self, adapter):
        self.adapter, self.logits, self.positions = adapter, [], []

    def __enter__(self):
        self._handles = [
            self.adapter.model.register_forward_hook(lambda m, a, out: self.logits.append(out.logits[0, -1].clone())),
            self.adapter.language_model.register_forward_pre_hook(self._positions, with_kwargs=True),
        ]
        return self

    def _positions(self, module, args, kwargs):
        embeddings = kwargs.get("inputs_embeds")
        rows = embeddings.shape[1] if embeddings is not None else kwargs["input_ids"].shape[1]
        if rows == 1:
            self.positions.append(kwargs["position_ids"].clone())

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def ask(adapter, clip, preset, decode, tokens=TOKENS, **generation):
    pruner = build_pruner(load_preset(preset), adapter)
    pieces = []
    with Recorder(adapter) as recorder:
        result = engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=tokens, decode=decode,
                                                                                 **generation),
                               pruner=pruner, on_text=pieces.append)
    return result, pieces, recorder


def runs_on(adapter, preset: str) -> bool:
    """Whether `preset` can run on this family (a stage may be for some families only)."""
    try:
        build_pruner(load_preset(preset), adapter)
    except BadInput:
        return False
    return True


@pytest.mark.parametrize("family", FAMILIES)
def test_the_static_path_gives_the_eager_tokens_on_every_preset(adapters, clips, family):
    adapter, clip = adapters[family], clips[family]
    for preset in [preset for preset in PRESETS if runs_on(adapter, preset)]:
        eager, eager_pieces, eager_seen = ask(adapter, clip, preset, "eager")
        static, static_pieces, static_seen = ask(adapter, clip, preset, "static")
        assert static.stats.decode_path == "static" and eager.stats.decode_path == "eager", preset
        assert static.text == eager.text and static_pieces == eager_pieces, preset
        assert static.stats.tokens.generated_tokens == eager.stats.tokens.generated_tokens, preset
        assert static.stats.tokens.visual_tokens_per_layer == eager.stats.tokens.visual_tokens_per_layer, preset
        assert static.details.get("dycoke") == eager.details.get("dycoke"), preset  # DyCoke's per-step selection
        assert len(static_seen.logits) == len(eager_seen.logits), preset
        for step, (mine, theirs) in enumerate(zip(static_seen.logits, eager_seen.logits)):
            assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4), (preset, step, (mine - theirs).abs().max())
        assert len(static_seen.positions) == len(eager_seen.positions), preset
        for mine, theirs in zip(static_seen.positions, eager_seen.positions):
            assert torch.equal(mine, theirs), preset  # M-RoPE: all four rows continue +1 per step
        assert "checks" in static.stats.verified, preset


def test_dycoke_restricts_every_static_step(adapters, clips, monkeypatch):
    monkeypatch.setattr(adapters["llava"].model.generation_config, "min_new_tokens", 6)  # no early eos
    result, _, _ = ask(adapters["llava"], clips["llava"], "dycoke", "static", tokens=6)
    decode = result.details["dycoke"]["decode"]
    assert result.stats.tokens.generated_tokens == 6
    assert decode["decode_steps"] == decode["restricted_steps"] == 5
    assert decode["attended_per_step"] < decode["visual_kv_entries"]


def test_pruned_layers_keep_their_own_cache_lengths(adapters, clips):
    """FastV (fewer entries from layer K) and PruneVid (its early layers sliced too): each layer's
    padded buffer is its own prefill length plus the decode steps."""
    adapter = adapters["llava"]
    for preset in ("fastv", "prunevid"):
        pruner = build_pruner(load_preset(preset), adapter)
        lengths = []

        def record(module, args, kwargs, lengths=lengths):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if isinstance(cache, decoding.PaddedCache) and not lengths:
                lengths.extend(layer.keys.shape[2] for layer in cache.layers)

        handle = adapter.language_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            result = engine.answer(adapter, clips["llava"], QUESTION, engine.GenerationOptions(max_new_tokens=4, decode="static"),
                                   pruner=pruner)
        finally:
            handle.remove()
        per_layer = torch.tensor(result.stats.tokens.visual_tokens_per_layer)
        rows = result.stats.tokens.llm_prompt_tokens - per_layer[0] + per_layer  # text rows + each layer's visual
        if preset == "prunevid":  # prune_cache: the layers before the stage keep the survivors only
            rows = torch.full_like(rows, int(rows[-1]))
        assert lengths == (rows + 3).tolist(), preset  # 3 decode steps after the prefill's token


def test_sampling_with_a_seed_draws_the_same_tokens(adapters, clips):
    for family in ("llava", "qwen"):
        eager, _, _ = ask(adapters[family], clips[family], "none", "eager", tokens=12, temperature=0.9, seed=3)
        static, _, _ = ask(adapters[family], clips[family], "none", "static", tokens=12, temperature=0.9, seed=3)
        assert static.text == eager.text and static.stats.decode_path == "static"


def test_a_repetition_penalty_applies_as_in_generate(adapters, clips, monkeypatch):
    adapter = adapters["qwen"]
    monkeypatch.setattr(adapter.model.generation_config, "repetition_penalty", 1.5)
    eager, _, _ = ask(adapter, clips["qwen"], "evs", "eager", tokens=12)
    static, _, _ = ask(adapter, clips["qwen"], "evs", "static", tokens=12)
    assert static.text == eager.text and static.stats.decode_path == "static"
    assert static.generation["repetition_penalty"] == 1.5


def test_a_setting_the_static_path_cannot_apply_falls_back_to_eager_with_a_note(adapters, clips, monkeypatch):
    adapter = adapters["llava"]
    monkeypatch.setattr(adapter.model.generation_config, "no_repeat_ngram_size", 2)
    result, _, _ = ask(adapter, clips["llava"], "none", "static", tokens=4)
    assert result.stats.decode_path == "eager" and result.stats.time.decode_warmup_s == 0
    assert any("no_repeat_ngram_size=2" in note and "static decode path does not apply" in note for note in result.notes)
    chosen, _, _ = ask(adapter, clips["llava"], "none", "auto", tokens=4)  # auto's choice on a CPU: no note
    assert chosen.stats.decode_path == "eager" and not any("decode path" in note for note in chosen.notes)


def test_a_reused_video_prefix_decodes_the_same(adapters, clips):
    adapter, clip = adapters["smol"], clips["smol"]
    questions = ("what happens in this video ?", "which colour is the square ?", "does it move ?")
    answers = {}
    for decode in ("eager", "static"):
        generation = engine.GenerationOptions(max_new_tokens=6, decode=decode)
        session = VideoSession(adapter, clip, build_pruner(load_preset("evs"), adapter), generation, history=True)
        results = [session.ask(question) for question in questions]
        assert [r.stats.prefix_reused for r in results] == [False, True, True]
        assert {r.stats.decode_path for r in results} == {decode}
        answers[decode] = [r.text for r in results]
    assert answers["static"] == answers["eager"]


def test_eager_attention_gets_an_additive_mask(tiny_llava, clips):
    adapter = load_model(str(tiny_llava), device="cpu", dtype="float32", attn="eager")
    for preset in ("none", "fastv", "dycoke"):
        eager, _, _ = ask(adapter, clips["llava"], preset, "eager")
        static, _, _ = ask(adapter, clips["llava"], preset, "static")
        assert static.text == eager.text and static.stats.decode_path == "static", preset


def test_the_stats_say_which_path_ran(adapters, clips, monkeypatch):
    monkeypatch.setattr(adapters["llava"].model.generation_config, "min_new_tokens", 6)  # no early eos
    static, _, _ = ask(adapters["llava"], clips["llava"], "none", "static", tokens=6)
    time = static.stats.time
    assert static.stats.decode_path == "static" and time.decode_warmup_s > 0
    assert time.decode_s > 0 and time.decode_tokens_per_s == pytest.approx(5 / time.decode_s)
    eager, _, _ = ask(adapters["llava"], clips["llava"], "none", "eager", tokens=6)
    assert eager.stats.decode_path == "eager" and eager.stats.time.decode_warmup_s == 0
    one, _, _ = ask(adapters["llava"], clips["llava"], "none", "static", tokens=1)
    assert one.stats.tokens.generated_tokens == 1 and one.stats.time.decode_s == 0


def test_auto_picks_per_device_and_answer_length():
    assert decoding.auto_path(torch.device("cpu"), 4) == decoding.AUTO_CPU_PATH
    assert decoding.auto_path(torch.device("cuda"), decoding.AUTO_GRAPHS_MIN_NEW_TOKENS) == "graphs"
    assert decoding.auto_path(torch.device("cuda"), decoding.AUTO_GRAPHS_MIN_NEW_TOKENS - 1) == "eager"


def test_graphs_off_a_gpu_and_unknown_paths_are_bad_input(adapters):
    with pytest.raises(BadInput, match="--decode graphs needs a CUDA GPU"):
        decoding.plan_decode(adapters["llava"], engine.GenerationOptions(decode="graphs"))
    with pytest.raises(BadInput, match="--decode must be one of auto, eager, static, graphs, got 'fast'"):
        api.check_options(api.Settings(decode="fast"))


def test_the_cli_reports_the_path_and_rejects_bad_values(run_cli, tiny_llava, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "4", "--max-new-tokens", "3",
                      "--decode", "static", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["stats"]["decode_path"] == "static" and record["parameters"]["decode"] == "static"
    assert record["stats"]["time"]["decode_warmup_s"] >= 0
    base = ["ask", square_video, QUESTION, "--model", tiny_llava, "--frames", "4", "--max-new-tokens", "3"]
    assert_one_line_error(run_cli([*base, "--decode", "fast"]), "--decode", "fast")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli([*base, "--decode", "graphs"]), "--decode graphs", "CUDA", "cpu")
