"""Train the SmolLM2 benchmark model's small SigLIP, connector, new token rows and rank-8 LoRA
(q/v) on the synthetic world (with the extras), the pretrained SmolLM2 weights frozen.

    python -m microworld.train_smol --out DIR --seed S [--steps 1400 --batch 6 ...]
    python -m microworld.train_smol --out DIR2 --seed S --init DIR/weights.safetensors ...   # continue

The committed weights are three phases of this script (benchmarks/micro/README.md has the
commands): the curriculum, then two continuations on 8-frame clips, the last one asking the
comparison questions more often (--emphasis).

Recipe:
- AdamW (betas 0.9/0.98, weight decay 0.01 on the vision / connector matrices, 0 elsewhere),
  lr 1e-3, 30 linear warm-up steps, cosine to 0.1x, grad-norm clip 1.0, batch 6, bf16 autocast.
- Curriculum (fractions of --steps): single frames first (15%: colours and *where* the square
  is), then 2/4-frame clips (to 30%), then 8-frame clips with a fifth of the batches 1/2/4-frame.
- Every clip is one multi-turn chat, one question per group of mutually constraining questions
  (world.GROUPS + EXTRA_GROUPS, with the "where is the square at the start / end ?" stepping
  stones); loss only on the answers (the tokens after "Assistant:" up to <end_of_utterance>),
  with logits computed only at those positions (the 49k-row lm_head over every position would
  double the step).
- The prompt is what the SmolVLM2 adapter builds for a decoded 8-frame, 4 fps mp4: the real
  SmolVLMProcessor with per-frame timestamps index / 4 s and the clip's duration.
- The new token rows are trained as a separate (5, 576) tensor; the 49,152 pretrained rows stay
  frozen (the embedding module is swapped for GrownEmbedding during training only).
- Every --save-every steps the trained tensors are written to DIR/weights.safetensors (so a cut
  run is usable) and DIR/smol_train.json records the arguments, the log and the evaluations.
  Periodic evaluations are first-token greedy accuracy on held-out clips (a cheap proxy; the
  benchmark's figures come from `vidqa batch` on the assembled checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from microworld import world
from microworld.chat import conversation, reply_labels
from microworld.smol import (
    FRAMES,
    LORA_TARGETS,
    MLP_LORA_TARGETS,
    NEW_TOKENS,
    add_lora,
    build_model,
    build_processor,
    build_tokenizer,
    converted_llm,
    trained_state,
)
from vidqa.pruning.core.compat import transformers_version

FPS = 4.0  # the held-out mp4s' frame rate (benchmarks/micro/heldout.py)
CURRICULUM = ((0.15, 1), (0.30, None))  # (end fraction, frames): None = 2 or 4 frames
MIX_SHORT = 0.2
TYPES = world.QUESTION_TYPES + world.EXTRA_QUESTION_TYPES


class GrownEmbedding(torch.nn.Module):
    """Frozen pretrained rows + trainable new rows: ids >= len(frozen) read `new`."""

    def __init__(self, frozen: torch.Tensor, new: torch.Tensor):
        super().__init__()
        self.register_buffer("frozen", frozen, persistent=False)
        self.new = torch.nn.Parameter(new.clone())

    def forward(self, ids):
        old = self.frozen.shape[0]
        base = torch.nn.functional.embedding(ids.clamp(max=old - 1), self.frozen)
        extra = self.new[(ids - old).clamp(min=0)]
        return torch.where((ids >= old).unsqueeze(-1), extra.to(base.dtype), base)

    def full_weight(self):
        return torch.cat([self.frozen, self.new])


def optimizer_step(model, embedding, inputs: dict, optimizer, trainable: list, lr: float, clip_norm: float,
                   device_type: str = "cpu", extra_loss=None) -> float:
    """One AdamW step on the answer loss at learning rate `lr` (bf16 autocast, gradients clipped
    to `clip_norm`) -> the loss. Both trainers' steps, so the two worlds train alike.
    extra_loss: called after the forward, its tensor is added (train_dense's attention loss)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = answer_loss(model, embedding, inputs)
        if extra_loss is not None:
            loss = loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
    optimizer.step()
    return loss.item()


def learning_rate(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def frames_for_step(step: int, steps: int, rng: np.random.Generator, frames: int = FRAMES,
                    curriculum: bool = True) -> int:
    fraction = step / max(1, steps)
    for end, count in CURRICULUM if curriculum else ():
        if fraction < end:
            return count if count else (2, 4)[int(rng.integers(2))]
    if rng.random() < MIX_SHORT:
        return (1, 2, 4)[int(rng.integers(3))]
    return frames


def video_metadata(num_frames: int, fps: float = FPS) -> dict:
    """What the SmolVLM2 adapter passes for a decoded `num_frames`-frame mp4 at `fps`."""
    return {"total_num_frames": num_frames, "fps": 1.0,
            "frames_indices": [i / fps for i in range(num_frames)], "duration": num_frames / fps}


def encode(processor, texts: list[str], videos: list[np.ndarray]):
    return dict(processor(
        text=texts, videos=[[v] for v in videos], video_metadata=[video_metadata(len(v)) for v in videos],
        do_sample_frames=False, padding=True, return_tensors="pt",
    ))


def answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels = input_ids on each assistant reply (after 'Assistant:' up to and including its
    <end_of_utterance>), -100 elsewhere."""
    marker = tokenizer("\nAssistant:", add_special_tokens=False)["input_ids"][1:]  # ['Ass', 'istant', ':']
    return reply_labels(input_ids, marker, tokenizer.convert_tokens_to_ids("<end_of_utterance>"))


def video_batch(rng, batch: int, num_frames: int, processor, emphasis: dict[str, float] | None = None):
    clips = [world.make_clip(rng, num_frames, extras=True) for _ in range(batch)]
    texts = [processor.apply_chat_template(conversation(world.training_chat(c, rng, emphasis))) for c in clips]
    inputs = encode(processor, texts, [c.frames for c in clips])
    inputs["labels"] = answer_labels(inputs["input_ids"], processor.tokenizer)
    return inputs


def answer_loss(model, embedding: GrownEmbedding, inputs: dict) -> torch.Tensor:
    """Cross-entropy on the labelled positions only (logits = hidden @ [frozen; new rows]^T)."""
    labels = inputs["labels"]
    out = model.model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs.get("pixel_attention_mask"),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, :-1]
    target = labels[:, 1:]
    chosen = target != -100
    logits = hidden[chosen].float() @ embedding.full_weight().t()
    if "label_weights" not in inputs:
        return torch.nn.functional.cross_entropy(logits, target[chosen])
    # a weighted mean: a type weighted 3 pulls on the gradient as three of its answers would
    weights = inputs["label_weights"][:, 1:][chosen]
    losses = torch.nn.functional.cross_entropy(logits, target[chosen], reduction="none")
    return (losses * weights).sum() / weights.sum()


@torch.no_grad()
def first_token_accuracy(model, embedding, processor, n_clips: int, seed: int = world.HELDOUT_SEED,
                         batch_size: int = 16) -> dict[str, float]:
    """Greedy first answer token == the answer's first token, per type, on held-out clips."""
    clips = world.heldout_clips(n_clips, seed, FRAMES, extras=True)
    tokenizer = processor.tokenizer
    weight = embedding.full_weight()
    correct, asked = {}, {}
    for kind in TYPES:
        prompt = processor.apply_chat_template(conversation([(world.SMOL_QUESTIONS[kind], None)]), add_generation_prompt=True)
        for begin in range(0, n_clips, batch_size):
            chunk = clips[begin : begin + batch_size]
            inputs = encode(processor, [prompt] * len(chunk), [c.frames for c in chunk])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  pixel_values=inputs["pixel_values"], use_cache=False)
            guess = (out.last_hidden_state[:, -1].float() @ weight.t()).argmax(-1).tolist()
            for g, clip in zip(guess, chunk):
                first = tokenizer(" " + clip.answers[kind], add_special_tokens=False)["input_ids"][0]
                correct[kind] = correct.get(kind, 0) + int(g == first)
                asked[kind] = asked.get(kind, 0) + 1
    result = {k: correct[k] / asked[k] for k in asked}
    result["overall"] = sum(correct.values()) / sum(asked.values())
    return result


def load_trained(model, embedding: GrownEmbedding, path: Path, new_targets: tuple[str, ...] = ()) -> None:
    """Start from a run's weights.safetensors (trained_state's keys) in the training layout:
    vision, connector and LoRA factors copied, the new token rows into `embedding.new`.
    new_targets: LoRA targets the file may lack (added by this run: they start at B = 0, so the
    model starts as the file's exactly)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = model.state_dict()

    def may_be_new(name):
        return any(f".{target}.lora_" in name for target in new_targets)

    missing = [name for name in own if (name.startswith(("model.vision_model.", "model.connector.")) or ".lora_" in name)
               and name not in state and not may_be_new(name)]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} trained tensors (e.g. {missing[0]}); not a train_smol weights file")
    with torch.no_grad():
        for name, tensor in state.items():
            if name == "new_token_rows":
                embedding.new.copy_(tensor)
            elif name.endswith("position_embedding.weight") and own[name].shape != tensor.shape:
                own[name].copy_(resized_position_table(tensor, own[name].shape[0]))
            else:
                own[name].copy_(tensor)


def resized_position_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A SigLIP position table (side*side rows, row-major patch grid) resized to `rows` rows by
    bicubic interpolation of the grid, so weights trained on one frame size start another: the
    dense world's frames are larger than the 8 x 16 world's, with the same 28 px per token."""
    old_side, new_side = math.isqrt(table.shape[0]), math.isqrt(rows)
    if old_side * old_side != table.shape[0] or new_side * new_side != rows:
        raise ValueError(f"position tables of {table.shape[0]} and {rows} rows are not square grids")
    grid = table.t().reshape(1, table.shape[1], old_side, old_side)
    grid = torch.nn.functional.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(table.shape[1], rows).t().to(table.dtype)


def save_weights(model, embedding: GrownEmbedding, out: Path) -> Path:
    from safetensors.torch import save_file

    state = trained_state(model)
    tmp = out / "weights.safetensors.tmp"
    save_file(state, str(tmp), metadata={"new_tokens": " ".join(NEW_TOKENS)})
    tmp.replace(out / "weights.safetensors")
    return out / "weights.safetensors"


# The oldest transformers whose SmolVLMProcessor keeps the assistant answers when it encodes a
# training chat: on 5.18 the answer words come out as empty tokens (checked by token diff), so
# the labels hold no answers. Evaluation and `vidqa ask` are not affected (no answers in them).
MIN_TRANSFORMERS = (5, 24)


class UnsupportedTransformers(RuntimeError):
    """The installed transformers cannot build correct training chats (MIN_TRANSFORMERS)."""


def transformers_too_old() -> bool:
    return tuple(int(part) for part in transformers_version().split(".")[:2]) < MIN_TRANSFORMERS


def check_transformers() -> None:
    if transformers_too_old():
        raise UnsupportedTransformers(f"training the SmolLM2 benchmark model needs transformers >= "
                           f"{'.'.join(map(str, MIN_TRANSFORMERS))} (found {transformers_version()}): older "
                           "SmolVLMProcessor releases drop the answers from the training chats")


def has_mlp_lora(weights: Path) -> bool:
    """Does this weights file carry LoRA factors on the MLPs (a --lora-mlp run's)?"""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return any(f".{target}.lora_" in name for name in f.keys() for target in MLP_LORA_TARGETS)


def trainable_model(seed: int, init: Path | None, image_size: int | None = None, lora_mlp: bool | None = False):
    """-> (model, embedding, processor, vision parameters, LoRA parameters) on the CPU: the
    SmolLM2 backbone frozen (its layers in bfloat16), the grown embedding, LoRA added, the small
    SigLIP, the connector and the LoRA trainable; `init` continues from trained weights.
    image_size: the frames' side (default: the 8 x 16 world's); lora_mlp: LoRA on the MLPs'
    projections too (MLP_LORA_TARGETS; an `init` without them starts them at zero; None: as `init` has them)."""
    if lora_mlp is None:
        lora_mlp = init is not None and has_mlp_lora(Path(init))
    llm_dir = converted_llm()
    sized = {} if image_size is None else {"image_size": image_size}
    processor = build_processor(build_tokenizer(llm_dir), **sized)
    model = build_model(llm_dir, processor.tokenizer, seed=seed, **sized)
    for p in model.parameters():
        p.requires_grad_(False)
    text_model = model.model.text_model
    text_model.layers.to(torch.bfloat16)  # frozen: cast once, not on every step under autocast
    weight = text_model.embed_tokens.weight.detach()
    old = weight.shape[0] - len(NEW_TOKENS)
    embedding = GrownEmbedding(weight[:old].clone(), weight[old:].clone())
    text_model.embed_tokens = embedding
    torch.manual_seed(seed)
    extra = MLP_LORA_TARGETS if lora_mlp else ()
    add_lora(model, LORA_TARGETS + extra)
    if init is not None:
        load_trained(model, embedding, Path(init), new_targets=extra)
    vision = [p for n, p in model.named_parameters() if n.startswith(("model.vision_model.", "model.connector."))]
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in vision + lora:
        p.requires_grad_(True)
    return model, embedding, processor, vision, lora


def train(out, *, seed: int = 0, steps: int = 1400, batch: int = 6, lr: float = 1e-3, warmup: int = 30,
          weight_decay: float = 0.01, clip_norm: float = 1.0, eval_every: int = 200, eval_clips: int = 32,
          save_every: int = 50, log_every: int = 10, threads: int | None = 2, init: Path | None = None,
          stop_after: int | None = None, emphasis: dict[str, float] | None = None, log=print) -> dict:
    check_transformers()
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    model, embedding, processor, vision, lora = trainable_model(seed, init)
    decay = [p for p in vision if p.dim() >= 2]
    no_decay = [p for p in vision if p.dim() < 2] + lora + [embedding.new]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    trainable = decay + no_decay
    log(f"smol model: {sum(p.numel() for p in trainable):,} trained parameters; seed {seed}, {steps} steps, "
        f"batch {batch}, setup {time.time() - began:.0f}s", flush=True)
    # A continuation (--init) draws from its own stream, so it does not replay the first run's clips.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,) if init else (1,)))
    history: list[dict] = []
    record = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
              "clip_norm": clip_norm, "curriculum": CURRICULUM, "mix_short": MIX_SHORT, "frames": FRAMES,
              "threads": threads, "init": str(init) if init else None, "stop_after": stop_after,
              "emphasis": emphasis,
              "history": history}
    model.train()
    running, count, t0 = 0.0, 0, time.time()
    for step in range(min(steps, stop_after or steps)):
        num_frames = frames_for_step(step, steps, rng, curriculum=init is None)
        inputs = video_batch(rng, batch, num_frames, processor, emphasis)
        loss = optimizer_step(model, embedding, inputs, optimizer, trainable,
                              learning_rate(step, steps, lr, warmup), clip_norm)
        running, count = running + loss, count + 1
        last = step == min(steps, stop_after or steps) - 1
        if (step + 1) % log_every == 0 or last:
            log(f"step {step + 1}/{steps} frames {num_frames} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"loss {running / count:.4f} elapsed {time.time() - t0:.0f}s", flush=True)
            history.append({"step": step + 1, "loss": round(running / count, 5), "elapsed_s": round(time.time() - t0, 1)})
            running, count = 0.0, 0
        if (step + 1) % save_every == 0 or last:
            save_weights(model, embedding, out)
            record.update(steps_done=step + 1, train_s=round(time.time() - t0, 1))
            (out / "smol_train.json").write_text(json.dumps(record, indent=1) + "\n")
        if eval_every and eval_clips and ((step + 1) % eval_every == 0 or last):
            model.eval()
            accuracy = first_token_accuracy(model, embedding, processor, eval_clips)
            model.train()
            log(f"eval step {step + 1} ({eval_clips} held-out clips, first token): "
                + " ".join(f"{k}={v:.2f}" for k, v in accuracy.items()), flush=True)
            history.append({"step": step + 1, "eval_first_token": accuracy})
            (out / "smol_train.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def parse_emphasis(text: str | None) -> dict[str, float] | None:
    """'direction=2,background_change=3' -> {'direction': 2.0, 'background_change': 3.0}."""
    return parse_type_weights(text, set(world.SMOL_QUESTIONS) | set(world.AUX_QUESTIONS), "--emphasis")


def parse_type_weights(text: str | None, known: set[str], flag: str) -> dict[str, float] | None:
    """'TYPE=W,...' over the question types `known` -> {type: weight > 0}; ValueError naming `flag`."""
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        kind, _, value = item.partition("=")
        kind = kind.strip()
        if kind not in known:
            raise ValueError(f"{flag}: unknown question type '{kind}' (one of: {', '.join(sorted(known))})")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: '{item}' is not TYPE=WEIGHT") from None
        if weights[kind] <= 0:
            raise ValueError(f"{flag}: the weight of '{kind}' must be > 0")
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microworld.train_smol", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for weights.safetensors + smol_train.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this weights.safetensors: no curriculum (8-frame phase throughout), "
                             "fresh optimizer and schedule, a clip stream of its own")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps, the schedule still laid out for --steps")
    parser.add_argument("--emphasis", default=None, metavar="TYPE=W,...",
                        help="weight question types within their group, e.g. direction=2,background_change=3 "
                             "(default: uniform)")
    args = parser.parse_args(argv)
    try:
        emphasis = parse_emphasis(args.emphasis)
    except ValueError as error:
        parser.error(str(error))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from microworld.smol import MissingGGUF

    try:
        train(args.out, seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
              eval_every=args.eval_every, eval_clips=args.eval_clips, save_every=args.save_every,
              log_every=args.log_every, threads=args.threads, init=args.init, stop_after=args.stop_after,
              emphasis=emphasis)
    except (MissingGGUF, UnsupportedTransformers) as error:  # a torch RuntimeError keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
