"""Model-faithful defaults: each family's reference frame sampling and pixel budget, its system
turn, the checkpoint's generation_config, forks' processor names, and sharded (device_map) models.

Reference numbers for Qwen2.5-VL come from qwen-vl-utils' own functions
(tests/fixtures/qwen_vl_utils/make_fixtures.py runs them); SmolVLM2's from transformers'
SmolVLMVideoProcessor.sample_frames, called here. Tiny random checkpoints only, offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import split_layers

from vidqa.engine import request as engine
from vidqa.engine.generation import generation_settings
from vidqa.errors import BadInput
from vidqa.models import frame_rule_for, load_model, plan_placement
from vidqa.models import placement as placement_module
from vidqa.models.qwen_vl_sizing import frame_pixel_limit, reference_size, resize_frames
from vidqa.pruning.core.presets import available_presets, build_pruner, load_preset
from vidqa.testing.builders import DEFAULT_WORDS, build_tiny_llava_onevision
from vidqa.testing.families import DEFAULT_WORDS as FAMILY_WORDS
from vidqa.testing.families import build_tiny_qwen2_5_vl
from vidqa.video.decode import load_clip
from vidqa.video.frame_rules import QwenVLFrames, SmolVLMFrames, UniformFrames

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "qwen_vl_utils" / "reference.json").read_text())
QUESTION = "what happens in this video ?"


# --- Qwen2.5-VL: qwen-vl-utils' frames and pixels -----------------------------------------------


@pytest.mark.parametrize("case", REFERENCE["videos"], ids=lambda c: f"{c['total_frames']}f@{c['video_fps']:g}-{c['height']}x{c['width']}")
def test_qwen_frames_and_size_match_qwen_vl_utils(case):
    rule = QwenVLFrames()
    plan = rule.plan(case["total_frames"], case["video_fps"])
    if case["nframes"] is None:  # qwen-vl-utils refuses; we take what there is, with a note
        assert len(plan.offsets) == case["total_frames"] and plan.note
        return
    assert len(plan.offsets) == case["nframes"]
    assert plan.offsets.tolist() == case["indices"]
    assert plan.sample_fps == pytest.approx(case["sample_fps"])
    assert frame_pixel_limit(case["nframes"])[1] == pytest.approx(case["max_pixels"])
    height, width = reference_size(case["nframes"], case["height"], case["width"])
    assert [height, width] == case["resized"]
    assert (case["nframes"] // 2) * (height // 28) * (width // 28) == case["tokens"]


@pytest.mark.parametrize("budget", REFERENCE["budgets"], ids=lambda b: f"{b['nframes']}frames")
def test_qwen_total_pixel_budget_for_given_frame_counts(budget):
    assert frame_pixel_limit(budget["nframes"])[1] == pytest.approx(budget["max_pixels"])
    height, width = reference_size(budget["nframes"], budget["height"], budget["width"])
    assert [height, width] == budget["resized"]
    assert math.ceil(budget["nframes"] / 2) * (height // 28) * (width // 28) == budget["tokens"]


def test_qwen_32_frames_of_1080p_cost_11520_tokens_not_43056():
    """The issue's numbers, through the real processor configured as the official checkpoint
    (min_pixels 3136, max_pixels 12845056): our resize first gives 560x1008 -> 720 tokens per
    temporal patch; the processor alone would keep 1092x1932 -> 2,691."""
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056, cap_pixels_per_frame=False)
    # one temporal patch; up to 300 frames the total budget does not bind, so 32 frames are 16 of these
    assert frame_pixel_limit(32) == frame_pixel_limit(2)
    frames = np.zeros((2, 1080, 1920, 3), dtype=np.uint8)
    ours = processor(videos=[resize_frames(frames)], return_tensors="pt")["video_grid_thw"][0]
    assert ours.tolist() == [1, 40, 72] and int(ours.prod()) // 4 * 16 == 11520
    theirs = processor(videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], return_tensors="pt")["video_grid_thw"][0]
    assert int(theirs.prod()) // 4 * 16 == 43056


def test_max_pixels_replaces_the_per_frame_cap_only():
    assert frame_pixel_limit(32, 200704) == (100352, 200704)
    assert frame_pixel_limit(32, 3136) == (3136, 3136)  # below the minimum: the minimum follows
    assert frame_pixel_limit(32, 2_000_000)[1] == 2_000_000  # an explicit cap may raise it
    assert frame_pixel_limit(768, 2_000_000)[1] == pytest.approx(REFERENCE["budgets"][2]["max_pixels"])  # total budget


def test_qwen_rule_on_a_real_file(square_video):
    """24 frames at 8 fps (3 s): 2 fps -> 6 frames, torch.linspace(0, 23, 6).round()."""
    clip = load_clip(square_video, num_frames=None, sampling=QwenVLFrames())
    assert clip.indices.tolist() == torch.linspace(0, 23, 6).round().long().tolist() == [0, 5, 9, 14, 18, 23]
    assert clip.sample_fps == pytest.approx(6 / 24 * 8)
    assert load_clip(square_video, num_frames=4, sampling=QwenVLFrames()).sample_fps is None  # --frames wins


# --- SmolVLM2: its processor's own sampling ----------------------------------------------------


@pytest.mark.parametrize("total,fps", [(24, 8.0), (300, 30.0), (45, 25.0), (2400, 30.0), (7200, 24.0), (1, 30.0), (3, 30.0)])
def test_smolvlm_frames_match_its_processor(total, fps):
    from transformers import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
    theirs = SmolVLMVideoProcessor().sample_frames(metadata, num_frames=64, fps=1)
    assert SmolVLMFrames().plan(total, fps).offsets.tolist() == np.asarray(theirs).tolist()


def test_rules_per_family(tmp_path_factory, family_checkpoints):
    assert frame_rule_for(str(family_checkpoints["qwen"])) == QwenVLFrames()
    assert frame_rule_for(str(family_checkpoints["smol"])) == SmolVLMFrames()
    assert frame_rule_for(str(family_checkpoints["llava"])) == UniformFrames(32)


def test_smolvlm_rule_reads_the_checkpoints_video_sampling(tmp_path_factory, family_checkpoints):
    import shutil

    path = tmp_path_factory.mktemp("smol-sampling") / "ckpt"
    shutil.copytree(family_checkpoints["smol"], path)
    config = json.loads((path / "processor_config.json").read_text())
    config["video_processor"]["video_sampling"] = {"fps": 2, "max_frames": 5, "video_size": {"longest_edge": 64}}
    (path / "processor_config.json").write_text(json.dumps(config))
    assert frame_rule_for(str(path)) == SmolVLMFrames(fps=2.0, max_frames=5)


def test_smolvlm_intro_gives_the_video_duration(family_adapters, square_video):
    adapter = family_adapters["smol"]
    clip = load_clip(square_video, num_frames=None, sampling=SmolVLMFrames())  # 3 s at 1 fps: frames 0, 11, 23
    assert clip.indices.tolist() == [0, 11, 23]
    tokenizer = adapter.processor.tokenizer
    ours = tokenizer.decode(adapter.prompt_for_clip(clip, QUESTION).input_ids[0])
    fallback = tokenizer.decode(adapter.build_prompt(clip.frames, clip.timestamps, QUESTION).input_ids[0])
    assert "00 : 03 [ H : MM : SS ]" in ours  # duration 3 s, not the last timestamp (2.875 s)
    assert "00 : 02 [ H : MM : SS ]" in fallback
    # the count in words: 5.25's processor takes it from the timestamps, earlier ones from the frames
    assert "series of three frames" in ours and ours.count("Frame from") == 3


# --- LLaVA-OneVision: the system turn it was trained with --------------------------------------


def test_llava_system_prompt(tmp_path_factory, square_video):
    words = list(DEFAULT_WORDS) + "You are helpful".split()
    path = build_tiny_llava_onevision(tmp_path_factory.mktemp("llava-words"), words=words)
    clip = load_clip(square_video, num_frames=4)
    default = load_model(str(path), device="cpu", dtype="float32")
    assert default.system_prompt == "You are a helpful assistant."
    assert default.prompt_for_clip(clip, QUESTION).text.startswith("<|im_start|>system You are a helpful assistant.")
    off = load_model(str(path), device="cpu", dtype="float32", system_prompt="")
    assert off.system_prompt is None and off.prompt_for_clip(clip, QUESTION).text.startswith("<|im_start|>user")


def test_no_default_system_prompt_a_vocabulary_cannot_spell(family_adapters):
    assert family_adapters["llava"].system_prompt is None  # the test vocabulary has no "You", "helpful"
    assert family_adapters["qwen"].system_prompt is None  # Qwen2.5-VL's own template adds its system turn


# --- generation_config -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_with_generation_config(tmp_path_factory):
    """A tiny Qwen2.5-VL whose vocabulary has <|endoftext|> and whose generation_config lists only
    <|im_end|> as eos, with a repetition penalty."""
    path = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen-genconfig"), words=list(FAMILY_WORDS) + ["<|endoftext|>"])
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.update(repetition_penalty=1.5)
    config_file.write_text(json.dumps(config))
    return path


def test_generation_config_applies_as_transformers_applies_it(qwen_with_generation_config, square_video):
    adapter = load_model(str(qwen_with_generation_config), device="cpu", dtype="float32")
    vocab = adapter.processor.tokenizer.get_vocab()
    clip = load_clip(square_video, num_frames=4)
    result = engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=10))
    assert result.generation["repetition_penalty"] == 1.5
    assert result.generation["eos_token_id"] == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    assert result.generation["do_sample"] is False and "temperature" not in result.generation
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    decode = adapter.processor.tokenizer.decode

    def theirs(**overrides):
        adapter.model.model.rope_deltas = None
        output = adapter.model.generate(**prompt.inputs, max_new_tokens=10, do_sample=False, **overrides)
        return decode(output[0, prompt.length:], skip_special_tokens=True).strip()

    assert result.text == theirs()  # generate's own defaults = the generation_config
    assert result.text != theirs(repetition_penalty=1.0)  # ... and the penalty changed the answer
    sampled = generation_settings(adapter, engine.GenerationOptions(temperature=0.7))
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7
    assert sampled["top_k"] == 50 and sampled["repetition_penalty"] == 1.5  # transformers' default, the checkpoint's


def test_endoftext_stops_qwen_generation(qwen_with_generation_config, square_video):
    """Plant <|endoftext|> as the first answer token: generation stops after it, though the
    checkpoint's generation_config names only <|im_end|>."""
    adapter = load_model(str(qwen_with_generation_config), device="cpu", dtype="float32")
    clip = load_clip(square_video, num_frames=4)
    options = engine.GenerationOptions(max_new_tokens=6)
    before = engine.answer(adapter, clip, QUESTION, options)
    assert before.stats.tokens.generated_tokens == 6
    prompt = adapter.prompt_for_clip(clip, QUESTION)
    with torch.no_grad():
        adapter.model.model.rope_deltas = None
        hidden = adapter.model(**prompt.inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        end = adapter.processor.tokenizer.get_vocab()["<|endoftext|>"]
        adapter.model.get_output_embeddings().weight[end] = hidden * (1e4 / hidden.norm() ** 2)
    assert adapter.model.generation_config.eos_token_id != end
    after = engine.answer(adapter, clip, QUESTION, options)
    assert after.stats.tokens.generated_tokens == 1


# --- forks naming Qwen2_5_VLImageProcessor ---------------------------------------------------


def test_fork_with_qwen2_5_vl_image_processor_name_loads(tmp_path_factory, family_checkpoints, family_adapters, square_video):
    import shutil

    fork = tmp_path_factory.mktemp("qwen-fork") / "ckpt"
    shutil.copytree(family_checkpoints["qwen"], fork)
    processor_config = json.loads((fork / "processor_config.json").read_text())
    image = processor_config.pop("image_processor")
    processor_config.pop("video_processor")
    size = image.pop("size")
    legacy = {**image, "image_processor_type": "Qwen2_5_VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
              "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
    (fork / "processor_config.json").write_text(json.dumps(processor_config))
    (fork / "preprocessor_config.json").write_text(json.dumps(legacy))
    from transformers import AutoProcessor

    with pytest.raises(ValueError, match="Unrecognized image processor"):
        AutoProcessor.from_pretrained(str(fork))
    adapter = load_model(str(fork), device="cpu", dtype="float32")
    clip = load_clip(square_video, num_frames=4)
    options = engine.GenerationOptions(max_new_tokens=6)
    assert engine.answer(adapter, clip, QUESTION, options).text == engine.answer(family_adapters["qwen"], clip, QUESTION, options).text


# --- device_map ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # a bare parameter's key
@pytest.mark.parametrize("family", ["llava", "qwen", "smol"])
def test_every_preset_on_a_sharded_model_gives_the_unsharded_answer(family_checkpoints, family_adapters, square_video, family):
    pytest.importorskip("accelerate")
    whole = family_adapters[family]
    sharded = load_model(str(family_checkpoints[family]), device="cpu", dtype="float32", device_map=split_layers(whole, "cpu", "disk"))
    assert set(sharded.model.hf_device_map.values()) == {"cpu", "disk"}
    clip = load_clip(square_video, num_frames=8)
    options = engine.GenerationOptions(max_new_tokens=3)
    for name in available_presets():
        preset = load_preset(name)
        try:
            build_pruner(preset, whole)
        except BadInput:  # a preset for other families (earlytom: per-frame SigLIP towers) refuses in one line
            continue
        results = [engine.answer(a, clip, QUESTION, options, pruner=build_pruner(preset, a)) for a in (whole, sharded)]
        assert results[1].text == results[0].text, name
        assert results[1].stats.tokens.visual_tokens_per_layer == results[0].stats.tokens.visual_tokens_per_layer, name


def test_placement_decision(family_checkpoints, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(family_checkpoints["llava"]))
    weights = placement_module.weight_bytes(config, torch.float32)
    model = load_model(str(family_checkpoints["llava"]), device="cpu", dtype="float32").model
    assert weights == sum(p.numel() for p in model.parameters()) * 4
    assert plan_placement(config, "cpu", torch.float32, None).device_map is None  # CPU: one device
    assert plan_placement(config, "cpu", torch.float32, "none").device_map is None
    with pytest.raises(BadInput, match="--device-map"):
        plan_placement(config, "cpu", torch.float32, "everywhere")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (placement_module.RESERVE_BYTES + weights * 2, 10**12))
    assert plan_placement(config, "cuda", torch.float32, None).device_map is None  # fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (weights, 10**12))
    pytest.importorskip("accelerate")
    chosen = plan_placement(config, "cuda", torch.float32, None)
    assert chosen.device_map == "auto" and "do not fit" in chosen.notes[0]


# --- the CLI records what it did ---------------------------------------------------------------


def test_ask_json_records_the_defaults(run_cli, family_checkpoints, square_video):
    result = run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints["qwen"], "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["parameters"]["sampling"] == QwenVLFrames().describe()
    assert record["stats"]["tokens"]["frames"] == 6  # 3 s at 2 fps
    assert record["parameters"]["generation"]["do_sample"] is False
    assert record["parameters"]["device_map"] is None
    explicit = json.loads(run_cli(["ask", square_video, QUESTION, "--model", family_checkpoints["qwen"], "--frames", "4",
                                   "--max-new-tokens", "1", "--json", "--device-map", "none"]).stdout)
    assert explicit["parameters"]["sampling"] is None and explicit["stats"]["tokens"]["frames"] == 4
