"""On a CUDA GPU: what the CPU suite cannot show. Every preset on every family in bfloat16 and
float16 (the dtypes `--dtype auto` picks on GPUs) passes the engine's pruning checks; in float32
the GPU keeps exactly the tokens the CPU keeps and gives the same answer; a model split between
the GPU and the CPU answers as the whole model does; the README's first command and the sample
questions are answered right on the GPU with its default dtype.

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
    for preset in PRESETS:
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
    for preset in PRESETS:
        on_gpu, on_cpu = ask(gpu, clips[family], preset), ask(cpu, clips[family], preset)
        assert_pruned(on_gpu, preset)
        assert on_gpu.stats.tokens.visual_tokens_per_layer == on_cpu.stats.tokens.visual_tokens_per_layer, preset
        if on_cpu.kept is not None:
            assert torch.equal(on_gpu.kept.row, on_cpu.kept.row), preset
            assert torch.equal(on_gpu.kept.left_at_layer, on_cpu.kept.left_at_layer), preset
        assert on_gpu.text == on_cpu.text, preset


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # a bare parameter's key
@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_split_between_gpu_and_cpu_answers_as_the_whole_model(loaded, clips, family):
    pytest.importorskip("accelerate")
    whole = loaded(family, DEVICE, "float32")
    places = (0, "cpu") if DEVICE.startswith("cuda") else ("cpu", "disk")  # on the CPU: the same test, one step down
    split = loaded(family, DEVICE, "float32", device_map=split_layers(whole, *places))
    assert set(split.model.hf_device_map.values()) == set(places)
    for preset in PRESETS:
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
