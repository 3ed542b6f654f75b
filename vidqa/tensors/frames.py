"""Whole frames merged or dropped inside the vision encoder, and the tokens that come out.

A stage inside the encoder (`pruning.core.stage.InsideEncoder`, e.g. EarlyTom's frame merge)
acts on whole frames: the unit of a per-frame encoder's attention (a SigLIP frame), which the
projector's pooling / pixel shuffle also needs whole. Its decision is a `FrameMerge`; the
adapter's hooks (models/encoder_stages.py) apply it to the layer's output and follow every
original frame through the merges with a `FrameTrack`; `frame_tokens` turns the encoder's
reduced output into `VisualTokens` on the unpruned grid, provenance included.

This module sits below both `vidqa.models` and `vidqa.pruning`, which share these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vidqa.tensors.tokens import VisualTokens


@dataclass
class FrameMerge:
    """How F frames leave a stage as M frames: output frame m is the sum of coefficients[i] *
    frame i over the frames i with rows[i] == m (every output frame has at least one member).

    rows: (F,) long in [0, M), or -1 for a dropped frame; coefficients: (F,) float, the weight of
    each member (a lone kept frame: 1). meta: optional per-OUTPUT-frame annotations, (M,) each,
    which the adapter spreads over the frame's tokens (VisualTokens.meta) for later stages.
    """

    rows: Tensor
    coefficients: Tensor
    num_frames: int
    meta: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def identity(cls, num_frames: int, device=None) -> FrameMerge:
        return cls(torch.arange(num_frames, device=device), torch.ones(num_frames, device=device), num_frames)

    def apply(self, x: Tensor) -> Tensor:
        """(F, ...) -> (M, ...) in x's dtype: each member scaled by its coefficient (cast to x's
        dtype), then the members of a frame summed (a lone member with coefficient 1 comes back
        bit-identical; two members are exact whatever the order, a + b = b + a)."""
        rows = self.rows.to(x.device)
        keep = rows >= 0
        shape = (-1,) + (1,) * (x.dim() - 1)
        scaled = x[keep] * self.coefficients.to(x.device, x.dtype)[keep].view(shape)
        return x.new_zeros((self.num_frames, *x.shape[1:])).index_add_(0, rows[keep], scaled)

    def representatives(self) -> Tensor:
        """(M,) long: each output frame's earliest member, whose place (grid frame, positions) it takes."""
        rows = self.rows
        keep = rows >= 0
        first = torch.full((self.num_frames,), len(rows), dtype=torch.long, device=rows.device)
        first.scatter_reduce_(0, rows[keep], torch.arange(len(rows), device=rows.device)[keep], reduce="amin")
        if self.num_frames and int(first.max()) >= len(rows):
            raise ValueError("FrameMerge: every output frame needs at least one member")
        return first


@dataclass
class FrameTrack:
    """The video's original T frames followed through the merges inside the encoder.

    origin: (T,) long, the current frame standing for each original frame, -1 once dropped (a
        member with coefficient 0 counts as dropped); representative: (M,) long, the original
        frame each current frame takes its place from (its earliest member's); meta: the latest
        per-current-frame annotations a merge gave, (M,) each.
    """

    origin: Tensor
    representative: Tensor
    meta: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def start(cls, num_frames: int, device=None) -> FrameTrack:
        frames = torch.arange(num_frames, device=device)
        return cls(origin=frames, representative=frames.clone())

    @property
    def num_frames(self) -> int:
        return len(self.representative)

    def after(self, merge: FrameMerge) -> FrameTrack:
        rows = merge.rows.to(self.origin.device)
        moved = rows[self.origin.clamp(min=0)]
        origin = torch.where(self.origin >= 0, moved, torch.full_like(moved, -1))
        chosen = merge.representatives().to(self.origin.device)
        meta = dict(merge.meta) if merge.meta else {name: values[chosen] for name, values in self.meta.items()}
        return FrameTrack(origin=origin, representative=self.representative[chosen], meta=meta)


@dataclass
class EncoderTrace:
    """What the encoder hooks observed in one encode: frames entering every encoder layer, then
    the frames leaving the encoder (num_layers + 1 entries), and the layers where the stage ran."""

    frames_per_layer: list[int]
    fired: list[int]


def frame_tokens(features: Tensor, grid: tuple[int, int, int], seq_index: Tensor, track: FrameTrack,
                 fixed_features: Tensor | None = None) -> VisualTokens:
    """VisualTokens for the encoder's output after in-encoder frame merges.

    features: (M * P, hidden) the projected tokens of the M frames left, frame-major then
    row-major (P = rows * cols tokens per frame); grid: (T, rows, cols) of the UNPRUNED video;
    seq_index: (T * P,) the unpruned prompt row of every token. A current frame's tokens take
    the coordinates and rows of its representative frame; `origin` maps every original token to
    the token now standing for it (its frame's, same cell), or -1 when its frame was dropped.
    """
    _, rows, cols = grid
    per_frame = rows * cols
    device = features.device
    cell = torch.arange(per_frame, device=device)
    source = (track.representative.to(device)[:, None] * per_frame + cell).reshape(-1)  # (M * P,)
    origin = track.origin.to(device)
    token_origin = torch.where(origin[:, None] >= 0, origin[:, None] * per_frame + cell, -1).reshape(-1)
    if fixed_features is None:
        fixed_features = features.new_zeros((0, features.shape[1]))
    tokens = VisualTokens(
        features=features,
        frame=source // per_frame,
        row=(source % per_frame) // cols,
        col=source % cols,
        seq_index=seq_index.to(device)[source],
        grid=grid,
        fixed_features=fixed_features,
        origin=token_origin,
    )
    for name, values in track.meta.items():  # per-frame annotations -> per-token meta
        tokens.meta[name] = values.to(device).repeat_interleave(per_frame)
    return tokens
