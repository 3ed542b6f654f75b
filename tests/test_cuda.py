"""On a CUDA GPU: what the CPU suite cannot show. Every preset on every family in bfloat16 and
float16 (the dtypes `--dtype auto` picks on GPUs) passes the engine's pruning checks; in float32
the GPU keeps exactly the tokens the CPU keeps and gives the same answer; a model split between
the GPU and the CPU answers as the whole model does; the README's first command and the sample
questions are answered right on the GPU with its default dtype; decoding with CUDA graphs
(`--decode graphs`) gives the eager path's tokens on every family and preset.

Skipped where torch sees no GPU (CI has none). On a GPU machine: `python -m pytest tests/test_cuda.py`.
VIDQA_TEST_DEVICE=cpu runs the same assertions on the CPU (to check the tests themselves).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_FRAMES, split_layers

from vidqa.engine import request as engine
from vidqa.models import load_model
from vidqa.pruning.core.presets import available_presets, build_pruner, load_preset
from vidqa.testing.qwen3 import build_tiny_qwen3_vl
from vidqa.video.decode import load_clip

DEVICE = os.environ.get("VIDQA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU")

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
QUESTION = "what happens in this video ?"
FAMILIES = ["llava", "qwen", "smol", "qwen3"]
FRAMES = {**FAMILY_FRAMES, "qwen3": 8}
LOAD_OPTIONS = {"qwen3": {"max_pixels": 128 * 128}}  # one 128 px frame: 4x4 tokens per temporal patch
PRESETS = sorted(available_presets())


@pytest.fixture(scope="module")
def checkpoints(family_checkpoints, tmp_path_factory):
    return {**family_checkpoints, "qwen3": build_tiny_qwen3_vl(tmp_path_factory.mktemp("family-qwen3"))}


@pytest.fixture(scope="module")
def clips(square_video):
    return {name: load_clip(square_video, num_frames=count) for name, count in FRAMES.items()}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """load(family, device, dtype) -> adapter, each loaded once per module."""
    cache = {}

    def load(family, device, dtype, device_map=None):
        key = (family, device, dtype, json.dumps(device_map, sort_keys=True, default=str))
        if key not in cache:
            cache[key] = load_model(str(checkpoints[family]), device=device, dtype=dtype, device_map=device_map,
                                    **LOAD_OPTIONS.get(family, {}))
        return cache[key]

    return load


def ask(adapter, clip, preset):
    pruner = build_pruner(load_preset(preset), adapter)
    return engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=3), pruner=pruner)


def assert_pruned(result, preset):
    """The engine's checks ran (a mismatch raises) and a pruning preset really removed tokens."""
    assert "checks" in result.stats.verified
    tokens = result.stats.tokens
    if preset != "none":
        assert min(tokens.visual_tokens_per_layer) < tokens.visual_tokens_before, preset


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_runs_in_half_precision(loaded, clips, family, dtype):
    adapter = loaded(family, DEVICE, dtype)
    assert adapter.model.dtype == getattr(torch, dtype)
    for preset in runnable_presets(adapter):
        result = ask(adapter, clips[family], preset)
        assert_pruned(result, preset)
        if DEVICE.startswith("cuda"):
            assert result.stats.peak_memory_kind == "cuda" and result.stats.peak_memory_bytes > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_keeps_the_tokens_the_cpu_keeps(loaded, clips, family, monkeypatch):
    # like with like: no TF32 (cuDNN's convolutions, SigLIP's patch embedding, default to it)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gpu, cpu = loaded(family, DEVICE, "float32"), loaded(family, "cpu", "float32")
    for preset in runnable_presets(cpu):
        on_gpu, on_cpu = ask(gpu, clips[family], preset), ask(cpu, clips[family], preset)
        assert_pruned(on_gpu, preset)
        assert on_gpu.stats.tokens.visual_tokens_per_layer == on_cpu.stats.tokens.visual_tokens_per_layer, preset
        if on_cpu.kept is not None:
            assert torch.equal(on_gpu.kept.row, on_cpu.kept.row), preset
            assert torch.equal(on_gpu.kept.left_at_layer, on_cpu.kept.left_at_layer), preset
        assert on_gpu.text == on_cpu.text, preset


# the decode path that replays CUDA graphs (vidqa/engine/decode.py); its fixed-shape steps alone on the CPU
FAST = "graphs" if DEVICE.startswith("cuda") else "static"


def ask_decoding(adapter, clip, preset, decode, tokens=8):
    pruner = build_pruner(load_preset(preset), adapter)
    pieces = []
    result = engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=tokens, decode=decode),
                           pruner=pruner, on_text=pieces.append)
    return result, pieces


def path_that_ran(asked: str, generated: int) -> str:
    """graphs records its step at the second decode step: a shorter answer ran the static steps only."""
    return "static" if asked == "graphs" and generated <= 2 else asked


def runnable_presets(adapter):
    """The presets this family runs (a stage may be for some families only)."""
    from vidqa.errors import BadInput

    names = []
    for preset in PRESETS:
        try:
            build_pruner(load_preset(preset), adapter)
        except BadInput:
            continue
        names.append(preset)
    return names


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_decode_gives_the_eager_tokens_in_float32(loaded, clips, family, monkeypatch):
    """Every preset: the static steps and their CUDA-graph replay stream the eager path's greedy
    tokens (per-layer cache lengths, PruneVid's sliced layers, DyCoke's selection, M-RoPE)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    adapter = loaded(family, DEVICE, "float32")
    for preset in runnable_presets(adapter):
        eager, eager_pieces = ask_decoding(adapter, clips[family], preset, "eager")
        for path in dict.fromkeys(("static", FAST)):
            fast, fast_pieces = ask_decoding(adapter, clips[family], preset, path)
            assert fast.stats.decode_path == path_that_ran(path, fast.stats.tokens.generated_tokens), (preset, path, fast.notes)
            assert fast.text == eager.text and fast_pieces == eager_pieces, (preset, path)
            assert fast.stats.tokens.generated_tokens == eager.stats.tokens.generated_tokens, (preset, path)
            assert fast.details.get("dycoke") == eager.details.get("dycoke"), (preset, path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graph_decode_runs_every_preset_in_half_precision(loaded, clips, dtype):
    adapter = loaded("qwen", DEVICE, dtype)
    for preset in runnable_presets(adapter):
        result, _ = ask_decoding(adapter, clips["qwen"], preset, FAST, tokens=6)
        assert result.stats.decode_path == path_that_ran(FAST, result.stats.tokens.generated_tokens), (preset, result.notes)
        assert_pruned(result, preset)


def test_auto_decodes_long_answers_with_graphs(loaded, clips):
    from vidqa.engine.decode import AUTO_CPU_PATH, AUTO_GRAPHS_MIN_NEW_TOKENS

    adapter = loaded("llava", DEVICE, "float32")
    long, _ = ask_decoding(adapter, clips["llava"], "none", "auto", tokens=AUTO_GRAPHS_MIN_NEW_TOKENS)
    short, _ = ask_decoding(adapter, clips["llava"], "none", "auto", tokens=4)
    if DEVICE.startswith("cuda"):
        assert long.stats.decode_path == path_that_ran("graphs", long.stats.tokens.generated_tokens)
        assert short.stats.decode_path == "eager"
        if long.stats.tokens.generated_tokens > 2:
            assert long.stats.time.decode_warmup_s > 0 and long.stats.time.decode_tokens_per_s > 0
    else:
        assert long.stats.decode_path == short.stats.decode_path == AUTO_CPU_PATH


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # a bare parameter's key
@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_split_between_gpu_and_cpu_answers_as_the_whole_model(loaded, clips, family):
    pytest.importorskip("accelerate")
    whole = loaded(family, DEVICE, "float32")
    places = (0, "cpu") if DEVICE.startswith("cuda") else ("cpu", "disk")  # on the CPU: the same test, one step down
    split = loaded(family, DEVICE, "float32", device_map=split_layers(whole, *places))
    assert set(split.model.hf_device_map.values()) == set(places)
    for preset in runnable_presets(whole):
        results = [ask(adapter, clips[family], preset) for adapter in (whole, split)]
        assert_pruned(results[1], preset)
        assert results[1].text == results[0].text, preset
        assert results[1].stats.tokens.visual_tokens_per_layer == results[0].stats.tokens.visual_tokens_per_layer, preset


def test_the_readme_first_command_answers_right_with_the_default_dtype(run_cli):
    result = run_cli(["ask", SAMPLES / "square.mp4", "Which way does the square move?", "--model", "micro",
                      "--device", DEVICE, "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["answer"] == "right"
    expected_dtype = "bfloat16" if DEVICE.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    assert record["parameters"]["dtype"] == expected_dtype


@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_micro_answers_the_sample_questions(run_cli, tmp_path, dtype):
    rows = list(csv.DictReader((SAMPLES / "questions.csv").open(encoding="utf-8")))
    output = tmp_path / "samples.jsonl"
    result = run_cli(["batch", SAMPLES / "questions.csv", "-o", output, "--model", "micro", "--max-new-tokens", "4",
                      "--device", DEVICE, "--dtype", dtype])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == len(rows)
    assert [(r["id"], r["answer"]) for r in records if r["correct"] is not True] == []
