"""Long videos in bounded memory (issue 31; docs/benchmarks.md, "Long videos").

(a) The peak memory and time of one request with EVS at keep 0.05 (compact positions) at 64,
    256 and 1,024 frames of the bundled micro model (LLaVA-OneVision layout, 16 tokens a frame),
    one-shot (--chunk-frames left out: 64 frames decode in one piece, more stream) and streamed
    at every count. Goal: the peak at 1,024 frames <= 1.25x the peak at 64.
(b) A generated 60-minute 480p video (OpenCV, written to a temporary directory, never kept)
    answered end to end with `--model micro --fps 0.5 --keep auto`: 1,800 frames.

Each measurement runs in a fresh process, after one small warm-up request (the first request's
one-time set-up is not the video's). Peak memory: the Linux RSS high-water mark, reset when the
call starts and read when it ends (`engine.stats.RequestMemory`), around the whole `Model.ask`
with the video's path, so decoding counts for both paths (a one-shot request decodes before its
own `Stats` start; the streamed one inside). RSS is what the process holds: the honest peak on
CPU, including memory the C allocator keeps after a free.

    python benchmarks/long_video.py                 # both parts, the full sizes
    python benchmarks/long_video.py --quick         # small sizes: proves the script works
    python benchmarks/long_video.py --part frames --frames 64 256 1024
    python benchmarks/long_video.py --part hour --minutes 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

MIB = 2**20

MEASURE = textwrap.dedent("""
    import json, os, sys, time
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vidqa import api
    from vidqa.engine.stats import RequestMemory
    video, options = sys.argv[1], json.loads(sys.argv[2])
    warm_up = options.pop("warm_up")
    options["params"] = tuple(options.get("params", ()))  # Settings are hashable
    model = api.open_model(api.Settings(model="micro", device="cpu"))
    model.ask(video, "what happens ?", **{**options, **warm_up})
    memory = RequestMemory("cpu").start()
    started = time.perf_counter()
    result = model.ask(video, "what happens ?", **options)
    seconds = time.perf_counter() - started
    above, total, kind = memory.stop()
    tokens, fit = result.stats.tokens, result.answer.details.get("fit")
    print(json.dumps({"peak_bytes": above, "peak_total_bytes": total, "kind": kind, "seconds": seconds,
                      "frames": tokens.frames, "visual_tokens": tokens.visual_tokens_before,
                      "kept": tokens.visual_tokens_after, "llm_prompt_tokens": tokens.llm_prompt_tokens,
                      "time": result.stats.time.__dict__, "fit": fit, "answer": result.text,
                      "notes": result.notes}))
""")


def measure(video: Path, options: dict) -> dict:
    """One request in a fresh process -> its measurements."""
    run = subprocess.run([sys.executable, "-c", MEASURE, str(video), json.dumps(options)], capture_output=True,
                         text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if run.returncode != 0:
        raise SystemExit(f"the measured request failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def write_video(path: Path, seconds: float, fps: float, size: tuple[int, int]) -> Path:
    """A moving-square video of `seconds` at `fps`, `size` = (width, height), written with OpenCV
    frame by frame (never held in memory)."""
    import cv2
    import numpy as np

    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    total = int(seconds * fps)
    side = height // 6
    for index in range(total):
        frame[:] = (40, 40, 40)
        x = int((width - side) * (index % 600) / 600)
        colour = (0, 0, 255) if (index // 600) % 2 else (255, 0, 0)
        frame[height // 2 - side // 2:height // 2 + side // 2, x:x + side] = colour
        writer.write(frame)
    writer.release()
    return path


def frames_part(directory: Path, counts: list[int]) -> list[dict]:
    video = write_video(directory / "frames.mp4", seconds=max(counts) / 8 + 2, fps=8.0, size=(112, 112))
    rows = []
    warm = {"frames": 8}
    base = {"prune": "evs", "keep": 0.05, "params": ["positions=compact"], "max_new_tokens": 4}
    for count in counts:
        for mode, chunk in (("default", None), ("streamed", 16)):
            options = {**base, "frames": count, "chunk_frames": chunk, "warm_up": warm}
            result = measure(video, options)
            rows.append({"part": "frames", "mode": mode, **result})
            print(f"{count:>6} frames  {mode:<9} peak {result['peak_bytes'] / MIB:7.1f} MiB  "
                  f"{result['seconds']:7.2f} s  kept {result['kept']:>6} of {result['visual_tokens']}", flush=True)
    first = next(row for row in rows if row["frames"] == counts[0] and row["mode"] == "default")
    last = next(row for row in rows if row["frames"] == counts[-1] and row["mode"] == "default")
    ratio = last["peak_bytes"] / max(first["peak_bytes"], 1)
    print(f"peak at {counts[-1]} frames / peak at {counts[0]}: {ratio:.2f}x (goal <= 1.25x)")
    return rows


def hour_part(directory: Path, minutes: float, size: tuple[int, int]) -> dict:
    video = write_video(directory / "hour.mp4", seconds=minutes * 60, fps=10.0, size=size)
    options = {"fps": 0.5, "keep": "auto", "max_new_tokens": 8, "warm_up": {"fps": None, "frames": 8, "keep": None}}
    result = measure(video, options)
    print(f"{minutes:g} min {size[0]}x{size[1]} at --fps 0.5 --keep auto: {result['frames']} frames, "
          f"{result['visual_tokens']} visual tokens, {result['kept']} kept, peak {result['peak_bytes'] / MIB:.1f} MiB, "
          f"{result['seconds']:.1f} s")
    times = result["time"]
    print("  " + ", ".join(f"{key} {value:.2f}" for key, value in times.items() if key.endswith("_s") and value))
    print(f"  fit: {result['fit']}")
    print(f"  answer: {result['answer']!r}")
    return {"part": "hour", "minutes": minutes, "size": list(size), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("frames", "hour", "both"), default="both")
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--size", type=int, nargs=2, default=[854, 480], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--quick", action="store_true", help="small sizes (16/64 frames, a 2-minute 240p video)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.minutes, args.size = [16, 64], 2.0, [426, 240]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vidqa-long-") as directory:
        if args.part in ("frames", "both"):
            rows += frames_part(Path(directory), args.frames)
        if args.part in ("hour", "both"):
            rows.append(hour_part(Path(directory), args.minutes, tuple(args.size)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
