"""`--show-kept`: the sampled frames in a grid, each visual token's cell shaded by its fate.

One panel per frame of the token grid (the Qwen families encode two sampled frames as one
temporal patch: their panel shows the pair's first frame, captioned with both times). A token's
cell covers the part of the frame its features come from: every family resizes the whole frame to
its vision input, so the (rows x cols) token grid maps evenly onto the frame (LLaVA-OneVision's
pooled 14x14, Qwen's 2x2-merged 28 px cells, SmolVLM2's pixel-shuffled cells). Each cell has
one role (`cell_roles`):

- kept (its own token reached the last decoder layer): clear;
- kept, standing for a merge group (the one cell whose position the group's token carries):
  clear with a thick outline in the group's colour;
- merged away (its content went into a kept token drawn at another cell): diagonal stripes in
  that group's colour, the frame visible between them (no veil: its content did reach the LLM);
- dropped before the LLM: a grey veil (mid grey shows on dark and bright frames alike);
- dropped inside the LLM at layer k: tinted, one colour per layer (merged or not: gone either way).

A frame a stage dropped whole (a frame selector before the encoder, e.g. `dedup`, which never
encoded it) is veiled like any token dropped before the LLM, and its caption names the stage.

Each panel's caption counts the tokens the LLM carries to its last layer from that frame (kept
and group cells, once per token) and its merged-away cells, so the captions add up to the
title's "visual tokens N → n". The data comes from `pruning.provenance.TokenFates`, the same
object `--json`'s `kept` summarises (there kept + merged away = `kept_per_frame`), so the image
and the counts cannot disagree. matplotlib (the `plot` extra) is imported only when drawing.
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
GAP, CAPTION, MARGIN, TITLE = 0.08, 0.36, 0.15, 0.62  # inches; captions: time, then counts
LEGEND_ROW, LEGEND_ROWS = 0.24, 2  # inches per legend row; rows always reserved
VEIL = (0.5, 0.5, 0.5, 0.85)  # dropped before the LLM: mid grey, visible on dark and on bright frames
LAYER_ALPHA = 0.72
STRIPE_PERIOD, STRIPE_WIDTH, OUTLINE = 6, 2, 3  # pixels of the saved image: merged-away stripes, group outlines
STRIPE_ALPHA = 0.85

# cell roles (`cell_roles`)
KEPT_ALONE, GROUP_TOKEN, MERGED_AWAY, DROPPED_BEFORE, DROPPED_INSIDE = range(5)


def check_matplotlib() -> None:
    """BadInput (one line) when matplotlib is missing, before any model is loaded."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput('--show-kept needs matplotlib, which is not installed: pip install -e ".[plot]"') from None


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


@dataclass(frozen=True)
class CellRoles:
    """What the drawing shows of each cell, (frames, rows, cols) arrays over the token grid.

    role: KEPT_ALONE, GROUP_TOKEN, MERGED_AWAY, DROPPED_BEFORE or DROPPED_INSIDE;
    colour: index into `group_colour` of the kept merge group a GROUP_TOKEN or MERGED_AWAY cell
        belongs to (numbered in order of first cell), -1 for the others;
    layer: decoder layer a DROPPED_INSIDE cell's token left at, -1 for the others."""

    role: np.ndarray
    colour: np.ndarray
    layer: np.ndarray

    def per_frame(self, *roles: int) -> list[int]:
        """Cells of each grid frame with one of `roles`."""
        return np.isin(self.role, roles).reshape(len(self.role), -1).sum(axis=1).tolist()

    def tokens_per_frame(self) -> list[int]:
        """LLM tokens reaching the last layer, counted at the frame of the cell each is drawn at."""
        return self.per_frame(KEPT_ALONE, GROUP_TOKEN)


def representatives(fates: TokenFates) -> np.ndarray:
    """(N,) bool: the cell each LLM token is drawn at (`TokenFates.representative`; when unknown,
    the earliest cell of each merge group, the default of `VisualTokens.merge`)."""
    if fates.representative is not None:
        return fates.representative.numpy().astype(bool)
    group = fates.group.numpy()
    first = np.zeros(len(group), dtype=bool)
    first[group < 0] = True
    _, earliest = np.unique(group, return_index=True)
    first[earliest] = True
    return first & (fates.row.numpy() >= 0)


def cell_roles(fates: TokenFates) -> CellRoles:
    """Every cell's role, merge-group colour and drop layer (see `CellRoles`)."""
    outcome = fates.outcome().numpy()
    group = fates.group.numpy()
    merged = group >= 0
    role = np.full(len(outcome), KEPT_ALONE)
    role[(outcome == KEPT) & merged] = MERGED_AWAY
    role[(outcome == KEPT) & merged & representatives(fates)] = GROUP_TOKEN
    role[outcome == DROPPED_BEFORE_LLM] = DROPPED_BEFORE
    role[outcome == DROPPED_IN_LLM] = DROPPED_INSIDE
    colour = np.full(len(outcome), -1)
    kept_group = (outcome == KEPT) & merged
    _, first, numbered = np.unique(group[kept_group], return_index=True, return_inverse=True)
    colour[kept_group] = np.argsort(np.argsort(first))[numbered]  # in order of each group's first cell
    layer = np.where(role == DROPPED_INSIDE, fates.left_at_layer.numpy(), -1)
    return CellRoles(*(values.reshape(fates.grid) for values in (role, colour, layer)))


def layer_colours(layers: list[int]) -> dict[int, tuple[float, float, float]]:
    """A distinct warm-to-cool colour per in-LLM layer that dropped tokens."""
    palette = [(0.98, 0.55, 0.10), (0.85, 0.15, 0.45), (0.45, 0.20, 0.80), (0.10, 0.55, 0.85),
               (0.10, 0.70, 0.55), (0.60, 0.75, 0.10)]
    return {layer: palette[i % len(palette)] for i, layer in enumerate(sorted(layers))}


def group_colour(group: int) -> tuple[float, float, float]:
    """Bright colours for merge groups (cycled); neighbouring group ids differ in hue."""
    return colorsys.hsv_to_rgb((group * 0.61803398875) % 1.0, 0.85, 1.0)


def cell_fill(roles: CellRoles) -> np.ndarray:
    """(frames, rows, cols, 4) float RGBA shading of every cell (transparent = kept)."""
    role, layer = roles.role.reshape(-1), roles.layer.reshape(-1)
    rgba = np.zeros((len(role), 4))
    rgba[role == DROPPED_BEFORE] = VEIL
    for number, colour in layer_colours(sorted(set(layer[layer >= 0].tolist()))).items():
        rgba[layer == number] = (*colour, LAYER_ALPHA)
    return rgba.reshape(*roles.role.shape, 4)


def cell_overlay(fill: np.ndarray, role: np.ndarray, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width, 4) float RGBA drawn over one panel of height x width pixels.

    fill: (rows, cols, 4) the cells' shading (`cell_fill` of one grid frame); role, colour:
    (rows, cols) of that frame (`CellRoles`). A GROUP_TOKEN cell gets an outline inside its
    border, a MERGED_AWAY cell stripes (STRIPE_WIDTH of every STRIPE_PERIOD pixels), both in the
    group's colour."""
    rows, cols = role.shape
    cell_row = (np.arange(height) * rows // height)[:, None]  # (height, 1)
    cell_col = (np.arange(width) * cols // width)[None, :]  # (1, width)
    image = fill[cell_row, cell_col]  # (height, width, 4), a copy
    role, colour = role[cell_row, cell_col], colour[cell_row, cell_col]
    if (colour >= 0).any():
        y, x = np.mgrid[0:height, 0:width]
        top = (cell_row * height + rows - 1) // rows  # first pixel row of each pixel's cell
        bottom = ((cell_row + 1) * height + rows - 1) // rows  # one past its last
        left = (cell_col * width + cols - 1) // cols
        right = ((cell_col + 1) * width + cols - 1) // cols
        outline = OUTLINE if min(height // rows, width // cols) >= 16 else 1  # small cells: thin lines
        edge = (y - top < outline) | (bottom - 1 - y < outline) | (x - left < outline) | (right - 1 - x < outline)
        palette = np.array([group_colour(g) for g in range(int(colour.max()) + 1)])
        framed = (role == GROUP_TOKEN) & edge
        image[framed] = np.concatenate([palette[colour[framed]], np.ones((int(framed.sum()), 1))], axis=1)
        striped = (role == MERGED_AWAY) & (((x + y) % STRIPE_PERIOD) < STRIPE_WIDTH)
        image[striped] = np.concatenate([palette[colour[striped]], np.full((int(striped.sum()), 1), STRIPE_ALPHA)], axis=1)
    return image


def dropped_whole_by(fates: TokenFates, grid_frame: int) -> str | None:
    """The pre-LLM stage that dropped every token of `grid_frame`, or None (some token went on,
    or several stages dropped them)."""
    _, rows, cols = fates.grid
    cells = slice(grid_frame * rows * cols, (grid_frame + 1) * rows * cols)
    stages = fates.left_at_stage[cells].unique().tolist()
    if len(stages) != 1 or stages[0] < 0 or bool((fates.row[cells] >= 0).any()):
        return None
    return fates.stages[stages[0]]


def panel_caption(fates: TokenFates, grid_frame: int, timestamps, tokens: int, merged_away: int) -> str:
    """Two lines: the frame's time(s), then what reaches the LLM's last layer from it (or the
    stage that dropped the whole frame)."""
    step = fates.frames_per_grid_frame
    first = grid_frame * step
    times = [float(timestamps[t]) for t in range(first, min(first + step, len(timestamps)))]
    when = f"{times[0]:.1f} s" if len(times) == 1 else f"{times[0]:.1f}–{times[-1]:.1f} s"
    stage = dropped_whole_by(fates, grid_frame)
    if stage is not None:
        return f"{when}\nframe dropped ({stage})"
    counts = f"{tokens} kept" + (f" · {merged_away} merged away" if merged_away else "")
    return f"{when}\n{counts}"


def describe(model: str, preset: str, keep: float | None, question: str, stats) -> list[str]:
    """The title lines: model, preset, keep and retention, then the question."""
    tokens = stats.tokens
    keep_text = "paper default" if keep is None else f"{keep:g}"
    first = (f"{model} · preset {preset} · keep {keep_text} · retention {tokens.layer_avg_retention:.1%} "
             f"(layer-averaged) · visual tokens {tokens.visual_tokens_before} → {tokens.visual_tokens_after}")
    question = " ".join(question.split())
    return [first, "Q: " + (question if len(question) <= 140 else question[:139] + "…")]


def legend_entries(fates: TokenFates, roles: CellRoles) -> list[tuple[str, dict]]:
    """(label, patch style) for the roles present in this request (kept is always listed)."""
    present = set(np.unique(roles.role).tolist())
    entries = [("kept: its own token (clear)", {"facecolor": "white", "edgecolor": "0.4"})]
    groups = int(roles.colour.max()) + 1 if roles.colour.size else 0
    if GROUP_TOKEN in present:
        entries.append((f"kept: a merge group's token, at this cell (outline; {groups} groups)",
                        {"facecolor": "white", "edgecolor": group_colour(0), "linewidth": 2}))
    if MERGED_AWAY in present:
        entries.append(("merged away into the outlined cell of its colour (stripes)",
                        {"facecolor": (0.92, 0.92, 0.92), "edgecolor": group_colour(0), "hatch": "////"}))
    if DROPPED_BEFORE in present:
        stages = ", ".join(fates.stages) if fates.stages else "pre-LLM stages"
        entries.append((f"dropped before the LLM ({stages})", {"facecolor": VEIL[:3], "edgecolor": "0.4"}))
    layers = roles.layer[roles.layer >= 0].tolist()
    for layer, colour in layer_colours(sorted(set(layers))).items():
        entries.append((f"dropped in the LLM at layer {layer}", {"facecolor": colour, "edgecolor": "0.4"}))
    return entries


def legend_columns_for(num_panels: int) -> int:
    """Legend columns that fit the figure's width (a label is up to ~3.4 inches wide)."""
    columns = max(1, min(MAX_COLUMNS, num_panels))
    return max(1, min(3, int((2 * MARGIN + columns * PANEL_WIDTH + (columns - 1) * GAP) // 3.4)))


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
    roles = cell_roles(fates)
    entries = legend_entries(fates, roles)
    legend_columns = legend_columns_for(num_panels)
    legend_rows = max(LEGEND_ROWS, -(-len(entries) // legend_columns))  # rows always reserved: equal sizes across presets
    geometry = layout(num_panels, frames.shape[1], frames.shape[2], legend_rows)
    width, height = geometry.size
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    try:
        tokens, merged_away = roles.tokens_per_frame(), roles.per_frame(MERGED_AWAY)
        fill = cell_fill(roles)
        step = fates.frames_per_grid_frame
        for index, (left, top, right, bottom) in enumerate(geometry.panels):
            axes = figure.add_axes((left / width, 1 - bottom / height, (right - left) / width, (bottom - top) / height))
            frame = frames[min(index * step, len(frames) - 1)]
            axes.imshow(frame, extent=(0, 1, 0, 1), aspect="auto", interpolation="bilinear")
            overlay = cell_overlay(fill[index], roles.role[index], roles.colour[index],
                                   round(bottom) - round(top), round(right) - round(left))
            axes.imshow(overlay, extent=(0, 1, 0, 1), aspect="auto", interpolation="none")
            axes.set_xlim(0, 1)
            axes.set_ylim(0, 1)
            axes.set_xticks([])
            axes.set_yticks([])
            caption = panel_caption(fates, index, timestamps, tokens[index], merged_away[index])
            axes.set_xlabel(caption, fontsize=7, labelpad=2, linespacing=1.1)
        figure.text(MARGIN * DPI / width, 1 - MARGIN * DPI / height, "\n".join(title), fontsize=9,
                    va="top", ha="left", wrap=False)
        handles = [Patch(label=label, **style) for label, style in entries]
        figure.legend(handles=handles, loc="lower left", ncol=legend_columns, fontsize=7, frameon=False,
                      bbox_to_anchor=(MARGIN * DPI / width, MARGIN * DPI / height * 0.5))
        figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)
    return geometry
