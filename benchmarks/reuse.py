"""How much prefill does reusing the video's prefix save when one video is asked many questions?

For one model and one clip (default: the bench model of benchmarks/prefill.py, 32 frames), asks
N questions (default 8) under `none` and pre-LLM presets (default evs and vidcom2 at --keep),
each twice through `vidqa.engine.session.VideoSession`: with reuse (the video prefix prefilled once,
every question generated from its KV cache) and without (every question prefilled in full; the
clip is encoded once in both modes, so the difference is the LLM prefill). Reports per
configuration and mode:

- total prefill: the sum over the questions of the LLM prefill each paid (with reuse: the one
  video-prefix prefill + every question's own rows);
- time to first token per question: preprocessing + vision encoder + pre-LLM pruning + prefill
  paid by that request (the first question with reuse pays the video's prefill);
- whether the answers of the two modes are identical (greedy; they must be).

    python benchmarks/reuse.py --threads 2                               # CPU, bench model
    python benchmarks/reuse.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --device cuda

Writes results.json and table.md to --out and prints the table. Measures, never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # run from a checkout without installing; prefill.py's helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

QUESTIONS = (
    "what happens in this video ?",
    "which way does the square move , left or right ?",
    "what colour is the square ?",
    "is there a circle in the video ?",
    "does the background change ?",
    "what is on the left ?",
    "what moves at the start ?",
    "what is in the last frame ?",
)


def ttft(stats) -> float:
    """Time to first token of one request with the clip already decoded."""
    time = stats.time
    return time.preprocess_s + time.vision_encoder_s + time.pruning_s + time.video_prefill_s + time.prefill_s


def run_mode(adapter, clip, pruner, questions, reuse: bool, decode_tokens: int) -> dict:
    from vidqa.engine import request as engine
    from vidqa.engine.session import VideoSession

    session = VideoSession(adapter, clip, pruner, engine.GenerationOptions(max_new_tokens=decode_tokens), reuse=reuse)
    answers, prefill, first_token, reused = [], [], [], []
    for question in questions:
        result = session.ask(question)
        answers.append(result.text)
        prefill.append(result.stats.time.prefill_s + result.stats.time.video_prefill_s)
        first_token.append(ttft(result.stats))
        reused.append(result.stats.prefix_reused)
    return {"answers": answers, "prefill_s": prefill, "ttft_s": first_token, "prefix_reused": reused,
            "total_prefill_s": sum(prefill)}


def measure(adapter, clip, questions, presets, keep, decode_tokens, repeats, log=print) -> list[dict]:
    """Modes alternate (without, with) per repeat so drift on a shared machine hits both alike;
    the repeat with the smallest total prefill is kept per mode."""
    from vidqa.pruning.core.presets import build_pruner, load_preset

    rows = []
    for name in presets:
        preset = load_preset(name)
        pruner = build_pruner(preset, adapter, keep=None if name == "none" else keep)
        best: dict[bool, dict] = {}
        for _ in range(repeats):
            for reuse in (False, True):
                run = run_mode(adapter, clip, pruner, questions, reuse, decode_tokens)
                if reuse not in best or run["total_prefill_s"] < best[reuse]["total_prefill_s"]:
                    best[reuse] = run
        full, reused = best[False], best[True]
        row = {
            "preset": name, "keep": None if name == "none" else keep, "questions": len(questions),
            "total_prefill_full_s": full["total_prefill_s"], "total_prefill_reuse_s": reused["total_prefill_s"],
            "prefill_ratio": full["total_prefill_s"] / max(reused["total_prefill_s"], 1e-12),
            "ttft_full_s": full["ttft_s"], "ttft_reuse_s": reused["ttft_s"],
            "prefix_reused": reused["prefix_reused"],
            "identical_answers": full["answers"] == reused["answers"],
        }
        log(f"{name}: prefill {row['total_prefill_full_s']:.3f} s -> {row['total_prefill_reuse_s']:.3f} s "
            f"({row['prefill_ratio']:.1f}x), identical answers: {row['identical_answers']}")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    def ms(values):
        return " / ".join(f"{v * 1000:.0f}" for v in values)

    lines = [
        "| preset | keep | total prefill, full (s) | total prefill, reuse (s) | saved | TTFT per question, full (ms) | TTFT per question, reuse (ms) | same answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        keep = "" if row["keep"] is None else f"{row['keep']:g}"
        lines.append(
            f"| {row['preset']} | {keep} | {row['total_prefill_full_s']:.3f} | {row['total_prefill_reuse_s']:.3f} | "
            f"{row['prefill_ratio']:.1f}x | {ms(row['ttft_full_s'])} | {ms(row['ttft_reuse_s'])} | "
            f"{'yes' if row['identical_answers'] else 'NO'} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the bench model of benchmarks/prefill.py)")
    parser.add_argument("--video", help="video file (default: the bench clip of benchmarks/prefill.py)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"how many questions, at most {len(QUESTIONS)}")
    parser.add_argument("--presets", default="none,evs,vidcom2", help="none and/or pre-LLM presets, comma-separated")
    parser.add_argument("--keep", type=float, default=0.25, help="--keep for the presets other than none")
    parser.add_argument("--decode-tokens", type=int, default=2, help="tokens generated per question")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--workdir", default=os.environ.get("VIDQA_BENCH_DIR", "~/.cache/vidqa-bench"))
    parser.add_argument("--out", default="bench-reuse")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    import prefill as prefill_bench  # benchmarks/prefill.py: the bench model, clip and machine info

    from vidqa.models import load_model
    from vidqa.video.decode import load_clip

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, flush=True, **k))
    workdir = Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_id = args.model or str(prefill_bench.bench_model_dir(workdir))
    adapter = load_model(model_id, device=args.device, dtype=args.dtype, attn=args.attn)
    adapter.model.generation_config.min_new_tokens = args.decode_tokens  # a random model may stop at once
    size = getattr(getattr(adapter.model.config, "vision_config", None), "image_size", None) or 384
    video = args.video or str(prefill_bench.bench_clip_path(workdir, size))
    clip = load_clip(video, num_frames=args.frames)
    questions = list(QUESTIONS[: max(1, min(args.questions, len(QUESTIONS)))])
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    log(f"model {model_id} on {adapter.model.device}, {clip.num_frames} frames, {len(questions)} questions, "
        f"{torch.get_num_threads()} threads")
    rows = measure(adapter, clip, questions, presets, args.keep, args.decode_tokens, args.repeats, log=log)
    table = markdown_table(rows)
    results = {
        "model": model_id if args.model else "bench model (random weights, Qwen2-0.5B text dimensions)",
        "device": str(adapter.model.device), "dtype": str(adapter.model.dtype).removeprefix("torch."),
        "frames": clip.num_frames, "questions": questions, "decode_tokens": args.decode_tokens,
        "repeats": args.repeats, "machine": prefill_bench.machine(), "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
