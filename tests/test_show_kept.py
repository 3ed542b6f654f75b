"""Token provenance (VisualTokens.origin, pruning/core/provenance.py) and `--show-kept` images."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from helpers import grid_tokens, request_state

from vidqa.engine import request as engine
from vidqa.models import load_model
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.core.provenance import DROPPED_BEFORE_LLM, DROPPED_IN_LLM, KEPT, token_fates
from vidqa.pruning.methods.fastvid import STPruneStage
from vidqa.pruning.methods.visionzip import VisionZip
from vidqa.render.show_kept import (
    DROPPED_BEFORE,
    DROPPED_INSIDE,
    GROUP_TOKEN,
    LEGEND_ROWS,
    MERGED_AWAY,
    cell_roles,
    image_name,
    layout,
    panel_caption,
)
from vidqa.tensors.tokens import VisualTokens
from vidqa.testing.videos import static_left_half_frames, write_video
from vidqa.video.decode import load_clip

QUESTION = "what happens in this video ?"
FRAMES = 8  # the tiny LLaVA-OneVision: 4x4 pooled tokens per 112 px frame


@pytest.fixture(scope="module")
def planted_video(tmp_path_factory):
    """Left half a fixed checkerboard in every frame, right half new noise every frame."""
    frames = static_left_half_frames(num_frames=16, size=(112, 112), right="noise")
    return write_video(tmp_path_factory.mktemp("planted") / "static_left.mp4", frames, fps=8.0)


@pytest.fixture(scope="module")
def adapter(tiny_llava):
    return load_model(str(tiny_llava), device="cpu", dtype="float32")


def grid(frames=2, side=2, channels=3, seed=0) -> VisualTokens:
    features = torch.randn(frames, side * side, channels, generator=torch.Generator().manual_seed(seed))
    return grid_tokens(features, text_before=1)


# --- VisualTokens.origin ------------------------------------------------------------------------


def test_origin_follows_select_merge_and_concatenate():
    tokens = grid()  # 8 tokens
    assert tokens.origin.tolist() == list(range(8))
    picked = tokens.select(torch.tensor([6, 1, 3]))
    assert picked.origin.tolist() == [-1, 1, -1, 2, -1, -1, 0, -1]
    assert tokens.select(torch.tensor([False, True] * 4)).origin.tolist() == [-1, 0, -1, 1, -1, 2, -1, 3]
    # merge rows: token -> output row; -1 dropped
    merged = picked.merge(torch.tensor([0, 0, -1]), 1)
    assert merged.origin.tolist() == [-1, 0, -1, -1, -1, -1, 0, -1]
    # pieces of one video, each merged on its own, put back together
    first = tokens.select(torch.arange(4)).merge(torch.tensor([0, 1, 0, -1]), 2)
    second = tokens.select(torch.arange(4, 8)).merge(torch.tensor([0, 0, 0, 0]), 1)
    joined = VisualTokens.concatenate([first, second])
    assert joined.origin.tolist() == [0, 1, 0, -1, 2, 2, 2, 2]
    # a stage that merged rows itself says so with merged_from
    representatives = tokens.select(torch.tensor([0, 5]))
    assert representatives.merged_from(tokens, torch.tensor([0, 0, -1, -1, 1, 1, 1, -1])).origin.tolist() == [
        0, 0, -1, -1, 1, 1, 1, -1]
    assert tokens.replace(meta={"x": torch.zeros(8)}).origin.tolist() == list(range(8))


def test_visionzip_and_stprune_record_their_merges():
    frames, side = 3, 4
    per_frame = side * side
    generator = torch.Generator().manual_seed(1)
    tokens = grid(frames, side, channels=8, seed=2)
    tokens.meta["vision_attention"] = torch.rand(frames * per_frame, generator=generator)
    tokens.meta["vision_keys"] = torch.randn(frames * per_frame, 4, generator=generator)
    zipped = VisionZip(ratio=0.25, dominant_share=0.5).apply(tokens, request_state())
    assert len(zipped) == frames * 4
    origin = zipped.origin
    assert bool((origin >= 0).all())  # every token is dominant or merged into a contextual one
    kept_rows = torch.arange(len(zipped))
    assert torch.equal(origin[zipped.seq_index - 1], kept_rows)  # each row stands for its own token
    assert torch.equal(zipped.frame[origin], tokens.frame)  # merges stay within their frame
    assert int(torch.bincount(origin).max()) > 1

    pruned = STPruneStage(ratio=0.5, context_share=0.5, anchor_every=2).apply(tokens, request_state())
    origin = pruned.origin
    assert torch.equal(origin[pruned.seq_index - 1], torch.arange(len(pruned)))
    assert bool((origin >= 0).all())  # the non-salient tokens all joined a density peak
    assert int(torch.bincount(origin).max()) > 1


# --- fates of a request ------------------------------------------------------------------------


def fake_state(tokens, kept_rows=None, merges=None, stage_origins=None):
    return SimpleNamespace(llm_tokens=tokens, kept_rows=kept_rows or {}, layer_merges=merges or {},
                           stage_origins=stage_origins or {})


def test_fates_combine_pre_llm_provenance_with_in_llm_rows():
    tokens = grid()  # 2 frames x 2x2
    before = tokens.select(torch.tensor([0, 1, 2, 4, 5, 6]))  # tokens 3 and 7 dropped
    llm = before.merge(torch.tensor([0, 1, 2, 3, 3, 4]), 5)  # tokens 4 and 5 merged
    visual_rows = torch.tensor([10, 11, 12, 13, 14])  # LLM-input rows of the 5 LLM tokens
    text = torch.tensor([0, 1, 2, 20, 21])
    kept_rows = {2: torch.cat([text[:3], visual_rows[[0, 2, 3, 4]], text[3:]]),  # LLM token 1 leaves at 2
                 3: torch.cat([text[:3], visual_rows[[0, 3]], text[3:]])}  # tokens 2 and 4 leave at 3
    state = fake_state(llm, kept_rows, stage_origins={"select": before.origin, "merge": llm.origin})
    fates = token_fates(state, visual_rows, num_layers=4, sampled_frames=2)
    assert fates.row.tolist() == [0, 1, 2, -1, 3, 3, 4, -1]
    assert fates.outcome().tolist() == [KEPT, DROPPED_IN_LLM, DROPPED_IN_LLM, DROPPED_BEFORE_LLM,
                                        KEPT, KEPT, DROPPED_IN_LLM, DROPPED_BEFORE_LLM]
    assert fates.left_at_layer.tolist() == [-1, 2, 3, -1, -1, -1, 3, -1]
    assert fates.left_at_stage.tolist() == [-1, -1, -1, 0, -1, -1, -1, 0]
    assert fates.group.tolist() == [-1, -1, -1, -1, 0, 0, -1, -1]
    compact = fates.compact()
    assert compact["kept_per_frame"] == [1, 2]
    assert compact["merged_per_frame"] == [0, 2]
    assert compact["dropped_before_llm_per_frame"] == [1, 1]
    assert compact["dropped_in_llm_per_frame"] == [2, 1]
    assert compact["dropped_at_layer"] == {"2": 1, "3": 2}
    assert compact["dropped_by_stage"] == {"select": 2}
    assert compact["cells_per_layer"] == [6, 6, 5, 3]
    # an in-LLM merge (e.g. HoliTom): LLM token 2 merged into token 0 at layer 3 joins its group and fate
    merged = token_fates(fake_state(llm, kept_rows, merges={3: (torch.tensor([12]), torch.tensor([10]))}),
                         visual_rows, num_layers=4, sampled_frames=2)
    assert merged.outcome()[2] == KEPT and merged.group[0] == merged.group[2] >= 0


def test_each_llm_token_is_drawn_once_at_the_cell_whose_position_it_carries():
    """A kept token stands out at one cell (its representative; for an in-LLM merge, the
    target's); the other cells it carries are merged away; captions count tokens, not cells."""
    tokens = grid()  # 2 frames x 2x2
    before = tokens.select(torch.tensor([0, 1, 2, 4, 5, 6]))  # tokens 3 and 7 dropped
    llm = before.merge(torch.tensor([0, 1, 2, 3, 3, 4]), 5, representatives=torch.tensor([0, 1, 2, 4, 5]))  # 4 -> 5
    visual_rows = torch.tensor([10, 11, 12, 13, 14])
    text = torch.tensor([0, 1, 2, 20, 21])
    kept_rows = {2: torch.cat([text[:3], visual_rows[[0, 2, 3, 4]], text[3:]]),  # LLM token 1 leaves at 2
                 3: torch.cat([text[:3], visual_rows[[0, 3]], text[3:]])}  # tokens 2 and 4 leave at 3
    merges = {3: (torch.tensor([12]), torch.tensor([10]))}  # ... LLM token 2 by merging into token 0
    state = fake_state(llm, kept_rows, merges, stage_origins={"select": before.origin, "merge": llm.origin})
    fates = token_fates(state, visual_rows, num_layers=4, sampled_frames=2)
    assert fates.representative.tolist() == [True, True, False, False, False, True, True, False]  # 2 went into 0
    roles = cell_roles(fates)
    assert roles.role.reshape(-1).tolist() == [GROUP_TOKEN, DROPPED_INSIDE, MERGED_AWAY, DROPPED_BEFORE,
                                               MERGED_AWAY, GROUP_TOKEN, DROPPED_INSIDE, DROPPED_BEFORE]
    assert roles.colour.reshape(-1).tolist() == [0, -1, 0, -1, 1, 1, -1, -1]  # a merged-away cell: its token's colour
    assert roles.layer.reshape(-1).tolist() == [-1, 2, -1, -1, -1, -1, 3, -1]
    assert roles.tokens_per_frame() == [1, 1]  # the two LLM tokens that reach the last layer
    assert roles.per_frame(MERGED_AWAY) == [1, 1]
    assert [t + m for t, m in zip(roles.tokens_per_frame(), roles.per_frame(MERGED_AWAY))] == \
        fates.compact()["kept_per_frame"]
    assert panel_caption(fates, 1, [0.0, 0.5], 1, 1) == "0.5 s\n1 kept · 1 merged away"
    assert panel_caption(fates, 0, [0.0, 0.5], 3, 0) == "0.0 s\n3 kept"
    # without the representatives (a TokenFates made by hand), each group's earliest cell
    unknown = cell_roles(replace(fates, representative=None))
    assert unknown.role.reshape(-1)[[0, 2, 4, 5]].tolist() == [GROUP_TOKEN, MERGED_AWAY, GROUP_TOKEN, MERGED_AWAY]


def test_no_provenance_means_no_fates():
    tokens = grid().replace(origin=None)
    assert token_fates(fake_state(tokens), torch.arange(len(tokens)), 4, 2) is None


def request(adapter, clip, preset, keep=None, params=()):
    pruner = build_pruner(load_preset(preset, list(params)), adapter, keep=keep)
    return engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=2), pruner=pruner)


def test_fastv_fates_match_the_layer_counts(adapter, planted_video):
    clip = load_clip(planted_video, num_frames=FRAMES)
    result = request(adapter, clip, "fastv", keep=0.5)
    fates, tokens = result.kept, result.stats.tokens
    assert fates.cells_per_layer() == tokens.visual_tokens_per_layer  # no merges: one cell per row
    layer = next(i for i, n in enumerate(tokens.visual_tokens_per_layer) if n < tokens.visual_tokens_before)
    assert set(fates.left_at_layer[fates.left_at_layer >= 0].tolist()) == {layer}
    assert int((fates.outcome() == KEPT).sum()) == tokens.visual_tokens_after
    assert not bool((fates.row < 0).any())  # FastV drops nothing before the LLM


def test_prunevid_merges_the_static_half_across_frames(adapter, planted_video):
    """The planted clip's left half never changes: PruneVid's static tokens are merged over the
    frames of a segment, so every left-half cell shares its token with the same cell of other frames."""
    clip = load_clip(planted_video, num_frames=FRAMES)
    result = request(adapter, clip, "prunevid", params=["cluster_ratio=1"])  # no spatial clustering
    fates = result.kept
    frames, rows, cols = fates.grid
    column = torch.arange(frames * rows * cols) % cols
    left = column < cols // 2
    assert bool((fates.group[left] >= 0).all())
    for group in fates.group[left].unique().tolist():
        members = fates.group == group
        assert len(set(fates.frame[members].tolist())) >= 2  # across frames
        assert len(set(column[members].tolist())) == 1  # at one position
    in_llm = result.stats.tokens.visual_tokens_per_layer
    assert sum(1 for n in in_llm if n < in_llm[0]) > 0 and fates.compact()["dropped_at_layer"]


def surviving_units(fates, mask) -> int:
    """Distinct LLM rows standing for the cells in `mask`: each unmerged cell, and each group once."""
    alone = int((mask & (fates.group < 0)).sum())
    return alone + len(fates.group[mask & (fates.group >= 0)].unique())


@pytest.mark.parametrize("preset, keep", [("fastv", 0.5), ("prunevid", None), ("sparsevlm", 0.5),
                                          ("visionzip", 0.3), ("adatp", 0.5), ("fastvid", 0.3),
                                          ("flashvid", 0.4), ("holitom", 0.4)])
def test_every_surviving_row_is_one_group_of_cells(adapter, planted_video, preset, keep):
    """Kept cells, counted once per group, are exactly the visual rows leaving the last layer;
    the LLM tokens the cells point to are the rows the pre-LLM stages left. Holds for
    drops and merges before the LLM (visionzip, prunevid, adatp's dedup) and inside it
    (sparsevlm's recycled rows, reported through Selection.inserted_members)."""
    clip = load_clip(planted_video, num_frames=FRAMES)
    result = request(adapter, clip, preset, keep=keep)
    fates, tokens = result.kept, result.stats.tokens
    assert surviving_units(fates, fates.outcome() == KEPT) == tokens.visual_tokens_after
    assert len(fates.row[fates.row >= 0].unique()) == tokens.visual_tokens_per_layer[0]  # the LLM's input rows
    if preset in ("prunevid", "sparsevlm", "visionzip", "adatp", "fastvid", "flashvid", "holitom"):
        assert fates.compact()["merge_groups"] > 0
    # the drawing: one strong cell per LLM token reaching the last layer, so the captions' kept
    # counts add up to the title's; a kept group's other cells are merged away, in its colour
    roles = cell_roles(fates)
    assert sum(roles.tokens_per_frame()) == tokens.visual_tokens_after
    assert [t + m for t, m in zip(roles.tokens_per_frame(), roles.per_frame(MERGED_AWAY))] == \
        fates.compact()["kept_per_frame"]
    group_colours = roles.colour[roles.role == GROUP_TOKEN].tolist()
    assert len(set(group_colours)) == len(group_colours)
    assert set(roles.colour[roles.role == MERGED_AWAY].tolist()) <= set(group_colours)


# --- the image ---------------------------------------------------------------------------------


def shaded_kept_counts(png, fates_grid, frames: np.ndarray) -> list[int]:
    """Per panel, the cells drawn clear (kept), read from the saved image's pixels. A dropped cell
    is veiled (85% grey), which flattens the planted clip's texture (checkerboard, noise) to 15%
    of its contrast: a cell is counted kept when its pixels keep at least 40% of the contrast of
    the same part of the frame."""
    from matplotlib import pyplot as plt

    image = plt.imread(str(png))[..., :3]  # (H, W, 3) floats in 0..1
    num_frames, rows, cols = fates_grid
    height, width = frames.shape[1:3]
    geometry = layout(num_frames, height, width, LEGEND_ROWS)
    counts = []
    for frame, (left, top, right, bottom) in zip(frames, geometry.panels):
        kept = 0
        for row in range(rows):
            for col in range(cols):
                inner = lambda start, end, count, index: (  # noqa: E731 - the middle 60% of a cell
                    round(start + (index + 0.2) * (end - start) / count), round(start + (index + 0.8) * (end - start) / count))
                (y0, y1), (x0, x1) = inner(top, bottom, rows, row), inner(left, right, cols, col)
                (fy0, fy1), (fx0, fx1) = inner(0, height, rows, row), inner(0, width, cols, col)
                drawn = image[y0:y1, x0:x1].std()
                source = (frame[fy0:fy1, fx0:fx1] / 255.0).std()
                assert source > 0.05  # the planted clip has texture everywhere
                kept += drawn > 0.4 * source
        counts.append(kept)
    return counts


def ask(run_cli, model, video, *extra):
    return run_cli(["ask", video, QUESTION, "--model", model, "--frames", str(FRAMES), "--max-new-tokens", "2", *extra])


def test_show_kept_png_matches_the_json_counts(run_cli, tiny_llava, planted_video, tmp_path):
    out = tmp_path / "kept.png"
    result = ask(run_cli, tiny_llava, planted_video, "--prune", "evs", "--keep", "0.4", "--json", "--show-kept", out)
    assert result.exit_code == 0, result.stderr
    kept = json.loads(result.stdout)["kept"]
    assert kept["grid"] == [FRAMES, 4, 4]
    from matplotlib import pyplot as plt

    height, width = plt.imread(str(out)).shape[:2]
    assert (width, height) == layout(FRAMES, 112, 112, LEGEND_ROWS).size
    frames = load_clip(planted_video, num_frames=FRAMES).frames
    assert shaded_kept_counts(out, kept["grid"], frames) == kept["kept_per_frame"]
    assert kept["kept_per_frame"][0] == 16 and sum(kept["kept_per_frame"]) < FRAMES * 16  # EVS keeps frame 0 whole
    assert sum(kept["dropped_before_llm_per_frame"]) == FRAMES * 16 - sum(kept["kept_per_frame"])


def test_show_kept_bad_paths_are_one_line_errors(run_cli, tiny_llava, planted_video, tmp_path):
    missing = tmp_path / "no" / "such" / "kept.png"
    assert_one_line_error(ask(run_cli, tiny_llava, planted_video, "--show-kept", missing), str(missing.parent))
    assert_one_line_error(ask(run_cli, tiny_llava, planted_video, "--show-kept", tmp_path / "kept.jpg"), ".png")
    assert_one_line_error(ask(run_cli, tiny_llava, planted_video, "--show-kept", tmp_path), "directory")
    blocked = tmp_path / "file"
    blocked.write_text("x")
    rows = tmp_path / "q.csv"
    rows.write_text(f"video,question\n{planted_video},{QUESTION}\n")
    result = run_cli(["batch", rows, "-o", tmp_path / "r.jsonl", "--model", tiny_llava, "--show-kept", blocked])
    assert_one_line_error(result, str(blocked))


def test_show_kept_without_matplotlib_says_how_to_install(run_cli, tiny_llava, planted_video, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = ask(run_cli, tiny_llava, planted_video, "--show-kept", tmp_path / "kept.png")
    assert_one_line_error(result, 'pip install -e ".[plot]"')


def test_batch_writes_one_image_per_record(run_cli, tiny_llava, planted_video, tmp_path):
    rows = tmp_path / "questions.csv"
    rows.write_text(f"id,video,question\nfirst,{planted_video},{QUESTION}\nsecond/one,{planted_video},what moves ?\n")
    images = tmp_path / "images"
    result = run_cli(["batch", rows, "-o", tmp_path / "results.jsonl", "--model", tiny_llava, "--frames", FRAMES,
                      "--max-new-tokens", "2", "--prune", "none,fastv", "--show-kept", images, "-q"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    expected = {image_name(r["id"], r["preset"], r["keep"]) for r in records}
    assert len(expected) == 4 and {p.name for p in images.iterdir()} == expected
    for record in records:
        assert record["kept_image"] == str(images / image_name(record["id"], record["preset"], record["keep"]))
        assert sum(record["kept"]["kept_per_frame"]) == record["stats"]["tokens"]["visual_tokens_after"]
    assert "/" not in image_name("second/one", "fastv", None) and image_name("a/b", "x", None) != image_name("a_b", "x", None)


def test_chat_draws_one_image_per_question(run_cli, tiny_llava, planted_video, tmp_path):
    images = tmp_path / "chat"
    result = run_cli(["chat", planted_video, "--model", tiny_llava, "--frames", FRAMES, "--max-new-tokens", "2",
                      "--prune", "evs", "--json", "--show-kept", images], input="what moves ?\nwhat is left ?\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["kept_image"] for r in records] == [str(images / "q001.png"), str(images / "q002.png")]
    assert all((images / name).stat().st_size > 0 for name in ("q001.png", "q002.png"))
    assert records[0]["kept"] == records[1]["kept"]  # a pre-LLM preset: the same tokens for every question


# --- every family's token grid -----------------------------------------------------------------


@pytest.fixture(scope="module")
def family_adapters(tmp_path_factory):
    from vidqa.testing.families import build_tiny_qwen2_5_vl, build_tiny_smolvlm
    from vidqa.testing.qwen3 import build_tiny_qwen3_vl

    def load(build, name, **options):
        return load_model(str(build(tmp_path_factory.mktemp(name))), device="cpu", dtype="float32", **options)

    return {
        "qwen2_5_vl": load(build_tiny_qwen2_5_vl, "qwen"),
        "smolvlm": load(build_tiny_smolvlm, "smol"),
        "qwen3_vl": load(build_tiny_qwen3_vl, "qwen3", max_pixels=128 * 128),
    }


@pytest.mark.parametrize("family, frames_per_cell", [("qwen2_5_vl", 2), ("smolvlm", 1), ("qwen3_vl", 2)])
def test_fates_follow_each_familys_token_grid(family_adapters, planted_video, family, frames_per_cell, tmp_path):
    """Cells are the family's tokens: Qwen's temporal patches cover two sampled frames (one panel
    each), SmolVLM2's frames are separate spans; an in-LLM and a merging preset are both tracked."""
    from vidqa.render.show_kept import describe, draw_kept

    adapter = family_adapters[family]
    clip = load_clip(planted_video, num_frames=FRAMES)
    fastv = request(adapter, clip, "fastv", keep=0.6)
    fates = fastv.kept
    assert fates.grid[0] * frames_per_cell == FRAMES and fates.frames_per_grid_frame == frames_per_cell
    assert len(fates.row) == fastv.stats.tokens.visual_tokens_before
    assert fates.cells_per_layer() == fastv.stats.tokens.visual_tokens_per_layer
    merged = request(adapter, clip, "prunevid").kept
    assert merged.compact()["merge_groups"] > 0
    assert int((merged.row >= 0).sum()) == len(merged.row)  # PruneVid merges, it does not drop before the LLM
    out = tmp_path / f"{family}.png"
    geometry = draw_kept(merged, clip.frames, clip.timestamps, out, describe("tiny", "prunevid", None, QUESTION, fastv.stats))
    from matplotlib import pyplot as plt

    assert len(geometry.panels) == fates.grid[0]
    assert plt.imread(str(out)).shape[1::-1] == geometry.size == layout(fates.grid[0], 112, 112, LEGEND_ROWS).size
