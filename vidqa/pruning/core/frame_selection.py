"""Frames chosen before the vision encoder: running a `BeforeEncoder` stage over a clip, the clip
of the frames it kept, and the record of its choice.

A `BeforeEncoder` stage decides per unit (1 frame, or the family's temporal patch of 2 frames)
on one chunk of whole units at a time, carrying its state between chunks (`ChunkSelection`);
`select_units` runs it over a whole clip in chunks, and `selected_clip` makes the `SelectedClip`
the engine then preprocesses and encodes: the kept frames with their own indices and timestamps,
and the `FrameSelection` that says which frames of the decoded clip they are. The pruner reads
that record for the stats (pruner.py); provenance (`TokenFates`) is lifted back onto the decoded
clip with `FrameSelection.lift`, so `--json`'s `kept` and `--show-kept` show the dropped frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from vidqa.video.decode import Clip


@dataclass
class ChunkSelection:
    """What a `BeforeEncoder` stage chose on one chunk of units.

    keep: one bool per unit of the chunk; scores: what each decision read (frame dedup: the
    difference to the last kept unit; None where nothing was compared, e.g. a clip's first unit);
    carry: the state the next chunk of the same clip starts from."""

    keep: list[bool]
    scores: list[float | None]
    carry: object = None


@dataclass(frozen=True)
class FrameSelection:
    """Which frames of a decoded clip a `BeforeEncoder` stage kept.

    stage: its name in the preset; unit: frames per unit (the family's temporal patch size, or
    1); num_frames: frames decoded; kept_units: the units kept, increasing (unit u is decoded
    frames u * unit .. u * unit + unit - 1; the last unit may be shorter); scores: per unit, what
    the stage's decision read (None: nothing)."""

    stage: str
    unit: int
    num_frames: int
    kept_units: tuple[int, ...]
    scores: tuple[float | None, ...] = ()

    @property
    def num_units(self) -> int:
        return -(-self.num_frames // self.unit)

    def kept_frames(self) -> np.ndarray:
        """(K,) int64 indices into the decoded clip's frames of the kept frames, increasing."""
        frames = [frame for unit in self.kept_units
                  for frame in range(unit * self.unit, min((unit + 1) * self.unit, self.num_frames))]
        return np.asarray(frames, dtype=np.int64)

    def details(self) -> dict:
        """The record's `pruning.frame_selection` entry (--json)."""
        return {
            "stage": self.stage,
            "frames_in": self.num_frames,
            "frames_kept": len(self.kept_frames()),
            "frames_per_unit": self.unit,
            "kept_frames": self.kept_frames().tolist(),
            "scores": [None if score is None else round(float(score), 4) for score in self.scores],
        }

    def lift(self, fates):
        """`fates` (pruning/core/provenance.TokenFates over the kept frames' token grid) over the
        decoded clip's grid: the tokens of the units not kept are dropped before the LLM by this
        stage; every other token keeps its fate. A grid that does not match is returned as it is."""
        kept_grid, rows, cols = fates.grid
        if kept_grid != len(self.kept_units):
            return fates
        stages = list(fates.stages)
        left_at_stage = fates.left_at_stage
        if self.stage not in stages:  # the pruner records it first; put it first otherwise too
            stages = [self.stage, *stages]
            left_at_stage = torch.where(left_at_stage >= 0, left_at_stage + 1, left_at_stage)
        per_frame = rows * cols
        cells = torch.arange(per_frame)
        target = (torch.tensor(self.kept_units, dtype=torch.long)[:, None] * per_frame + cells).reshape(-1)
        total = self.num_units * per_frame

        def spread(values: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((total,), fill, dtype=values.dtype)
            out[target] = values
            return out

        return replace(
            fates,
            grid=(self.num_units, rows, cols),
            sampled_frames=self.num_frames,
            row=spread(fates.row, -1),
            left_at_layer=spread(fates.left_at_layer, -1),
            left_at_stage=spread(left_at_stage, stages.index(self.stage)),
            group=spread(fates.group, -1),
            stages=stages,
            representative=None if fates.representative is None else spread(fates.representative, False),
        )


@dataclass(frozen=True, eq=False)
class SelectedClip(Clip):
    """The frames of a decoded clip that a `BeforeEncoder` stage kept, with their own indices
    and timestamps; `frame_selection` says which frames of the decoded clip they are."""

    frame_selection: FrameSelection | None = field(default=None)
    source: Clip | None = field(default=None)  # the decoded clip the frames were picked from
    selected_with: tuple = field(default=())  # (stage name, stage, unit) that picked them


def frames_per_unit(adapter) -> int:
    """Frames the family encodes as one unit: its video processor's temporal patch size (Qwen-VL:
    2), else 1."""
    processor = getattr(getattr(adapter, "processor", None), "video_processor", None)
    size = getattr(processor, "temporal_patch_size", None)
    return int(size) if size else 1


def select_units(stage, frames: np.ndarray, unit: int, chunk_units: int | None = None) -> ChunkSelection:
    """`stage.select` over a whole clip, in chunks of `chunk_units` units (None: one chunk), the
    carry handed from each chunk to the next. frames: uint8 (T, H, W, 3). Returns the choice
    over all ceil(T / unit) units (its carry: the last chunk's)."""
    num_units = -(-len(frames) // unit)
    step = num_units if not chunk_units else int(chunk_units)
    keep: list[bool] = []
    scores: list[float | None] = []
    carry = None
    for start in range(0, num_units, max(step, 1)):
        chunk = frames[start * unit:(start + step) * unit]
        choice = stage.select(chunk, unit, carry)
        expected = -(-len(chunk) // unit)
        if len(choice.keep) != expected or len(choice.scores) != expected:
            raise ValueError(f"stage '{stage.kind}' chose {len(choice.keep)} of {expected} units")
        keep += [bool(k) for k in choice.keep]
        scores += list(choice.scores)
        carry = choice.carry
    return ChunkSelection(keep, scores, carry)


def frame_selection(name: str, unit: int, num_frames: int, choice: ChunkSelection) -> FrameSelection:
    """The record of `choice` (every unit of a clip of `num_frames` frames, e.g. the chunks of a
    stream put together); a choice that kept nothing keeps the first unit (the LLM always sees
    the video)."""
    kept_units = tuple(index for index, keep in enumerate(choice.keep) if keep) or (0,)
    return FrameSelection(stage=name, unit=unit, num_frames=num_frames, kept_units=kept_units,
                          scores=tuple(choice.scores))


def selected_clip(clip: Clip, name: str, stage, unit: int, chunk_units: int | None = None) -> SelectedClip:
    """The clip of the frames `stage` keeps (at least the first unit), each with its own index and
    timestamp. `sample_fps` stays the decoded clip's rate (its own, or its mean frame spacing):
    the rate the kept frames were sampled at, not the thinner rate left after dropping."""
    selection = frame_selection(name, unit, clip.num_frames, select_units(stage, clip.frames, unit, chunk_units))
    return kept_clip(clip, selection, (name, stage, unit))


def planned_selected_clip(clip: Clip, chunks, name: str, stage, unit: int) -> SelectedClip:
    """`selected_clip` of a planned clip (frames not decoded), choosing a chunk at a time: `chunks`
    yields its frames decoded in order, as Clips of whole units (the last may end in a partial
    one); each is read by `stage.select` with the carry and dropped. Returns a PLANNED
    SelectedClip of the kept frames (frames None), whose frames are decoded again, by index, when
    they are encoded (engine/streaming.py): only one chunk of pixels is held at a time."""
    keep: list[bool] = []
    scores: list[float | None] = []
    carry, seen = None, 0
    for chunk in chunks:
        if seen % unit:
            raise ValueError(f"a chunk of {clip.num_frames} frames ended inside a {unit}-frame unit")
        choice = stage.select(chunk.frames, unit, carry)
        expected = -(-chunk.num_frames // unit)
        if len(choice.keep) != expected or len(choice.scores) != expected:
            raise ValueError(f"stage '{stage.kind}' chose {len(choice.keep)} of {expected} units")
        keep += [bool(k) for k in choice.keep]
        scores += list(choice.scores)
        carry, seen = choice.carry, seen + chunk.num_frames
    selection = frame_selection(name, unit, clip.num_frames, ChunkSelection(keep, scores, carry))
    return kept_clip(clip, selection, (name, stage, unit))


def kept_clip(clip: Clip, selection: FrameSelection, selected_with: tuple) -> SelectedClip:
    """The frames `selection` keeps of `clip` (decoded or planned), with their own indices and
    timestamps; `sample_fps` stays the clip's rate (its own, or its mean frame spacing)."""
    frames = selection.kept_frames()
    return SelectedClip(
        frames=None if clip.frames is None else clip.frames[frames], indices=np.asarray(clip.indices)[frames],
        timestamps=np.asarray(clip.timestamps)[frames], fps=clip.fps, duration=clip.duration,
        total_frames=clip.total_frames, decoder=clip.decoder, notes=list(clip.notes),
        sample_fps=clip.sample_fps if clip.sample_fps is not None else mean_rate(clip.timestamps),
        path=clip.path, frame_selection=selection, source=clip, selected_with=selected_with,
    )


def mean_rate(timestamps) -> float | None:
    """Frames per second of evenly spaced `timestamps` (their mean spacing); None for fewer than two."""
    times = [float(t) for t in timestamps]
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])
