"""Train the micro LLaVA-OneVision from scratch on the synthetic world, on CPU.

    python -m microworld.train --out DIR --seed S [--steps 3900 --batch 16 ...]

Recipe (what made the prototype work; benchmarks/micro/README.md tells the story):
- AdamW (betas 0.9/0.98, weight decay 0.01 on matrices), lr 2e-3, 150 linear warm-up steps,
  cosine to 0.1x, grad-norm clip 1.0, batch 16, loss only on the answer tokens (answer word +
  <|im_end|>).
- Steps [0, text_steps): text-only chats teaching "repeat the last word before ?", so the
  answer position learns to read the question's last word ("start" vs "end").
- Then a curriculum over the remaining steps: single frames (25%: where the square is takes
  ~700 single-frame steps to learn), 2-frame clips (10%), 4-frame clips (13%), then 8-frame
  clips with a quarter of the batches 1/2/4-frame clips.
- `mix_text` (default 0): a share of text-only batches after the warm-up as well. An experiment
  on seeds that stop reading "start" / "end" (benchmarks/micro/README.md); not in the recipe of
  the committed checkpoint.
- Every training clip is one multi-turn chat asking one question per group of mutually
  constraining questions (world.GROUPS, including the training-only "where is the square at the
  start / end ?" stepping stones for direction); the video sits in the first user turn.
- Inputs are built with the checkpoint's own LlavaOnevisionProcessor (frames in memory).

The checkpoint (model in float16 + processor + chat template) is written with save_pretrained
at the end, then evaluated from disk on held-out clips; `micro_train.json` in the same directory
records the arguments, the wall time and that evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from microworld import world
from microworld.chat import conversation, reply_labels
from microworld.model import build_micro_model, save_checkpoint, size_dict

TEXT_WORDS = tuple(w for w in world.VOCABULARY if w not in ("?", ".", ","))
CURRICULUM = ((0.25, 1), (0.35, 2), (0.48, 4))  # (end fraction of the video steps, frames)
MIX_SHORT = 0.25  # after the curriculum: share of batches with 1/2/4-frame clips


def learning_rate(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine down to floor * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def frames_for_step(
    step: int, steps: int, text_steps: int, rng: np.random.Generator, mix_text: float = 0.0
) -> int:
    """0 = a text-only batch; else the clip length of this step's batch. mix_text: share of
    text-only batches after the warm-up (0 draws nothing, so the seed-0 recipe is unchanged)."""
    if step < text_steps:
        return 0
    if mix_text and rng.random() < mix_text:
        return 0
    fraction = (step - text_steps) / max(1, steps - text_steps)
    for end, frames in CURRICULUM:
        if fraction < end:
            return frames
    if rng.random() < MIX_SHORT:
        return (1, 2, 4)[int(rng.integers(3))]
    return world.NUM_FRAMES


def answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels = input_ids on each assistant reply (after '<|im_start|> assistant', up to and
    including its '<|im_end|>'), -100 everywhere else."""
    marker = tokenizer.convert_tokens_to_ids(["<|im_start|>", "assistant"])
    return reply_labels(input_ids, marker, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def text_batch(rng: np.random.Generator, batch: int, processor, turns: int = 4):
    """Text-only chats: each question is a word string ending in '?' (random words, or a real
    question template); the answer is the last word before the '?'."""
    templates = list(world.ALL_QUESTIONS.values())
    texts = []
    for _ in range(batch):
        chat = []
        for _ in range(turns):
            if rng.random() < 0.5:
                words = [TEXT_WORDS[int(i)] for i in rng.integers(len(TEXT_WORDS), size=int(rng.integers(2, 10)))]
                question = " ".join(words) + " ?"
            else:
                question = templates[int(rng.integers(len(templates)))]
            chat.append((question, question.split()[-2]))
        texts.append(processor.apply_chat_template(conversation(chat, video=False)))
    inputs = processor.tokenizer(texts, padding=True, return_tensors="pt")
    inputs = dict(inputs)
    inputs["labels"] = answer_labels(inputs["input_ids"], processor.tokenizer)
    return inputs


def video_batch(rng: np.random.Generator, batch: int, num_frames: int, processor):
    """`batch` fresh clips of `num_frames` frames, each as one multi-turn chat."""
    clips = [world.make_clip(rng, num_frames) for _ in range(batch)]
    texts = [processor.apply_chat_template(conversation(world.training_chat(c, rng))) for c in clips]
    inputs = dict(processor(text=texts, videos=[c.frames for c in clips], padding=True, return_tensors="pt"))
    inputs["labels"] = answer_labels(inputs["input_ids"], processor.tokenizer)
    return inputs


def _load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype).eval()
    return model, processor


@torch.no_grad()
def evaluate(
    model_dir=None,
    n_clips: int = 480,
    seed: int = world.HELDOUT_SEED,
    *,
    model=None,
    processor=None,
    num_frames: int = world.NUM_FRAMES,
    from_mp4: bool = False,
    batch_size: int = 16,
    question_types: tuple[str, ...] = world.QUESTION_TYPES,
) -> dict[str, float]:
    """Accuracy per question type on held-out clips 0..n_clips-1 of `seed` -> {type: accuracy,
    ..., "overall": mean over all answers}.

    Loads `model_dir` in float32 (or uses `model` + `processor`). Each question is asked alone,
    in a single-turn chat with the video, exactly as `vidqa ask` builds it; the answer is greedy
    `model.generate` output (exact match after stripping). Prompts of one batch share one
    question, so they have the same length and need no padding. from_mp4: write each clip to an
    mp4 and decode it with vidqa.video.decode.load_clip (the CLI's path; lossy codec) instead of using
    the generated frames.
    """
    if model is None:
        model, processor = _load(model_dir)
    was_training = model.training
    model.eval()
    clips = world.heldout_clips(n_clips, seed, num_frames)
    videos = [c.frames for c in clips]
    if from_mp4:
        from vidqa.video.decode import load_clip

        with tempfile.TemporaryDirectory() as tmp:
            videos = []
            for i, clip in enumerate(clips):
                path = world.write_clip(Path(tmp) / f"clip{i}.mp4", clip)
                videos.append(load_clip(path, num_frames=num_frames).frames)
    correct: dict[str, int] = {}
    asked: dict[str, int] = {}
    for kind in question_types:  # QUESTION_TYPES, or also world.AUX_QUESTIONS types
        question = world.ALL_QUESTIONS[kind]
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        truth = [{**c.answers, **c.aux_answers} for c in clips]
        items = [(v, t[kind]) for v, t in zip(videos, truth) if kind in t]
        for begin in range(0, len(items), batch_size):
            chunk = items[begin : begin + batch_size]
            inputs = processor(text=[prompt] * len(chunk), videos=[v for v, _ in chunk], return_tensors="pt")
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
            output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            new = output[:, inputs["input_ids"].shape[1] :]
            replies = processor.batch_decode(new, skip_special_tokens=True)
            for reply, (_, answer) in zip(replies, chunk):
                correct[kind] = correct.get(kind, 0) + int(reply.strip() == answer)
                asked[kind] = asked.get(kind, 0) + 1
    if was_training:
        model.train()
    result = {kind: correct[kind] / asked[kind] for kind in asked}
    result["overall"] = sum(correct.values()) / max(1, sum(asked.values()))
    return result


def format_accuracy(result: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in result.items())


def train(
    out: str | Path,
    *,
    seed: int = 0,
    steps: int = 3900,
    batch: int = 16,
    lr: float = 2e-3,
    warmup: int = 150,
    text_steps: int = 300,
    mix_text: float = 0.0,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    eval_every: int = 500,
    eval_clips: int = 48,
    final_eval_clips: int = 480,
    log_every: int = 50,
    threads: int | None = 2,
    log=print,
) -> dict:
    """Train, save the checkpoint under `out`, evaluate it from disk -> the summary record."""
    if threads:
        torch.set_num_threads(threads)
    began = time.time()
    model, processor = build_micro_model(seed)
    model.train()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))  # not a held-out stream
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )
    log(f"micro model: {sum(p.numel() for p in model.parameters()):,} parameters; seed {seed}, "
        f"{steps} steps, batch {batch}, text warm-up {text_steps} steps", flush=True)
    history = []
    running, count = 0.0, 0
    for step in range(steps):
        num_frames = frames_for_step(step, steps, text_steps, rng, mix_text)
        inputs = text_batch(rng, batch, processor) if num_frames == 0 else video_batch(rng, batch, num_frames, processor)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        running, count = running + loss.item(), count + 1
        last = step == steps - 1
        if (step + 1) % log_every == 0 or last:
            log(f"step {step + 1}/{steps} frames {num_frames} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"loss {running / count:.4f} elapsed {time.time() - began:.0f}s", flush=True)
            history.append({"step": step + 1, "loss": running / count})
            running, count = 0.0, 0
        if eval_every and eval_clips and ((step + 1) % eval_every == 0) and not last and step + 1 > text_steps:
            accuracy = evaluate(n_clips=eval_clips, model=model, processor=processor,
                                question_types=world.QUESTION_TYPES + tuple(world.AUX_QUESTIONS))
            log(f"eval step {step + 1} ({eval_clips} held-out clips): {format_accuracy(accuracy)}", flush=True)
            history.append({"step": step + 1, "eval": accuracy})
    train_s = time.time() - began
    out = save_checkpoint(model, processor, out)
    log(f"saved {out} (float16) after {train_s:.0f}s of training", flush=True)
    summary = {
        "seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "text_steps": text_steps,
        "mix_text": mix_text, "weight_decay": weight_decay, "clip_norm": clip_norm, "curriculum": CURRICULUM, "mix_short": MIX_SHORT,
        "size": size_dict(), "parameters": sum(p.numel() for p in model.parameters()),
        "threads": threads, "train_s": round(train_s, 1), "history": history,
    }
    if final_eval_clips:
        t0 = time.time()
        accuracy = evaluate(out, n_clips=final_eval_clips)
        log(f"final eval ({final_eval_clips} held-out clips, seed {world.HELDOUT_SEED}, from the saved "
            f"checkpoint): {format_accuracy(accuracy)} [{time.time() - t0:.0f}s]", flush=True)
        summary["final_eval"] = {"n_clips": final_eval_clips, "seed": world.HELDOUT_SEED, "accuracy": accuracy}
    (Path(out) / "micro_train.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microworld.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3900)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=150, help="linear lr warm-up steps")
    parser.add_argument("--text-steps", type=int, default=300, help="text-only 'repeat the last word' steps")
    parser.add_argument("--mix-text", type=float, default=0.0,
                        help="share of text-only batches after the warm-up (default 0, the seed-0 recipe)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-clips", type=int, default=48, help="held-out clips per periodic eval")
    parser.add_argument("--final-eval-clips", type=int, default=480)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.mix_text < 1.0:
        parser.error(f"--mix-text {args.mix_text}: must be a share in [0, 1), e.g. 0.1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = train(
        args.out, seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
        text_steps=args.text_steps, mix_text=args.mix_text, eval_every=args.eval_every, eval_clips=args.eval_clips,
        final_eval_clips=args.final_eval_clips, log_every=args.log_every, threads=args.threads,
    )
    final = summary.get("final_eval", {}).get("accuracy")
    if final:
        print(json.dumps(final), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
