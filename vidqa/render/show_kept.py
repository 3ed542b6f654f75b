"""`--show-kept`: the sampled frames in a grid, each visual token's cell shaded by its fate.

One panel per frame of the token grid (the Qwen families encode two sampled frames as one
temporal patch: their panel shows the pair's first frame, captioned with both times). A token's
cell covers the part of the frame its features come from: every family resizes the whole frame to
its vision input, so the (rows x cols) token grid maps evenly onto the frame (LLaVA-OneVision's
pooled 14x14, Qwen's 2x2-merged 28 px cells, SmolVLM2's pixel-shuffled cells). Shading:

- kept (its token reached the last decoder layer): clear;
- dropped before the LLM: a grey veil (mid grey shows on dark and bright frames alike);
- dropped inside the LLM at layer k: tinted, one colour per layer;
- merged (shares its token with other cells): thin diagonal stripes and an outline around the
  group's cells, one colour per merge group (the same colour in every frame the group spans),
  over the shading of the group's token.

The data comes from `pruning.provenance.TokenFates`, the same object `--json`'s `kept`
summarises, so the image and the counts cannot disagree. matplotlib (the `plot` extra) is
imported only when drawing.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidqa.errors import BadInput
from vidqa.pruning.core.provenance import DROPPED_BEFORE_LLM, DROPPED_IN_LLM, KEPT, TokenFates

DPI = 100
PANEL_WIDTH = 1.6  # inches per frame panel
MAX_COLUMNS = 8
GAP, CAPTION, MARGIN, TITLE = 0.08, 0.24, 0.15, 0.62  # inches
LEGEND_ROW, LEGEND_ROWS = 0.24, 2  # inches per legend row; rows always reserved
VEIL = (0.5, 0.5, 0.5, 0.85)  # dropped before the LLM: mid grey, visible on dark and on bright frames
LAYER_ALPHA = 0.72
STRIPE_PERIOD, STRIPE_WIDTH, OUTLINE = 5, 1, 2  # pixels of the saved image: merge stripes, group outlines


def check_matplotlib() -> None:
    """BadInput (one line) when matplotlib is missing, before any model is loaded."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput('--show-kept needs matplotlib, which is not installed: pip install "vidqa[plot]"') from None


def check_image_path(path: Path) -> Path:
    """A .png file path whose folder exists, not a folder itself (checked before the model loads)."""
    if path.is_dir():
        raise BadInput(f"--show-kept {path} is a directory; give a .png file name")
    if path.suffix.lower() != ".png":
        raise BadInput(f"--show-kept {path}: give a .png file name")
    if not path.parent.is_dir():
        raise BadInput(f"--show-kept {path}: folder {path.parent} does not exist")
    return path


def check_image_dir(path: Path) -> Path:
    """A folder for one image per record/question; created (with its parents) when missing."""
    if path.exists() and not path.is_dir():
        raise BadInput(f"--show-kept {path} is a file; give a folder (one image per record is written there)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"--show-kept {path}: cannot create the folder ({error.strerror or error})") from None
    return path


def image_name(record_id: str, preset: str, keep: float | None) -> str:
    """The file name of a batch record's image: <id>__<preset>[__keep<keep>].png. Characters
    other than letters, digits, '.', '-' and '_' become '_', and a short hash of the raw id is
    added when that changed it, so two ids never share a file."""
    import hashlib
    import re

    def safe(text: str) -> str:
        cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"
        if cleaned != text:
            cleaned += "-" + hashlib.sha1(text.encode()).hexdigest()[:6]
        return cleaned

    keep_part = "" if keep is None else f"__keep{keep:g}"
    return f"{safe(record_id)}__{safe(preset)}{keep_part}.png"


@dataclass(frozen=True)
class Layout:
    """Where things are in the saved image, in pixels from its top-left corner.

    size: (width, height); panels: one (left, top, right, bottom) box per grid frame."""

    size: tuple[int, int]
    panels: list[tuple[float, float, float, float]]
    columns: int


def layout(num_panels: int, frame_height: int, frame_width: int, legend_rows: int) -> Layout:
    """The figure's geometry: up to MAX_COLUMNS panels of PANEL_WIDTH inches per row."""
    columns = max(1, min(MAX_COLUMNS, num_panels))
    rows = -(-num_panels // columns)
    aspect = min(max(frame_height / max(frame_width, 1), 0.3), 3.0)
    panel_height = PANEL_WIDTH * aspect
    width = 2 * MARGIN + columns * PANEL_WIDTH + (columns - 1) * GAP
    height = MARGIN + TITLE + rows * (panel_height + CAPTION + GAP) + legend_rows * LEGEND_ROW + MARGIN
    panels = []
    for index in range(num_panels):
        row, column = divmod(index, columns)
        left = MARGIN + column * (PANEL_WIDTH + GAP)
        top = MARGIN + TITLE + row * (panel_height + CAPTION + GAP)
        panels.append(tuple(v * DPI for v in (left, top, left + PANEL_WIDTH, top + panel_height)))
    return Layout(size=(round(width * DPI), round(height * DPI)), panels=panels, columns=columns)


def layer_colours(layers: list[int]) -> dict[int, tuple[float, float, float]]:
    """A distinct warm-to-cool colour per in-LLM layer that dropped tokens."""
    palette = [(0.98, 0.55, 0.10), (0.85, 0.15, 0.45), (0.45, 0.20, 0.80), (0.10, 0.55, 0.85),
               (0.10, 0.70, 0.55), (0.60, 0.75, 0.10)]
    return {layer: palette[i % len(palette)] for i, layer in enumerate(sorted(layers))}


def group_colour(group: int) -> tuple[float, float, float]:
    """Bright colours for merge groups (cycled); neighbouring group ids differ in hue."""
    return colorsys.hsv_to_rgb((group * 0.61803398875) % 1.0, 0.85, 1.0)


def cell_fill(fates: TokenFates) -> np.ndarray:
    """(frames, rows, cols, 4) float RGBA shading of every cell (transparent = kept)."""
    frames, rows, cols = fates.grid
    outcome = fates.outcome().numpy()
    left = fates.left_at_layer.numpy()
    rgba = np.zeros((len(outcome), 4))
    rgba[outcome == DROPPED_BEFORE_LLM] = VEIL
    for layer, colour in layer_colours(sorted(set(left[left >= 0].tolist()))).items():
        rgba[(outcome == DROPPED_IN_LLM) & (left == layer)] = (*colour, LAYER_ALPHA)
    return rgba.reshape(frames, rows, cols, 4)


def cell_overlay(fill: np.ndarray, group: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width, 4) float RGBA drawn over one panel of height x width pixels.

    fill: (rows, cols, 4) the cells' shading (`cell_fill` of one grid frame); group: (rows, cols)
    merge group per cell (-1: none), drawn as an outline around each group's cells and stripes
    (STRIPE_WIDTH of every STRIPE_PERIOD pixels) in the group's colour."""
    rows, cols = group.shape
    cell_row = (np.arange(height) * rows // height)[:, None]  # (height, 1)
    cell_col = (np.arange(width) * cols // width)[None, :]  # (1, width)
    image = fill[cell_row, cell_col]  # (height, width, 4), a copy
    group = group[cell_row, cell_col]
    if (group >= 0).any():
        y, x = np.mgrid[0:height, 0:width]
        edge = np.zeros((height, width), dtype=bool)  # pixels next to a cell of another group
        outline = OUTLINE if min(height // rows, width // cols) >= 16 else 1  # small cells: thin lines
        for shift in range(1, outline + 1):
            edge[:-shift] |= group[:-shift] != group[shift:]
            edge[shift:] |= group[shift:] != group[:-shift]
            edge[:, :-shift] |= group[:, :-shift] != group[:, shift:]
            edge[:, shift:] |= group[:, shift:] != group[:, :-shift]
        marked = (group >= 0) & (edge | (((x + y) % STRIPE_PERIOD) < STRIPE_WIDTH))
        palette = np.array([(*group_colour(g), 1.0) for g in range(int(group.max()) + 1)])
        image[marked] = palette[group[marked]]
    return image


def panel_caption(fates: TokenFates, grid_frame: int, timestamps, kept: int) -> str:
    step = fates.frames_per_grid_frame
    first = grid_frame * step
    times = [float(timestamps[t]) for t in range(first, min(first + step, len(timestamps)))]
    when = f"{times[0]:.1f} s" if len(times) == 1 else f"{times[0]:.1f}–{times[-1]:.1f} s"
    rows, cols = fates.grid[1:]
    return f"{when} · {kept}/{rows * cols}"


def describe(model: str, preset: str, keep: float | None, question: str, stats) -> list[str]:
    """The title lines: model, preset, keep and retention, then the question."""
    tokens = stats.tokens
    keep_text = "paper default" if keep is None else f"{keep:g}"
    first = (f"{model} · preset {preset} · keep {keep_text} · retention {tokens.layer_avg_retention:.1%} "
             f"(layer-averaged) · visual tokens {tokens.visual_tokens_before} → {tokens.visual_tokens_after}")
    question = " ".join(question.split())
    return [first, "Q: " + (question if len(question) <= 140 else question[:139] + "…")]


def legend_entries(fates: TokenFates) -> list[tuple[str, dict]]:
    """(label, patch style) for the fates present in this request (kept is always listed)."""
    outcome = fates.outcome()
    entries = [("kept through the last layer (clear)", {"facecolor": "white", "edgecolor": "0.4"})]
    if bool((outcome == DROPPED_BEFORE_LLM).any()):
        stages = ", ".join(fates.stages) if fates.stages else "pre-LLM stages"
        entries.append((f"dropped before the LLM ({stages})", {"facecolor": VEIL[:3], "edgecolor": "0.4"}))
    left = fates.left_at_layer[fates.left_at_layer >= 0].tolist()
    for layer, colour in layer_colours(sorted(set(left))).items():
        entries.append((f"dropped in the LLM at layer {layer}", {"facecolor": colour, "edgecolor": "0.4"}))
    groups = int(fates.group.max()) + 1 if len(fates.group) else 0
    if groups > 0:
        entries.append((f"merged: outline + stripes, one colour per group ({groups} groups)",
                        {"facecolor": "white", "edgecolor": group_colour(0), "hatch": "////"}))
    return entries


def draw_kept(fates: TokenFates, frames: np.ndarray, timestamps, path: str | Path, title: list[str]) -> Layout:
    """Save the kept-token image of one request to `path` (PNG) -> its layout.

    frames: uint8 (T, H, W, 3), the sampled frames (`Clip.frames`); timestamps: (T,) seconds.
    """
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    num_panels = fates.grid[0]
    entries = legend_entries(fates)
    legend_columns = 3
    legend_rows = max(LEGEND_ROWS, -(-len(entries) // legend_columns))  # room for 6 entries: equal sizes across presets
    geometry = layout(num_panels, frames.shape[1], frames.shape[2], legend_rows)
    width, height = geometry.size
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    try:
        kept = (fates.outcome() == KEPT).reshape(num_panels, -1).sum(dim=1).tolist()
        fill, groups = cell_fill(fates), fates.group.numpy().reshape(fates.grid)
        step = fates.frames_per_grid_frame
        for index, (left, top, right, bottom) in enumerate(geometry.panels):
            axes = figure.add_axes((left / width, 1 - bottom / height, (right - left) / width, (bottom - top) / height))
            frame = frames[min(index * step, len(frames) - 1)]
            axes.imshow(frame, extent=(0, 1, 0, 1), aspect="auto", interpolation="bilinear")
            overlay = cell_overlay(fill[index], groups[index], round(bottom) - round(top), round(right) - round(left))
            axes.imshow(overlay, extent=(0, 1, 0, 1), aspect="auto", interpolation="none")
            axes.set_xlim(0, 1)
            axes.set_ylim(0, 1)
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_xlabel(panel_caption(fates, index, timestamps, kept[index]), fontsize=7, labelpad=2)
        figure.text(MARGIN * DPI / width, 1 - MARGIN * DPI / height, "\n".join(title), fontsize=9,
                    va="top", ha="left", wrap=False)
        handles = [Patch(label=label, **style) for label, style in entries]
        figure.legend(handles=handles, loc="lower left", ncol=legend_columns, fontsize=7, frameon=False,
                      bbox_to_anchor=(MARGIN * DPI / width, MARGIN * DPI / height * 0.5))
        figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)
    return geometry
