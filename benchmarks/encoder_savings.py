"""What pruning before and inside the vision encoder saves of a whole request (issue #35's CPU goal).

Every preset before this round acted after the vision encoder, and on a CPU the encoder (a real
SigLIP-so400m, 26 layers at 384 px) is most of a LLaVA-OneVision-0.5B request. This benchmark
times whole requests, from the video file to the 16th answer token, through the public API on
the bench model with real dimensions (SigLIP-so400m + Qwen2-0.5B, random weights: `--bench-dims
qwen2-0.5b-so400m` of benchmarks/prefill.py), for:

- `none`, and `evs` (the best pre-LLM preset of the earlier rounds: it prunes after the encoder);
- `earlytom` (frames merged inside the encoder), `dedup` (near-duplicate frames dropped before
  the processor), and the two composed, `dedup+earlytom`, and `dedup+evs`;

on two generated clips: one of static shots with a moving passage between them (a lecture, a
surveillance camera), one where every frame moves (the prefill benchmark's clip). It reports each
phase, the end-to-end time over `none`'s, and how many frames each stage left: the frames dedup
kept, the frames EarlyTom's merges left for the encoder's last layer.

    python benchmarks/encoder_savings.py --threads 2                  # 8 and 32 frames, both clips
    python benchmarks/encoder_savings.py --frames 8 --repeats 1 --quick
    python benchmarks/encoder_savings.py --bench-dims qwen2-7b --device cuda --frames 32   # the GPU goal (TTFT)

Measures, never asserts; run it alone on a quiet machine and record the load (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from prefill import QUESTION, bench_frames, bench_model_dir, machine  # noqa: E402

PRESETS = ("none", "evs", "earlytom", "dedup", "dedup+earlytom", "dedup+evs")
PHASES = ("video_decode_s", "preprocess_s", "vision_encoder_s", "pruning_s", "prefill_s", "decode_s", "total_s")
SOURCE_FRAMES = 96  # frames written per clip: any --frames up to this samples distinct frames


def static_shot_frames(num_frames: int = SOURCE_FRAMES, size: int = 384, seed: int = 1) -> np.ndarray:
    """A still shot (40% of the clip), a moving passage (20%), another still shot (40%): each
    still shot is one picture with light sensor noise, as a fixed camera records it."""
    moving = bench_frames(num_frames=num_frames, size=size, seed=seed)
    rng = np.random.default_rng(seed)
    first, second = moving[0].astype(np.float32), moving[-1][:, ::-1].astype(np.float32)  # two distinct stills
    frames = moving.copy()
    still = round(num_frames * 0.4)
    for index in list(range(still)) + list(range(num_frames - still, num_frames)):
        picture = first if index < still else second
        frames[index] = np.clip(np.round(picture + rng.normal(0.0, 2.0, picture.shape)), 0, 255).astype(np.uint8)
    return frames


def clip_path(workdir: Path, kind: str, size: int) -> Path:
    from vidqa.testing.videos import write_video

    path = workdir / f"encoder-savings-{kind}-{size}px.mp4"
    if not path.exists():
        frames = static_shot_frames(size=size) if kind == "static-shots" else bench_frames(SOURCE_FRAMES, size)
        write_video(path, frames, fps=8.0)
    return path


def frames_left(answer) -> dict:
    """The frames each stage left: dedup's kept frames, the encoder's last layer's frames."""
    selection = answer.answer.details.get("frame_selection")  # api.Result -> engine Answer
    per_layer = answer.stats.tokens.encoder_frames_per_layer
    return {"frames_encoded": answer.stats.tokens.frames,
            "frames_decoded": selection["frames_in"] if selection else answer.stats.tokens.frames,
            "frames_after_encoder": per_layer[-1] if per_layer else answer.stats.tokens.frames}


def measure(model, video: Path, frames: int, tokens: int, keep: float, repeats: int, warmup: int, log,
            presets=PRESETS) -> list[dict]:
    samples: dict[str, list] = {preset: [] for preset in presets}
    for round_index in range(warmup + repeats):
        for preset in presets:  # interleaved, so drift hits every preset alike
            budget = None if preset in ("none", "dedup") else keep
            settings = model.settings.replace(frames=frames, prune=preset, keep=budget, max_new_tokens=tokens)
            answer = model.ask(video, QUESTION, settings)
            if round_index >= warmup:
                samples[preset].append(answer)
        log(f"  round {round_index + 1}/{warmup + repeats}")
    rows = []
    for preset, answers in samples.items():
        row = {"preset": preset, "keep": None if preset in ("none", "dedup") else keep}
        for phase in PHASES:
            row[phase] = statistics.median(getattr(a.stats.time, phase) for a in answers)
        row["ttft_s"] = statistics.median(a.stats.time.total_s - a.stats.time.decode_s for a in answers)
        row["generated_tokens"] = min(a.stats.tokens.generated_tokens for a in answers)
        row["visual_tokens"] = f"{answers[0].stats.tokens.visual_tokens_before} -> {answers[0].stats.tokens.visual_tokens_after}"
        row.update(frames_left(answers[0]))
        rows.append(row)
    base = next(row for row in rows if row["preset"] == "none")
    for row in rows:
        row["total_over_none"] = row["total_s"] / base["total_s"]
        row["ttft_over_none"] = row["ttft_s"] / base["ttft_s"]
    return rows


def table(results: list[dict]) -> str:
    lines = ["| clip | frames | preset | total s | x none | TTFT s | x none | preprocess s | encoder s | prefill s "
             "| frames encoded | frames after encoder | visual tokens |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for result in results:
        for row in result["rows"]:
            lines.append(
                f"| {result['clip']} | {result['frames']} | {row['preset']} | {row['total_s']:.2f} | "
                f"{row['total_over_none']:.2f} | {row['ttft_s']:.3f} | {row['ttft_over_none']:.2f} | "
                f"{row['preprocess_s']:.3f} | {row['vision_encoder_s']:.3f} | "
                f"{row['prefill_s']:.3f} | {row['frames_encoded']} of {row['frames_decoded']} | "
                f"{row['frames_after_encoder']} | {row['visual_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="8,32", help="frame counts, comma-separated")
    parser.add_argument("--clips", default="static-shots,moving")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="the 0.5B bench model's tiny tower (a smoke run)")
    parser.add_argument("--bench-dims", default="qwen2-0.5b-so400m", help="the bench model (benchmarks/prefill.py BENCH_DIMS)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "vidqa-bench")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vidqa import api

    def log(text):
        print(text, file=sys.stderr, flush=True)

    args.workdir.mkdir(parents=True, exist_ok=True)
    dims = "qwen2-0.5b" if args.quick else args.bench_dims
    presets = [p for p in args.presets.split(",") if p]
    if "none" not in presets:
        presets.insert(0, "none")  # the base of the ratios
    dtype = "float32" if args.device == "cpu" else "auto"
    model = api.open_model(api.Settings(model=str(bench_model_dir(args.workdir, dims)), device=args.device,
                                        dtype=dtype, max_new_tokens=args.tokens, decode="auto"))
    results = []
    for kind in [c for c in args.clips.split(",") if c]:
        video = clip_path(args.workdir, kind, 384)
        for frames in [int(f) for f in args.frames.split(",") if f]:
            log(f"{kind}, {frames} frames")
            rows = measure(model, video, frames, args.tokens, args.keep, args.repeats, args.warmup, log, presets)
            results.append({"clip": kind, "frames": frames, "rows": rows})
    print(table(results))
    print(f"\nmachine: {json.dumps(machine())}; bench model: {dims} dimensions, random weights; "
          f"{args.tokens} answer tokens; median of {args.repeats} after {args.warmup} warm-up")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "dims": dims, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
