"""Preprocessing where the model is (issue #35 item 4): each family's video processor runs on the
model's device (models/base.py, `preprocessing_device`): on the CPU here, the device reaches the
processor and the inputs are the processor's own; on a GPU (skipped without one) the inputs match
the CPU path's. The timing is the benchmark's (benchmarks/e2e.py --preprocess-on), never a test's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import QUESTION

from vidqa.models.base import ModelAdapter, preprocessing_device

FAMILIES = ["llava", "qwen", "smol"]


@pytest.mark.parametrize(("device", "expected"), [
    (torch.device("cuda", 1), torch.device("cuda", 1)),
    ("cpu", torch.device("cpu")),
    (torch.device("mps"), None),  # the processor's own default (the CPU) off CUDA
])
def test_the_processor_runs_on_the_models_gpu_or_the_cpu(device, expected):
    assert preprocessing_device(SimpleNamespace(device=device)) == expected
    assert preprocessing_device(SimpleNamespace()) is None


def test_an_adapter_on_a_gpu_hands_its_video_processor_that_device():
    video_processor, untouched = SimpleNamespace(), SimpleNamespace()
    gpu_model = SimpleNamespace(device=torch.device("cuda", 0))
    adapter = ModelAdapter(gpu_model, SimpleNamespace(video_processor=video_processor))
    assert adapter.preprocess_device == torch.device("cuda", 0) and video_processor.device == "cuda:0"
    ModelAdapter(SimpleNamespace(device=torch.device("mps")), SimpleNamespace(video_processor=untouched))
    assert not hasattr(untouched, "device")


@pytest.mark.parametrize("family", FAMILIES)
def test_on_the_cpu_the_processor_gets_cpu_and_gives_its_own_inputs(family_adapters, family_clips, family, monkeypatch):
    adapter, clip = family_adapters[family], family_clips[family]
    video_processor = adapter.processor.video_processor
    assert adapter.preprocess_device == torch.device("cpu") and video_processor.device == "cpu"
    seen = []
    prepare = type(video_processor)._prepare_input_videos

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("device"))
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(type(video_processor), "_prepare_input_videos", spy)
    placed = adapter.prompt_for_clip(clip, QUESTION)
    assert seen == ["cpu"]
    monkeypatch.setattr(video_processor, "device", None)  # the processor's own default
    default = adapter.prompt_for_clip(clip, QUESTION)
    assert seen == ["cpu", None]
    assert placed.inputs.keys() == default.inputs.keys()
    for name, value in default.inputs.items():
        assert torch.equal(placed.inputs[name], value), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_on_a_gpu_the_inputs_match_the_cpu_paths(family_checkpoints, family_clips, family):
    from vidqa.models import load_model

    adapter = load_model(str(family_checkpoints[family]), device="cuda", dtype="float32")
    assert adapter.processor.video_processor.device == str(adapter.model.device)
    clip = family_clips[family]
    on_gpu = adapter.prompt_for_clip(clip, QUESTION)
    adapter.processor.video_processor.device = "cpu"
    on_cpu = adapter.prompt_for_clip(clip, QUESTION)
    pixels = next(name for name in on_cpu.inputs if name.startswith("pixel_values"))
    assert on_gpu.inputs[pixels].device.type == "cuda"
    for name, value in on_cpu.inputs.items():  # resize kernels differ by rounding between devices
        torch.testing.assert_close(on_gpu.inputs[name].cpu(), value, rtol=0, atol=2e-2 if name == pixels else 0)


def test_the_benchmark_times_preprocessing_on_both(load_script, tiny_llava, square_video, tmp_path):
    e2e = load_script("benchmarks/e2e.py")
    rows = e2e.main(["--model", str(tiny_llava), "--video", str(square_video), "--presets", "none",
                     "--frames", "4", "--tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                     "--threads", "1", "--preprocess-on", "model,cpu", "--out", str(tmp_path), "--quiet"])
    assert [row["preprocess_on"] for row in rows] == ["model", "cpu"]
    assert all(row["preprocess_s"] >= 0 for row in rows)
    assert "| none (preprocessing on cpu) |" in (tmp_path / "table.md").read_text()
