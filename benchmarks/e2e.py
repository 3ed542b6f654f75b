"""The whole request as a user waits for it, per preset beside `none`.

From the video file to the last answer token: video decode, preprocessing, vision encoder,
pruning, LLM prefill, and N decode tokens (N = 64 and 256 by default), through the public API
(`vidqa.api.Model.ask`, the path `vidqa ask` takes; the model is loaded once, as `vidqa serve`
or a script would). The headline is the end-to-end speedup over `none`, not the prefill alone:
pruning the LLM's visual tokens saves only the prefill's share of a request.

    python benchmarks/e2e.py --threads 2 --frames 8 --tokens 16             # CPU, 0.5B-dim bench model
    python benchmarks/e2e.py --bench-dims qwen2-7b --device cuda --frames 32  # GPU, 7B dimensions

`--preprocess-on model,cpu` runs every configuration twice: the family's video processor where
the adapter puts it (the model's GPU on CUDA: models/base.py, `preprocessing_device`) and on the
CPU, so the preprocessing column compares the two (issue #35 item 4).

Each configuration: `--warmup` untimed requests, then `--repeats` timed ones (median; the
configurations interleaved so drift hits all alike). Every request generates exactly N tokens
(the bench model's vocabulary has no end-of-sequence word it would choose: the count is checked
and reported). Writes results.json and table.md to --out and prints the table. Measures, never
asserts timings; run it alone on a quiet machine and record the load (docs/benchmarks.md).
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
for path in (HERE, HERE.parent):  # prefill.py beside us; vidqa from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from prefill import BENCH_DIMS, QUESTION, bench_clip_path, bench_model_dir, machine  # noqa: E402

DEFAULT_PRESETS = ("none", "evs", "vidcom2", "visionzip", "fastv", "adatp", "prunevid", "sparsevlm", "fastvid",
                   "flashvid", "holitom", "dycoke", "earlytom")
PHASES = ("video_decode_s", "preprocess_s", "vision_encoder_s", "pruning_s", "prefill_s", "decode_s", "total_s")


def run(model, video: Path, preset: str, keep: float | None, frames: int, tokens: int):
    """One request from the file -> its Stats."""
    settings = model.settings.replace(frames=frames, prune=preset, keep=None if preset == "none" else keep,
                                      max_new_tokens=tokens)
    return model.ask(video, QUESTION, settings).stats


def measure(model, video, presets, keep, frames, tokens_list, repeats, warmup, log=print) -> list[dict]:
    configs = [(preset, tokens) for tokens in tokens_list for preset in presets]
    samples: dict[tuple, list] = {config: [] for config in configs}
    unreachable: dict[tuple, str] = {}
    for round_index in range(warmup + repeats):
        for config in configs:
            if config in unreachable:
                continue
            preset, tokens = config
            try:
                stats = run(model, video, preset, keep, frames, tokens)
            except Exception as error:  # a keep a preset cannot reach, say: a row that says so
                unreachable[config] = " ".join(str(error).split())
                continue
            if round_index >= warmup:
                samples[config].append(stats)
        log(f"round {round_index + 1}/{warmup + repeats} done")
    rows = []
    for config in configs:
        preset, tokens = config
        row = {"preset": preset, "keep": None if preset == "none" else keep, "tokens": tokens}
        if config in unreachable:
            rows.append(row | {"error": unreachable[config]})
            continue
        mine = samples[config]
        for phase in PHASES:
            row[phase] = statistics.median(getattr(s.time, phase) for s in mine)
        row["ttft_s"] = statistics.median(s.time.total_s - s.time.decode_s for s in mine)
        row["generated_tokens"] = min(s.tokens.generated_tokens for s in mine)
        row["decode_tokens_per_s"] = statistics.median(s.time.decode_tokens_per_s for s in mine)
        row["visual_tokens"] = f"{mine[0].tokens.visual_tokens_before} -> {mine[0].tokens.visual_tokens_after}"
        row["retention"] = mine[0].tokens.layer_avg_retention
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["preset"] == "none" and r["tokens"] == row["tokens"])
        if "error" not in row and "error" not in base:
            row["speedup_total"] = base["total_s"] / row["total_s"]
            row["speedup_ttft"] = base["ttft_s"] / row["ttft_s"]
    return rows


def preprocess_on(model, where: str) -> None:
    """Run the video processor on the CPU ("cpu") or where the adapter chose ("model")."""
    adapter = model.adapter
    device = adapter.preprocess_device if where == "model" else "cpu"
    adapter.processor.video_processor.device = None if device is None else str(device)


def markdown_table(rows: list[dict]) -> str:
    header = ("| preset | answer tokens | visual tokens | decode video ms | preprocess ms | encoder ms | pruning ms "
              "| prefill ms | decode ms (tok/s) | TTFT ms | total ms | speedup end to end | speedup TTFT |")
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        label = row["preset"] if row["keep"] is None else f"{row['preset']} @ {row['keep']:g}"
        if row.get("preprocess_on", "model") != "model":
            label += f" (preprocessing on {row['preprocess_on']})"
        if "error" in row:
            lines.append(f"| {label} | {row['tokens']} | {row['error']} |" + " |" * 10)
            continue

        def ms(key):
            return f"{row[key] * 1000:.0f}"

        lines.append(
            f"| {label} | {row['generated_tokens']} | {row['visual_tokens']} | {ms('video_decode_s')} | "
            f"{ms('preprocess_s')} | {ms('vision_encoder_s')} | {ms('pruning_s')} | {ms('prefill_s')} | "
            f"{ms('decode_s')} ({row['decode_tokens_per_s']:.1f}) | {ms('ttft_s')} | {ms('total_s')} | "
            f"{row['speedup_total']:.2f}x | {row['speedup_ttft']:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a checkpoint (default: build the bench model)")
    parser.add_argument("--bench-dims", default="qwen2-0.5b", choices=sorted(BENCH_DIMS))
    parser.add_argument("--video", type=Path, default=None, help="default: the generated bench clip")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--tokens", default="64,256", help="answer lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", default=None, help="the decode path (api.Settings.decode), if this vidqa has one")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--preprocess-on", default="model",
                        help="where the video processor runs, comma-separated: model (the adapter's choice: the GPU on "
                             "CUDA), cpu")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "vidqa-bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    from vidqa import api

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_path = args.model or str(bench_model_dir(args.workdir, args.bench_dims))
    video = args.video or bench_clip_path(args.workdir, 384)
    settings = api.Settings(model=model_path, device=args.device)
    if args.decode is not None:
        settings = settings.replace(decode=args.decode)
    model = api.open_model(settings)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rows = []
    for where in [w for w in args.preprocess_on.split(",") if w]:
        if where not in ("model", "cpu"):
            raise SystemExit(f"--preprocess-on {where}: expected model or cpu")
        preprocess_on(model, where)
        measured = measure(model, video, [p for p in args.presets.split(",") if p], args.keep, args.frames,
                           [int(t) for t in args.tokens.split(",")], args.repeats, args.warmup, log=log)
        rows += [row | {"preprocess_on": where} for row in measured]
    preprocess_on(model, "model")
    table = markdown_table(rows)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        info = {"machine": machine(), "device": str(model.adapter.model.device), "frames": args.frames,
                "keep": args.keep, "model": model_path, "rows": rows}
        (args.out / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
