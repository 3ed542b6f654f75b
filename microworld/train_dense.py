"""Train the SmolLM2 benchmark model on the dense world (microworld.dense): the same trained parts
as train_smol (small SigLIP, connector, five new token rows, rank-8 LoRA on q/v, optionally on the
MLPs; SmolLM2 frozen) at the dense world's frame size, on a CPU at a reduced size or on one GPU at
the full one.

    # CPU, the reduced size (16 frames x 36 tokens)
    python -m microworld.train_dense --out DIR --frames 16 --grid 6 --steps 60 --batch 4
    # one GPU, the full size (32 x 64): benchmarks/gpu_train_dense.sh runs this within one device call
    python -m microworld.train_dense --out DIR --frames 32 --grid 8 --device cuda --steps 800 \\
        --batch 16 --workers 12 --max-seconds 330

What differs from train_smol, and why:
- Clips are dense clips; a chat asks one question of each of dense.DENSE_GROUPS (8 turns), so a
  clip's 2,048 visual tokens carry 8 answers.
- Batch `step` is drawn from its own stream, SeedSequence(seed, spawn_key=(1, step)) ((2, step)
  after --init), so DataLoader workers can build batches in any order and a run is still fixed
  by its seed.
- Curriculum in clip length only (the frame size is the dense size's throughout): 8-frame clips
  for the first fifth of the steps, half-length clips to two fifths, then full-length clips with
  a fifth of the batches shorter (8 frames or half).
- --light-stones adds two turns a chat from dense.LIGHT_STONE_GROUPS (training-only questions
  that make the model attend to the light, read it and gather it over frames: the count's steps).
- --light-attention LAYER=W adds an auxiliary loss (microworld.light_attention, weight W) that
  points decoder layer LAYER's attention at the answer of every light question onto the light's
  tokens in every frame: the count needs that gathering, which the answer loss alone has not taught.
- --loss-weight TYPE=W weighs a type's answer tokens in the loss (a weighted mean), for the types
  a run is slow to learn (counting the blinks); without it the loss and the draws are as before.
- --device cuda moves the model to the GPU (bf16 autocast there too); --max-seconds stops the
  loop, saving, when the time is up, so a run fits a fixed device call.
- The weights file's metadata records the frame size (image_size), frames and grid, so
  `python -m microworld.assemble --weights FILE` builds the matching SigLIP and processor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from microworld import dense
from microworld.assemble import DENSE_METADATA
from microworld.chat import conversation, reply_weights
from microworld.light_attention import LightAttentionLoss, light_targets
from microworld.smol import (
    NEW_TOKENS,
    trained_state,
)
from microworld.train_smol import (
    GrownEmbedding,
    UnsupportedTransformers,
    answer_labels,
    check_transformers,
    encode,
    learning_rate,
    optimizer_step,
    parse_type_weights,
    trainable_model,
)

SHORT_PHASE, HALF_PHASE, MIX_SHORT = 0.2, 0.4, 0.2
# the interim dense model (16 x 36; ten of eleven types, not the blinks; benchmarks/micro/README.md):
# what docs/accuracy.md's new-type sweep reads and where the next run starts
DENSE_INTERIM_WEIGHTS = Path(__file__).resolve().parent / "dense_interim" / "weights.safetensors"
QUESTION_KIND = {question: kind for kind, question in dense.TRAINING_QUESTIONS.items()}


def frames_for_step(step: int, steps: int, rng: np.random.Generator, full: int, curriculum: bool = True) -> int:
    fraction = step / max(1, steps)
    half = max(dense.MIN_FRAMES, full // 2)
    if curriculum and fraction < SHORT_PHASE:
        return dense.MIN_FRAMES
    if curriculum and fraction < HALF_PHASE:
        return half
    if rng.random() < MIX_SHORT:
        return (dense.MIN_FRAMES, half)[int(rng.integers(2))]
    return full


class DenseBatches(torch.utils.data.Dataset):
    """Item `step` = the encoded batch of that step (input_ids, attention_mask, pixel_values,
    labels, num_frames), drawn from the step's own stream."""

    def __init__(self, processor, size: dense.DenseSize, batch: int, steps: int, seed: int, stream: int = 1,
                 curriculum: bool = True, loss_weights: dict[str, float] | None = None,
                 light_stones: bool = False, light_targets: bool = False):
        self.processor, self.size, self.batch, self.steps = processor, size, batch, steps
        self.seed, self.stream, self.curriculum = seed, stream, curriculum
        self.loss_weights, self.light_targets = loss_weights, light_targets
        self.groups = dense.DENSE_GROUPS + (dense.LIGHT_STONE_GROUPS if light_stones else ())

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.stream, step)))
        num_frames = frames_for_step(step, self.steps, rng, self.size.frames, self.curriculum)
        size = dense.DenseSize(num_frames, self.size.grid)
        clips = [dense.make_clip(rng, size) for _ in range(self.batch)]
        chats = [dense.training_chat(c, rng, self.groups) for c in clips]
        texts = [self.processor.apply_chat_template(conversation(chat)) for chat in chats]
        inputs = encode(self.processor, texts, [c.frames for c in clips])
        inputs["labels"] = answer_labels(inputs["input_ids"], self.processor.tokenizer)
        if self.loss_weights:  # only then: a run without them draws and weighs exactly as before
            inputs["label_weights"] = reply_weights(inputs["labels"], [
                [self.loss_weights.get(QUESTION_KIND[question], 1.0) for question, _ in chat] for chat in chats])
        if self.light_targets:  # the answer positions and light tokens of --light-attention
            image_token = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
            inputs["light_queries"], inputs["light_keys"] = light_targets(
                inputs["input_ids"], inputs["labels"], [[QUESTION_KIND[q] for q, _ in chat] for chat in chats],
                [c.light_box for c in clips], image_token, self.size.grid)
        inputs["num_frames"] = num_frames
        return inputs


@torch.no_grad()
def first_token_accuracy(model, embedding, processor, size: dense.DenseSize, n_clips: int,
                         seed: int = dense.HELDOUT_SEED, batch_size: int = 8,
                         stones: tuple[str, ...] = ()) -> dict[str, float]:
    """Greedy first answer token == the answer's first token, per type, on held-out dense clips
    (a cheap proxy; the benchmark's figures come from `vidqa batch` on the assembled checkpoint).
    "overall" is over the evaluated types; `stones` (training-only questions) are reported beside."""
    device = embedding.new.device
    clips = dense.heldout_clips(n_clips, size, seed)
    tokenizer, weight = processor.tokenizer, embedding.full_weight()
    correct, asked = {}, {}
    for kind in dense.DENSE_QUESTION_TYPES + stones:
        prompt = processor.apply_chat_template(conversation([(dense.TRAINING_QUESTIONS[kind], None)]),
                                               add_generation_prompt=True)
        for begin in range(0, n_clips, batch_size):
            chunk = clips[begin : begin + batch_size]
            inputs = {k: v.to(device) for k, v in encode(processor, [prompt] * len(chunk), [c.frames for c in chunk]).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  pixel_values=inputs["pixel_values"], use_cache=False)
            guess = (out.last_hidden_state[:, -1].float() @ weight.t()).argmax(-1).tolist()
            for g, clip in zip(guess, chunk):
                answer = clip.answers[kind] if kind in clip.answers else clip.aux_answers[kind]
                first = tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]
                correct[kind] = correct.get(kind, 0) + int(g == first)
                asked[kind] = asked.get(kind, 0) + 1
    result = {k: correct[k] / asked[k] for k in asked}
    result["overall"] = (sum(correct[k] for k in dense.DENSE_QUESTION_TYPES)
                         / sum(asked[k] for k in dense.DENSE_QUESTION_TYPES))
    return result


def save_weights(model, embedding: GrownEmbedding, out: Path, size: dense.DenseSize) -> Path:
    """The trained tensors (smol.trained_state) + the dense size in the metadata (assemble reads it)."""
    from safetensors.torch import save_file

    state = {k: v.cpu() for k, v in trained_state(model).items()}
    # one key: safetensors writes several in no fixed order, and the file's bytes key its assembly
    dense_size = {"image_size": size.size, "frames": size.frames, "grid": size.grid, "new_tokens": " ".join(NEW_TOKENS)}
    metadata = {DENSE_METADATA: json.dumps(dense_size, sort_keys=True)}
    tmp = out / "weights.safetensors.tmp"
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out / "weights.safetensors")
    return out / "weights.safetensors"


def parse_layer_weights(text: str | None, num_layers: int = 30) -> dict[int, float] | None:
    """'20=0.5,24=1' -> {20: 0.5, 24: 1.0} (--light-attention; SmolLM2-135M has 30 layers)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        layer, _, weight = part.partition("=")
        try:
            layer_index, value = int(layer), float(weight)
        except ValueError:
            layer_index, value = -1, 0.0
        if not 0 <= layer_index < num_layers or not value > 0:
            raise ValueError(f"--light-attention {part!r}: give LAYER=W with 0 <= LAYER < {num_layers} and W > 0, "
                             "e.g. 20=0.5")
        out[layer_index] = value
    return out


def check_stop_after(stop_after: int | None) -> None:
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after {stop_after}: give a step count >= 1 (or leave it out for the whole schedule)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def train(out, *, frames: int = dense.REDUCED.frames, grid: int = dense.REDUCED.grid, seed: int = 0,
          steps: int = 600, batch: int = 4, lr: float = 1e-3, warmup: int = 30, weight_decay: float = 0.01,
          clip_norm: float = 1.0, eval_every: int = 0, eval_clips: int = 32, save_every: int = 50,
          log_every: int = 10, threads: int | None = 2, device: str = "auto", workers: int = 0,
          max_seconds: float | None = None, init: Path | None = None, stop_after: int | None = None,
          loss_weights: dict[str, float] | None = None, lora_mlp: bool = False, light_stones: bool = False,
          light_attention: dict[int, float] | None = None, log=print) -> dict:
    check_transformers()
    check_stop_after(stop_after)
    if threads:
        torch.set_num_threads(threads)
    size = dense.DenseSize(frames, grid)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    where = resolve_device(device)
    # the batches' workers are forked before the model reaches the GPU (they never touch CUDA)
    model, embedding, processor, vision, lora = trainable_model(seed, init, image_size=size.size, lora_mlp=lora_mlp)
    data = DenseBatches(processor, size, batch, steps, seed, stream=2 if init else 1, curriculum=init is None,
                        loss_weights=loss_weights, light_stones=light_stones, light_targets=bool(light_attention))
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=4 if workers else None, pin_memory=where.type == "cuda")
    batches = iter(loader)
    model.to(where)  # the embedding's frozen rows too (a buffer of the text model)
    decay = [p for p in vision if p.dim() >= 2]
    no_decay = [p for p in vision if p.dim() < 2] + lora + [embedding.new]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    trainable = decay + no_decay
    log(f"dense smol model: {sum(p.numel() for p in trainable):,} trained parameters; {size.frames} frames x "
        f"{size.tokens_per_frame} tokens ({size.size} px) on {where}; seed {seed}, {steps} steps, batch {batch}, "
        f"setup {time.time() - began:.0f}s", flush=True)
    history: list[dict] = []
    record = {"world": "dense", "frames": size.frames, "grid": size.grid, "image_size": size.size, "seed": seed,
              "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
              "clip_norm": clip_norm, "curriculum": [SHORT_PHASE, HALF_PHASE, MIX_SHORT], "device": str(where),
              "workers": workers, "threads": threads, "max_seconds": max_seconds,
              "init": str(init) if init else None, "stop_after": stop_after, "loss_weights": loss_weights,
              "lora_mlp": lora_mlp, "light_stones": light_stones,
              "light_attention": {str(k): v for k, v in light_attention.items()} if light_attention else None,
              "history": history}
    layers = model.model.text_model.layers
    hooks = contextlib.ExitStack()  # the light attention's hooks, removed when the run ends
    supervised = {layer: hooks.enter_context(LightAttentionLoss(layers, layer)) for layer in (light_attention or {})}
    step_losses: dict[int, torch.Tensor] = {}  # each supervised layer's loss of the step, for the log

    def attention_loss() -> torch.Tensor:
        step_losses.clear()
        step_losses.update({layer: s.loss() for layer, s in supervised.items() if s.log_p is not None})
        return sum(light_attention[layer] * loss for layer, loss in step_losses.items())

    def checkpoint(step_count: int) -> None:
        save_weights(model, embedding, out, size)
        record.update(steps_done=step_count, train_s=round(time.time() - t0, 1))
        (out / "dense_train.json").write_text(json.dumps(record, indent=1) + "\n")

    def evaluate(step_count: int) -> None:
        model.eval()
        accuracy = first_token_accuracy(model, embedding, processor, size, eval_clips,
                                        batch_size=16 if where.type == "cuda" else 4,
                                        stones=tuple(dense.LIGHT_STONES) if light_stones else ())
        model.train()
        log(f"eval step {step_count} ({eval_clips} held-out clips, first token): "
            + " ".join(f"{k}={v:.2f}" for k, v in accuracy.items()), flush=True)
        history.append({"step": step_count, "eval_first_token": accuracy})

    model.train()
    running, count, t0, done = 0.0, 0, time.time(), 0
    light_mass: dict[int, list[float]] = {layer: [] for layer in supervised}
    light_spread: dict[int, list[float]] = {layer: [] for layer in supervised}
    planned = min(steps, stop_after or steps)
    for step in range(planned):
        inputs = next(batches)
        num_frames = inputs.pop("num_frames")
        queries, keys = inputs.pop("light_queries", None), inputs.pop("light_keys", None)
        inputs = {k: v.to(where, non_blocking=True) for k, v in inputs.items()}
        for supervisor in supervised.values():
            supervisor.targets(queries, keys, inputs["attention_mask"])
        loss = optimizer_step(model, embedding, inputs, optimizer, trainable,
                              learning_rate(step, steps, lr, warmup), clip_norm, where.type,
                              extra_loss=attention_loss if supervised else None)
        for layer, loss_of_layer in step_losses.items():
            light_mass[layer].append(float(supervised[layer].mass.detach().max(dim=1).values.mean()))
            light_spread[layer].append(float(loss_of_layer.detach()))
        running, count, done = running + loss, count + 1, step + 1
        out_of_time = max_seconds is not None and time.time() - t0 >= max_seconds
        last = done == planned or out_of_time
        if done % log_every == 0 or last:
            # the light attention: the largest head's mass on the light's tokens and the spread loss
            # (KL from an even spread), means over the steps logged
            masses = {layer: round(sum(m) / len(m), 4) for layer, m in light_mass.items() if m}
            spreads = {layer: round(sum(m) / len(m), 4) for layer, m in light_spread.items() if m}
            log(f"step {done}/{steps} frames {num_frames} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"loss {running / count:.4f} elapsed {time.time() - t0:.0f}s"
                + "".join(f" light L{layer} mass {masses[layer]:.3f} spread {spreads[layer]:.3f}" for layer in masses),
                flush=True)
            entry = {"step": done, "loss": round(running / count, 5), "elapsed_s": round(time.time() - t0, 1)}
            if masses:
                entry.update(light_mass={str(k): v for k, v in masses.items()},
                             light_spread={str(k): v for k, v in spreads.items()})
            history.append(entry)
            running, count = 0.0, 0
            light_mass, light_spread = {layer: [] for layer in supervised}, {layer: [] for layer in supervised}
        if done % save_every == 0 or last:
            checkpoint(done)
        if eval_every and eval_clips and done % eval_every == 0 and not last:
            evaluate(done)
        if out_of_time:
            log(f"stopped after {done} of {steps} steps: --max-seconds {max_seconds:g} reached", flush=True)
            break
    if eval_clips:
        evaluate(done)
    checkpoint(done)
    hooks.close()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microworld.train_dense", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for weights.safetensors + dense_train.json")
    parser.add_argument("--frames", type=int, default=dense.REDUCED.frames, help="clip length (full: 32)")
    parser.add_argument("--grid", type=int, default=dense.REDUCED.grid,
                        help="visual tokens per frame side: grid^2 tokens, 28 grid px frames (full: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=0, help="first-token check every N steps (0: at the end only)")
    parser.add_argument("--eval-clips", type=int, default=32, help="held-out clips of that check (0: none)")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes drawing the batches")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop (and save) once the training loop has run this long")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this weights.safetensors: full-length clips, a fresh schedule, "
                             "a clip stream of its own")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (and save) after this many steps of the --steps schedule, so a run cut by "
                             "hand can be reproduced")
    parser.add_argument("--loss-weight", default=None, metavar="TYPE=W,...",
                        help="weigh question types' answers in the loss, e.g. blinks=4,order=2 (default: all 1), "
                             "for the types a run is slow to learn")
    parser.add_argument("--lora-mlp", action="store_true",
                        help="LoRA on the MLPs' projections too (3x the LoRA factors); an --init without them "
                             "starts them at zero")
    parser.add_argument("--light-stones", action="store_true",
                        help="also ask the light's stepping stones (where it is, its state at the start / end, "
                             "whether it blinks more than 1 / 2 / 3 times: dense.LIGHT_STONES), 10 turns a chat")
    parser.add_argument("--light-attention", default=None, metavar="LAYER=W,...",
                        help="auxiliary loss pointing decoder layer LAYER's attention, at the answer of every "
                             "light question, at the light's tokens in every frame, weighted W "
                             "(microworld/light_attention.py), e.g. 20=0.5")
    args = parser.parse_args(argv)
    try:
        loss_weights = parse_type_weights(args.loss_weight, set(dense.TRAINING_QUESTIONS), "--loss-weight")
        light_attention = parse_layer_weights(args.light_attention)
        check_stop_after(args.stop_after)
    except ValueError as error:
        parser.error(str(error))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from microworld.smol import MissingGGUF

    try:
        train(args.out, frames=args.frames, grid=args.grid, seed=args.seed, steps=args.steps, batch=args.batch,
              lr=args.lr, warmup=args.warmup, eval_every=args.eval_every, eval_clips=args.eval_clips,
              save_every=args.save_every, log_every=args.log_every, threads=args.threads, device=args.device,
              workers=args.workers, max_seconds=args.max_seconds, init=args.init, stop_after=args.stop_after,
              loss_weights=loss_weights, lora_mlp=args.lora_mlp, light_stones=args.light_stones,
              light_attention=light_attention)
    except (MissingGGUF, UnsupportedTransformers, ValueError) as error:  # a torch RuntimeError keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
