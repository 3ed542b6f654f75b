"""The SmolLM2 sweep on 48 clips: clips 0-23 from docs/accuracy.md's generated table, clips 24-47
from runs/smol_sweep_seed0_clips24-47.jsonl.gz, overall accuracy per (row, keep).

The records of clips 0-23 were not kept, so their counts are recovered from the table's per-type
cells: each is k of 24 questions (or of 24 - n with "(n unreachable)"), printed to two decimals,
and k/24 values are further apart than that. `--check RECORDS TABLE` confirms the recovery on a
sweep whose records and table both exist: the seed-0 rerun's (runs/smol_sweep_rerun_clips0-23.jsonl.gz
and its table in docs/accuracy.md; tests/test_micro_accuracy.py checks both that and the published
48-clip table). Once every sweep keeps its records, this script is not needed.

    python benchmarks/micro/combine_clips.py                 # the 48-clip table in docs/accuracy.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[1] / "docs" / "accuracy.md"
BEGIN, END = "<!-- accuracy.py smol:begin -->", "<!-- accuracy.py smol:end -->"
QUESTIONS_PER_CELL = 24  # a type cell of a 24-clip table
TYPES = 9
ORDER = ("none", "adatp", "fastvid", "vidcom2", "visionzip", "flashvid", "evs", "dycoke", "prunevid", "holitom",
         "fastv", "sparsevlm", "random", "per-frame-random", "oracle")
KEEPS = ("0.1", "0.25", "0.5")
CELL = re.compile(r"([0-9.]+)(?: \((\d+) unreachable\))?$")


def table_counts(markdown: str) -> dict[tuple[str, str], tuple[int, int]]:
    """{(row, keep): (correct, answered)} from the presets table of a 24-clip per-type table."""
    counts = {}
    for line in markdown.split("#### Sensitivity")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 + TYPES + 4 or cells[0] == "preset" or cells[0].startswith("-"):
            continue
        matches = [CELL.match(cell) for cell in cells[2:2 + TYPES]]
        if not all(matches):  # unreachable everywhere
            continue
        answered = [QUESTIONS_PER_CELL - int(m.group(2) or 0) for m in matches]
        correct = sum(round(float(m.group(1)) * n) for m, n in zip(matches, answered))
        counts[(cells[0], cells[1])] = (correct, sum(answered))
    return counts


def record_counts(path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """{(row, keep): (correct, answered)} from compact records (scored ones only)."""
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("correct") is None:
                continue
            name, keep = record["preset"], record.get("keep")
            key = (name, "-" if keep is None or name == "none" else f"{float(keep):g}")
            correct, answered = counts.get(key, (0, 0))
            counts[key] = (correct + (record["correct"] is True), answered + 1)
    return counts


def doc_block(path: Path = DOC) -> str:
    text = path.read_text(encoding="utf-8")
    return text[text.index(BEGIN):text.index(END)]


def combined_table(first: dict, second: dict) -> str:
    def share(counts):
        return f"{counts[0] / counts[1]:.2f}" if counts[1] else "-"

    lines = ["| row | " + " | ".join(f"keep {k}: 0-23 | 24-47 | **48**" for k in KEEPS) + " |",
             "|---|" + "---:|" * (3 * len(KEEPS))]
    for name in ORDER:
        cells = []
        for keep in KEEPS:
            key = (name, "-" if name == "none" else keep)
            a, b = first.get(key, (0, 0)), second.get(key, (0, 0))
            both = share((a[0] + b[0], a[1] + b[1]))
            cells += [share(a), share(b), f"**{both}**" if both != "-" else "-"]
        lines.append(f"| {'none (every token)' if name == 'none' else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, default=HERE / "runs" / "smol_sweep_seed0_clips24-47.jsonl.gz")
    parser.add_argument("--check", nargs=2, type=Path, metavar=("RECORDS", "TABLE"),
                        help="compare the recovered counts of TABLE (a 24-clip table) with RECORDS' counts")
    args = parser.parse_args(argv)
    if args.check:
        from_table = table_counts(args.check[1].read_text(encoding="utf-8"))
        from_records = record_counts(args.check[0])
        wrong = {k: (from_table[k], v) for k, v in from_records.items() if k in from_table and from_table[k] != v}
        print(f"{len(from_records)} rows compared, {len(wrong)} differ" + (f": {wrong}" if wrong else ""))
        return 1 if wrong else 0
    print(combined_table(table_counts(doc_block()), record_counts(args.records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
