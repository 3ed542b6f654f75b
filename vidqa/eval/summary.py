"""Score next to cost for lmms-eval runs of `--model vidqa`: one row per (task, preset, keep).

    python -m vidqa.eval.summary results/            # every *_results.json below the folders given
    python -m vidqa.eval.summary results/ --json

Reads what lmms-eval wrote with --log_samples: the task scores from `<date>_results.json` and,
from each task's `<date>_samples_<task>.jsonl`, the vidqa stats of every answer (the
`token_counts[0].vidqa` entry written by vidqa/eval/lmms_model.py). A group task (mvbench) pools
its subtasks' samples. Pure JSON reading: lmms-eval need not be installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MEANS = ("layer_avg_retention", "flops_percent", "prefill_s", "visual_tokens_after")


def model_args(text: str | dict | None) -> dict:
    """lmms-eval's --model_args, `k=v,k=v` (as written into results.config) -> dict of strings."""
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    pairs = (item.split("=", 1) for item in str(text or "").split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def scores(task_results: dict) -> dict:
    """{'videomme_perception_score,none': 58.2, 'alias': ...} -> {'videomme_perception_score': 58.2}."""
    return {
        key.split(",")[0]: value for key, value in task_results.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float))
    }


def sample_stats(samples_file: Path) -> list[dict]:
    stats = []
    for line in samples_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        for counts in json.loads(line).get("token_counts") or []:
            if isinstance(counts, dict) and isinstance(counts.get("vidqa"), dict):
                stats.append(counts["vidqa"])
    return stats


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def rows_for(results_file: Path) -> list[dict]:
    results = json.loads(results_file.read_text(encoding="utf-8"))
    args = model_args((results.get("config") or {}).get("model_args"))
    date = results_file.name.removesuffix("_results.json")
    groups = results.get("group_subtasks") or {}
    rows = []
    for task, task_results in (results.get("results") or {}).items():
        members = groups.get(task) or [task]
        stats = []
        for member in members:
            path = results_file.with_name(f"{date}_samples_{member}.jsonl")
            if path.is_file():
                stats.extend(sample_stats(path))
        ok = [s for s in stats if not s.get("error")]
        row = {
            "task": task, "model": args.get("model") or args.get("pretrained"), "preset": args.get("prune", "none"),
            "keep": args.get("keep"), "frames": args.get("frames", "32"), "scores": scores(task_results),
            "samples": len(stats), "errors": len(stats) - len(ok), "results_file": str(results_file),
        }
        row.update({name: _mean(s.get(name) for s in ok) for name in MEANS})
        rows.append(row)
    return rows


def collect(paths: list[Path]) -> list[dict]:
    files = []
    for path in paths:
        files.extend([path] if path.is_file() else sorted(path.rglob("*_results.json")))
    return [row for file in files for row in rows_for(file)]


def _cell(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def render(rows: list[dict]) -> str:
    header = ("task", "preset", "keep", "score", "samples", "retention", "FLOPs %", "prefill s")
    lines = [header]
    for row in sorted(rows, key=lambda r: (r["task"], r["preset"] != "none", r["preset"], str(r["keep"]))):
        score = ", ".join(f"{name} {value:.4g}" for name, value in row["scores"].items()) or "-"
        lines.append((row["task"], row["preset"], row["keep"] or "-", score, str(row["samples"]),
                      _cell(row["layer_avg_retention"], "{:.1%}"), _cell(row["flops_percent"], "{:.1f}"),
                      _cell(row["prefill_s"], "{:.3f}")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidqa.eval.summary", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="lmms-eval --output_path folders or *_results.json files")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = collect(args.paths)
    if not rows:
        print(f"error: no *_results.json under {', '.join(map(str, args.paths))}; run lmms-eval with "
              f"--output_path there (and --log_samples for the vidqa stats)", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
