"""Decode tokens/s: the decode paths (eager generate, the static path, CUDA graphs) and
DyCoke's decode-time KV selection.

For one model and one clip, generates exactly --decode-tokens tokens (greedy) through the real
request path (`vidqa.engine.request.answer`), after warm-up and with repetitions interleaved
across configurations, each configuration on every decode path of --paths (vidqa/engine/decode.py:
eager = transformers' generate; static = fixed-shape steps over a padded KV cache; graphs = those
steps replayed as CUDA graphs, GPU only). Default configurations (--presets dycoke):

- none: every visual token, every decode step attends to all of them;
- dycoke: the preset's defaults (merge before the LLM + decode KV selection);
- dycoke merge only (-P decode_keep=1): the merge's shorter cache, full attention at decode;
- dycoke decode only (--keep 1): the full cache, each step attends to decode_keep of it;
- transformers generate (no vidqa): the same unpruned inputs through `model.generate` with no
  vidqa hook, streamer or clock, timed as (wall(N tokens) - wall(1 token)) / (N - 1): what the
  engine's own decode costs is `none` against it. Its "prefill s" is the one-token wall time.

--presets all (or a comma list of preset names) runs those presets at their defaults instead.

Per configuration and path: decode tokens/s (engine: decoding steps / time from the end of the
prefill to the last step, the path's one-time warm-up excluded; median, min, max), the warm-up
(padded KV cache, graph capture), prefill seconds, whether the tokens equal the eager path's,
and for a fast path the answer length from which it wins including its warm-up ("break-even"),
and the decode time of a 64- and a 256-token answer (warm-up + 63 or 255 steps): what the
`--decode auto` choice on a device is read from. Without --model it uses the CPU bench model and
clip of benchmarks/prefill.py (llava-onevision-qwen2-0.5b text dimensions, 196 tokens per frame).

    python benchmarks/decode.py --threads 2                           # CPU bench model, 32 frames
    python benchmarks/decode.py --bench-dims qwen2-7b --device cuda --presets all --paths eager,graphs

Writes results.json and table.md to --out and prints the table. Measures, never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):  # prefill.py beside us; vidqa from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from prefill import BENCH_DIMS, QUESTION, bench_clip_path, bench_model_dir, machine  # noqa: E402

CONFIGS = (  # (label, preset, -P overrides, keep)
    ("none", "none", (), None),
    ("dycoke", "dycoke", (), None),
    ("dycoke merge only", "dycoke", ("decode_keep=1",), None),
    ("dycoke decode only", "dycoke", (), 1.0),
)
ANSWER_LENGTHS = (64, 256)  # the decode time of answers this long, warm-up included


def configs_for(presets: str) -> tuple:
    """The configurations of --presets: "dycoke" (CONFIGS), "all" (every preset), or a comma list."""
    if presets == "dycoke":
        return CONFIGS
    from vidqa.pruning.core.presets import available_presets

    names = sorted(available_presets()) if presets == "all" else [name for name in presets.split(",") if name]
    names = ["none"] + [name for name in names if name != "none"]
    return tuple((name, name, (), None) for name in names)


def run_once(adapter, clip, question, preset, overrides, keep, tokens, path="auto"):
    from vidqa.engine import request as engine
    from vidqa.pruning.core.presets import build_pruner, load_preset

    pruner = build_pruner(load_preset(preset, list(overrides)), adapter, keep=keep)
    generation = engine.GenerationOptions(max_new_tokens=tokens, decode=path)
    return engine.answer(adapter, clip, question, generation, pruner=pruner)


PLAIN = "transformers generate (no vidqa)"


def plain_generate(adapter, clip, question, tokens) -> tuple[float, float, int]:
    """(decode tokens/s, seconds for one token, tokens generated) of transformers' own `generate`
    on the request's inputs, with none of vidqa's hooks, streamer or step clock: the per-token
    time is (wall(N tokens) - wall(1 token)) / (N - 1). The baseline the engine's decode rate is
    read against."""
    import time

    from vidqa.engine import request as engine
    from vidqa.engine.generation import generation_overrides
    from vidqa.engine.stats import synchronize
    from vidqa.pruning.core.runtime import NO_PRUNING

    device = adapter.model.device
    prompt = adapter.prompt_for_clip(clip, question)
    with torch.inference_mode():
        visual = engine.encoded_video(adapter, clip, prompt, NO_PRUNING)
        inputs = adapter.generation_inputs(prompt, visual, positions=NO_PRUNING.positions)

        def wall(count: int) -> tuple[float, int]:
            kwargs = {**inputs.kwargs, **generation_overrides(adapter, engine.GenerationOptions(max_new_tokens=count))}
            synchronize(device)
            start = time.perf_counter()
            output = adapter.model.generate(**kwargs, min_new_tokens=count)
            synchronize(device)
            return time.perf_counter() - start, output.shape[1] - inputs.kwargs["input_ids"].shape[1]

        (one, _), (many, generated) = wall(1), wall(tokens)
    return (generated - 1) / max(many - one, 1e-9), one, generated


def measure(adapter, clip, question, tokens, repeats, warmup, log, configs=CONFIGS, paths=("eager",)) -> list[dict]:
    samples = {(label, path): [] for label, *_ in configs for path in paths}
    plain = []
    info, texts = {}, {}
    for round_index in range(warmup + repeats):
        rate, one_token, generated = plain_generate(adapter, clip, question, tokens)
        if round_index >= warmup:
            plain.append((rate, one_token, 0.0))
        for label, preset, overrides, keep in configs:
            for path in paths:
                result = run_once(adapter, clip, question, preset, overrides, keep, tokens, path)
                decode = result.details.get("dycoke", {}).get("decode")
                texts.setdefault((label, path), set()).add(result.text)
                info[(label, path)] = {
                    "visual_tokens_in_cache": result.stats.tokens.visual_tokens_after,
                    "attended_per_step": decode["attended_per_step"] if decode else result.stats.tokens.visual_tokens_after,
                    "from_layer": decode["from_layer"] if decode else None,
                    "generated": result.stats.tokens.generated_tokens,
                    "path_ran": result.stats.decode_path,
                }
                if round_index >= warmup:
                    timings = result.stats.time
                    samples[(label, path)].append((timings.decode_tokens_per_s, timings.prefill_s, timings.decode_warmup_s))
        log(f"round {round_index + 1}/{warmup + repeats}{' (warm-up)' if round_index < warmup else ''}")
    first = configs[0][0], paths[0]
    rows = [summary_row(PLAIN, "-", {**info[first], "generated": generated, "path_ran": "-"}, plain)]
    for label, *_ in configs:
        for path in paths:
            row = summary_row(label, path, info[(label, path)], samples[(label, path)])
            if "eager" in paths:
                row["same_tokens_as_eager"] = texts[(label, path)] == texts[(label, "eager")]
            rows.append(row)
        if "eager" in paths:  # each fast path against the eager row of its configuration
            eager = next(r for r in rows if r["config"] == label and r["path"] == "eager")
            for row in rows[-len(paths):]:
                if row["path"] != "eager":
                    row.update(against_eager(row, eager))
    return rows


def summary_row(label: str, path: str, info: dict, samples: list[tuple]) -> dict:
    rates = [rate for rate, _, _ in samples]
    return {
        "config": label, "path": path, **info,
        "decode_tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
        "warmup_s": statistics.median(warmup for _, _, warmup in samples),
        "prefill_s": statistics.median(prefill for _, prefill, _ in samples),
        **{f"decode_s_{length}": statistics.median(warmup + (length - 1) / max(rate, 1e-9) for rate, _, warmup in samples)
           for length in ANSWER_LENGTHS},
    }


def against_eager(row: dict, eager: dict) -> dict:
    """The answer length from which `row`'s path beats eager, its warm-up included (None: never)."""
    saved = 1 / max(eager["decode_tokens_per_s"], 1e-9) - 1 / max(row["decode_tokens_per_s"], 1e-9)  # s per token
    return {"break_even_tokens": 1 + math.ceil(row["warmup_s"] / saved) if saved > 0 else None}


def markdown_table(rows: list[dict]) -> str:
    lengths = " | ".join(f"decode s, {n} tokens" for n in ANSWER_LENGTHS)
    lines = [f"| config | path | visual tokens in cache | attended per decode step | from layer | decode tok/s (median) | min | max "
             f"| warm-up s | {lengths} | break-even tokens | same tokens as eager | prefill s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(ANSWER_LENGTHS) + "---:|:---:|---:|"]
    for row in rows:
        path = row["path"] if row["path_ran"] in ("-", row["path"]) else f"{row['path']} (ran {row['path_ran']})"
        times = " | ".join(f"{row[f'decode_s_{n}']:.2f}" for n in ANSWER_LENGTHS)
        even = row.get("break_even_tokens", "-")
        same = {True: "yes", False: "NO"}.get(row.get("same_tokens_as_eager"), "-")
        lines.append(f"| {row['config']} | {path} | {row['visual_tokens_in_cache']} | {row['attended_per_step']} | "
                     f"{row['from_layer'] if row['from_layer'] is not None else '-'} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['min']:.1f} | {row['max']:.1f} | {row['warmup_s']:.3f} | {times} | "
                     f"{'-' if even is None else even} | {same} | {row['prefill_s']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or checkpoint directory (default: build the CPU bench model)")
    parser.add_argument("--bench-dims", default="qwen2-0.5b", choices=sorted(BENCH_DIMS),
                        help="the bench model's dimensions, without --model (qwen2-7b: llava-onevision-qwen2-7b's, for GPUs)")
    parser.add_argument("--video", help="video file (default: the generated bench clip)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--presets", default="dycoke",
                        help="dycoke (none and DyCoke's parts), all (every preset at its defaults), or a comma list")
    parser.add_argument("--paths", default=None,
                        help="decode paths, comma-separated (default: eager,static on CPU; eager,static,graphs on CUDA)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--workdir", default="~/.cache/vidqa-bench", help="where the bench model and clip are cached")
    parser.add_argument("--out", default="bench-decode", help="directory for results.json and table.md")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    from vidqa.models import load_model
    from vidqa.video.decode import load_clip

    workdir = Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    model_id = args.model or str(bench_model_dir(workdir, args.bench_dims))
    adapter = load_model(model_id, device=args.device, dtype=args.dtype)
    adapter.model.generation_config.min_new_tokens = args.decode_tokens  # a random model may stop at once
    size = getattr(getattr(adapter.model.config, "vision_config", None), "image_size", None) or 384
    clip = load_clip(args.video or str(bench_clip_path(workdir, size)), num_frames=args.frames)
    cuda = adapter.model.device.type == "cuda"
    paths = tuple(args.paths.split(",")) if args.paths else ("eager", "static", "graphs") if cuda else ("eager", "static")
    configs = configs_for(args.presets)
    log(f"model {model_id} on {adapter.model.device}, {clip.num_frames} frames, {args.decode_tokens} tokens, "
        f"{torch.get_num_threads()} threads; paths {', '.join(paths)}; {args.warmup} warm-up + {args.repeats} timed rounds")
    rows = measure(adapter, clip, args.question, args.decode_tokens, args.repeats, args.warmup, log, configs, paths)
    table = markdown_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": model_id, "frames": clip.num_frames, "decode_tokens": args.decode_tokens, "paths": list(paths),
               "threads": torch.get_num_threads(), "machine": machine(), "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
