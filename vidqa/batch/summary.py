"""Scoring and summarising batch records: answer extraction, accuracy, the summary table, the plot.

Pure functions over the records `vidqa batch` writes (docs/batch.md): nothing here loads a model,
so `vidqa summarize` is fast and works on a machine without a GPU.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from vidqa.errors import BadInput

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# --- options and prompts ---------------------------------------------------------------------

_OPTION_LABEL = re.compile(r"^\s*[(\[]?([A-Za-z])[)\]]?\s*[.:)]\s*(.*)$", re.S)
_OPTION_PAREN = re.compile(r"^\s*[(\[]([A-Za-z])[)\]]\s*(.*)$", re.S)


def parse_options(cell: str | None) -> list[tuple[str, str]]:
    """'A. left|B. right' -> [('A', 'left'), ('B', 'right')]; unlabelled options get A, B, C...

    Labels are taken only when every option has one; otherwise options are lettered in order.
    """
    if cell is None or not cell.strip():
        return []
    parts = [part.strip() for part in cell.split("|") if part.strip()]
    labelled = []
    for part in parts:
        match = _OPTION_PAREN.match(part) or _OPTION_LABEL.match(part)
        if not match:
            break
        labelled.append((match.group(1).upper(), match.group(2).strip()))
    if len(labelled) == len(parts) and len({letter for letter, _ in labelled}) == len(parts):
        return labelled
    return [(string.ascii_uppercase[i], part) for i, part in enumerate(parts[:26])]


def format_options(options: Sequence[tuple[str, str]]) -> list[str]:
    return [f"{letter}. {text}" for letter, text in options]


def build_prompt(question: str, options: Sequence[tuple[str, str]]) -> str:
    """The question; for multiple choice, LLaVA-OneVision's eval prompt (lmms-eval):
    question, one option per line, then the instruction to answer with the letter."""
    if not options:
        return question
    return "\n".join([question, *format_options(options), MC_INSTRUCTION])


# --- answer extraction -----------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str | None) -> str:
    """Lowercase, strip punctuation, the articles a/an/the and extra whitespace (SQuAD style)."""
    if text is None:
        return ""
    text = str(text).lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str | None, answer: str | None) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer) != ""


_WHOLE = re.compile(r"^[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:!]?$")
_LEADING_PAREN = re.compile(r"^[(\[]([A-Za-z])[)\]]")
_LEADING = re.compile(r"^([A-Za-z])\s*[.):](?=\s|$)")
_ANSWER_IS = re.compile(
    r"\b(?:answer|option|choice)\b\s*(?:is|would be|will be|should be)?\s*[:\-]?\s*"
    r"(?:option\s+|choice\s+|letter\s+)?(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])(?![A-Za-z'’]))",
    re.I,
)
_PAREN_ANYWHERE = re.compile(r"[(\[]([A-Za-z])[)\]]")
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z'’])([A-Z])(?![A-Za-z'’])")


def _is_word(text: str, end: int) -> bool:
    """Does a lowercase word follow position `end` (after spaces)? Then 'A'/'a'/'I' is a word."""
    return re.match(r"\s+[a-z]", text[end:]) is not None


def extract_choice(
    prediction: str | None,
    letters: str | Sequence[str] = "ABCD",
    options: Sequence[str] | None = None,
) -> str | None:
    """The option letter a free-form prediction names, or None when it names none or several.

    `letters`: the valid letters ("ABCD", or the options' labels). `options`: the options' texts
    (without their labels), in the order of `letters`, to match a prediction that quotes an option
    instead of its letter. Tried in order, first hit wins:
      1. the whole prediction is a letter: "B", "(b)", "B.";
      2. a leading label: "(B) a cat", "B. cat", "b) dog", "C: ...";
      3. "answer is B", "Answer: (c)", "the correct option is D";
      4. one capital letter standing alone, e.g. "I think it's B" (an "A"/"I" followed by a
         lowercase word is the article/pronoun, so "A cat sits on a mat." names no letter);
         several different letters -> None;
      5. the prediction equals one option's text, or contains exactly one option's text
         (normalised, whole words).
    """
    if prediction is None:
        return None
    text = str(prediction).strip()
    if not text:
        return None
    valid = [letter.upper() for letter in letters]

    def ok(letter: str | None) -> str | None:
        return letter.upper() if letter and letter.upper() in valid else None

    match = _WHOLE.match(text)
    if match:
        return ok(match.group(1))
    match = _LEADING_PAREN.match(text)
    if match and ok(match.group(1)):
        return ok(match.group(1))
    match = _LEADING.match(text)
    if match and ok(match.group(1)):
        return ok(match.group(1))
    for match in _ANSWER_IS.finditer(text):
        paren, bare = match.group(1), match.group(2)
        if paren and ok(paren):
            return ok(paren)
        if bare and ok(bare) and not (bare in "ai" and _is_word(text, match.end())):
            return ok(bare)
    found = {ok(m.group(1)) for m in _PAREN_ANYWHERE.finditer(text)} - {None}
    for m in _LONE_CAPITAL.finditer(text):
        letter = m.group(1)
        if letter in "AI" and _is_word(text, m.end()):
            continue  # "A cat", "I think": a word, not a choice
        if ok(letter):
            found.add(letter)
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        return None
    if options:
        normalised = normalize_answer(text)
        texts = [normalize_answer(option) for option in options]
        equal = [i for i, option in enumerate(texts) if option and option == normalised]
        if len(equal) == 1 and equal[0] < len(valid):
            return valid[equal[0]]
        contained = [
            i for i, option in enumerate(texts)
            if option and re.search(rf"(?<!\S){re.escape(option)}(?!\S)", normalised)
        ]
        if len(contained) == 1 and contained[0] < len(valid):
            return valid[contained[0]]
    return None


def _record_options(record: dict) -> list[tuple[str, str]]:
    options = record.get("options")
    if not options:
        return []
    if isinstance(options, str):
        return parse_options(options)
    return parse_options("|".join(options))


def score(prediction: str | None, answer: str | None, options: Sequence[tuple[str, str]]) -> bool | None:
    """True/False against the ground truth; None when there is no ground truth or no prediction.

    Multiple choice: the letter extracted from the prediction against the answer's letter (the
    answer may be a letter, "(B)", or an option's text). Otherwise normalised exact match.
    """
    if answer is None or not str(answer).strip() or prediction is None:
        return None
    if options:
        letters = "".join(letter for letter, _ in options)
        texts = [text for _, text in options]
        truth = extract_choice(answer, letters, texts)
        if truth is not None:
            return extract_choice(prediction, letters, texts) == truth
    return exact_match(prediction, answer)


def agree(a: str | None, b: str | None, options: Sequence[tuple[str, str]]) -> bool:
    """Do two predictions give the same answer? (letters for multiple choice, else normalised text)"""
    if options:
        letters = "".join(letter for letter, _ in options)
        texts = [text for _, text in options]
        la, lb = extract_choice(a, letters, texts), extract_choice(b, letters, texts)
        if la is not None or lb is not None:
            return la == lb
    return normalize_answer(a) == normalize_answer(b)


# --- summary ---------------------------------------------------------------------------------


def record_key(record: dict) -> tuple[str, str, float | None]:
    return (str(record.get("id")), str(record.get("preset")), normalize_keep(record.get("keep")))


def normalize_keep(keep) -> float | None:
    if keep is None or keep == "":
        return None
    return round(float(keep), 6)


def _get(record: dict, *path):
    value = record.get("stats")
    for step in path:
        if not isinstance(value, dict):
            return None
        value = value.get(step)
    return value


def _prefill_paid(record: dict) -> float | None:
    """The LLM prefill a record paid: its own rows, plus the video prefix when it computed one
    that later rows reused (so a preset's mean is its prefill cost per question, amortized)."""
    own = _get(record, "time", "prefill_s")
    return None if own is None else own + (_get(record, "time", "video_prefill_s") or 0.0)


def _mean(values: Iterable) -> float | None:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict]) -> list[dict]:
    """One row per (preset, keep), in the order they first appear (`none` first).

    rows: records; errors: records with an error; scored: successful records with a ground
    truth; accuracy: correct / scored (None when nothing is scored); agreement: share of the
    rows (both successful) where the model's answer agrees with the `none` preset's on the same id
    (None without `none` records); the means are over successful records.
    """
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for record in records:
        groups.setdefault((str(record.get("preset")), normalize_keep(record.get("keep"))), []).append(record)
    baseline = {
        str(r.get("id")): r for r in records
        if r.get("preset") == "none" and not r.get("error") and r.get("answer") is not None
    }
    order = sorted(groups, key=lambda k: (k[0] != "none",))  # stable: `none` first
    rows = []
    for preset, keep in order:
        members = groups[(preset, keep)]
        ok = [r for r in members if not r.get("error")]
        scored = [r for r in ok if r.get("correct") is not None]
        correct = sum(1 for r in scored if r.get("correct") is True)
        compared = [
            r for r in ok
            if str(r.get("id")) in baseline and r.get("answer") is not None
        ]
        agreeing = sum(
            1 for r in compared
            if agree(r.get("answer"), baseline[str(r.get("id"))].get("answer"), _record_options(r))
        )
        fractions = [_get(r, "flops", "paper_fraction") for r in ok]
        rows.append({
            "preset": preset,
            "keep": keep,
            "rows": len(members),
            "errors": len(members) - len(ok),
            "scored": len(scored),
            "correct": correct,
            "accuracy": correct / len(scored) if scored else None,
            "agreement": agreeing / len(compared) if compared else None,
            "visual_tokens_before": _mean(_get(r, "tokens", "visual_tokens_before") for r in ok),
            "visual_tokens_after": _mean(_get(r, "tokens", "visual_tokens_after") for r in ok),
            "layer_avg_retention": _mean(_get(r, "tokens", "layer_avg_retention") for r in ok),
            "flops_percent": _mean(None if f is None else float(f) * 100 for f in fractions),
            "prefill_s": _mean(_prefill_paid(r) for r in ok),
            "total_s": _mean(_get(r, "time", "total_s") for r in ok),
        })
        rows[-1]["keep_reached"] = None if keep is None or not ok else not missed_keep(rows[-1])
    return rows


KEEP_TOLERANCE = 0.02  # retention this far from the requested keep counts as "not reached"


def missed_keep(row: dict) -> bool:
    """Did the group's mean retention miss its requested keep (a preset that cannot reach it)?"""
    keep, reached = row.get("keep"), row.get("layer_avg_retention")
    return keep is not None and reached is not None and abs(reached - keep) > KEEP_TOLERANCE


def keep_label(row: dict) -> str:
    """'0.3', or '0.5→0.19' when the preset reached another retention than the keep asked for."""
    if row.get("keep") is None:
        return "-"
    if missed_keep(row):
        return f"{row['keep']:g}→{row['layer_avg_retention']:.2f}"
    return f"{row['keep']:g}"


def summary_table(rows: Sequence[dict], title: str = "vidqa batch"):
    """The summary as a compact rich table (fits 80 columns for ordinary preset names)."""
    from rich import box
    from rich.table import Table

    with_truth = any(row["accuracy"] is not None for row in rows)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("preset", overflow="fold")
    for name in ("keep", "rows", "err", "acc" if with_truth else "agree", "tokens", "retain",
                 "FLOPs%", "prefill", "total"):
        table.add_column(name, justify="right", no_wrap=True)

    def pct(value):
        return "-" if value is None else f"{value:.1%}"

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    def secs(value):
        if value is None:
            return "-"
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"

    for row in rows:
        table.add_row(
            row["preset"], keep_label(row), str(row["rows"]),
            str(row["errors"]), pct(row["accuracy"] if with_truth else row["agreement"]),
            num(row["visual_tokens_after"], ".0f"), pct(row["layer_avg_retention"]),
            num(row["flops_percent"], ".1f"), secs(row["prefill_s"]), secs(row["total_s"]),
        )
    table.caption = (
        ("acc: accuracy over the records with a ground-truth answer and no error" if with_truth
         else "agree: same answer as preset none on the same row (there is no ground truth)")
        + ("; keep a→r: asked for keep a, the preset reached retention r" if any(missed_keep(r) for r in rows) else "")
        + "; tokens: mean visual tokens entering the last layer; retain: layer-averaged retention; "
        "FLOPs%: visual prefill vs none (paper convention); prefill, total: mean times (prefill paid per "
        "question: a video prefix reused by later rows counts once)"
    )
    table.caption_justify = "left"
    return table


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput('--plot needs matplotlib, which is not installed: pip install -e ".[plot]"') from None


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]


def plot_summary(rows: Sequence[dict], path: str | Path) -> str:
    """Accuracy (or agreement with `none`) against FLOPs %, one line per preset, a marker per keep.

    -> the y quantity plotted ("accuracy" or "agreement"). BadInput when there is nothing to plot.
    """
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    quantity = "accuracy" if any(r["accuracy"] is not None for r in rows) else "agreement"
    points = [r for r in rows if r[quantity] is not None and r["flops_percent"] is not None]
    if not points:
        raise BadInput("--plot: nothing to plot: no ground-truth answers, and no successful 'none' "
                       "records to compare the other presets with")
    keeps = sorted({r["keep"] for r in points if r["keep"] is not None})
    marker_of = {keep: _MARKERS[i % len(_MARKERS)] for i, keep in enumerate(keeps)}
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    presets = list(dict.fromkeys(r["preset"] for r in points))
    for i, preset in enumerate(presets):
        mine = sorted((r for r in points if r["preset"] == preset), key=lambda r: r["flops_percent"])
        color = f"C{i}"
        xs = [r["flops_percent"] for r in mine]
        ys = [r[quantity] * 100 for r in mine]
        axes.plot(xs, ys, "-", color=color, label=preset, alpha=0.8)
        for r, x, y in zip(mine, xs, ys):
            if missed_keep(r):  # say where the preset fell short of the keep asked for
                axes.annotate(keep_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        for r, x, y in zip(mine, xs, ys):
            axes.plot(x, y, marker="*" if r["keep"] is None else marker_of[r["keep"]], color=color,
                      markersize=11 if r["keep"] is None else 7, linestyle="none")
    baseline = [r for r in points if r["preset"] == "none"]
    if baseline:  # the unpruned result as a reference line across the plot
        axes.axhline(baseline[0][quantity] * 100, linestyle="--", linewidth=0.8, color="grey", alpha=0.6)
    values = [r[quantity] * 100 for r in points]
    low, high = min(values), max(values)
    if high - low < 10:  # a flat result: show a readable range around it, not ±0.05
        middle = (low + high) / 2
        low, high = max(0.0, middle - 5), min(100.0, middle + 5)
        if high - low < 10:
            low, high = (0.0, 10.0) if low == 0 else (90.0, 100.0)
    axes.set_ylim(low - 2, high + 2)
    axes.set_xlim(0, 105)
    handles, _ = axes.get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", marker=marker_of[k], linestyle="none", label=f"keep {k:g}")
                for k in keeps]
    axes.legend(handles=handles, fontsize=8, loc="best")
    axes.set_xlabel("FLOPs % (LLM prefill over visual tokens, paper convention)")
    axes.set_ylabel("accuracy %" if quantity == "accuracy" else "agreement with 'none' %")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return quantity
