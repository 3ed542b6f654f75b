"""FastVID (Shen et al., NeurIPS 2025; code: LunarShen/FastVID): dynamic density pruning before
the LLM, as two stages so that later presets can reuse the segmentation.

- `DySegStage` (`type: dyseg`): cut the clip into segments where adjacent frames' global
  features are dissimilar (below tau), plus the lowest-similarity cuts up to `min_segments`;
  annotates meta "segment" and drops nothing.
- `STPruneStage` (`type: stprune`): within each segment, every frame keeps the tokens the vision
  encoder attends to most; anchor frames also keep density-peak tokens into which the segment's
  other tokens are merged. Reads meta "segment" (one segment without DySeg before it) and meta
  "vision_attention" (the encoder layer is this stage's `vision_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import BadInput
from ..dyseg import dyseg_segments, segment_of_frames
from ..stprune import stprune
from .base import BeforeLLM, param


def frame_means(tokens) -> torch.Tensor:
    """(T, C) float32 mean feature of each frame's tokens present in `tokens` (0 for a frame with none)."""
    num_frames = tokens.grid[0]
    features = tokens.features.float()
    sums = torch.zeros(num_frames, features.shape[1], device=features.device).index_add_(0, tokens.frame, features)
    counts = torch.bincount(tokens.frame, minlength=num_frames).clamp(min=1)
    return sums / counts[:, None].to(sums.dtype)


def segments_from_meta(segment_of_frame: torch.Tensor) -> list[tuple[int, int]]:
    """Frame ranges from a (T,) per-frame segment id (runs of equal ids, in order)."""
    ids = segment_of_frame.tolist()
    bounds = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


@dataclass(frozen=True)
class DySegStage(BeforeLLM):
    """DySeg: adjacent-frame cosine of the frames' mean features; cut below tau, and at the
    min_segments - 1 lowest similarities. Adds meta "segment" (segment id of each token's frame)."""

    kind: ClassVar[str] = "dyseg"
    min_segments: int = param(8, 1, 4096, "c: the c - 1 lowest-similarity cuts are always made (at least c segments)")
    tau: float = param(0.9, 0.0, 1.01, "also cut wherever adjacent frames' cosine is below tau")

    def apply(self, tokens, state):
        segments = dyseg_segments(frame_means(tokens), self.min_segments, self.tau)
        segment = segment_of_frames(segments, tokens.frame.device)[tokens.frame]
        state.details["dyseg"] = {"segments": [[int(s), int(e)] for s, e in segments]}
        return tokens.replace(meta={**tokens.meta, "segment": segment})


@dataclass(frozen=True)
class STPruneStage(BeforeLLM):
    """STPrune: per frame the top `(1 - d)` share of int(P * ratio) tokens by vision-encoder
    attention; every p-th frame of a segment (from its end) an anchor with the segment's density
    peaks, merged with the segment's remaining tokens (weight max(1/(n+1), beta) on the peak).
    Tokens keep their own positions."""

    kind: ClassVar[str] = "stprune"
    budget_param: ClassVar[str] = "ratio"  # --keep/--flops set the retained fraction per frame
    ratio: float = param(0.10, 0.0, 1.0, "retained fraction of each frame's tokens, int(P * ratio) (--keep sets it)")
    context_share: float = param(0.4, 0.0, 1.0, "d: share of the retained tokens that are density-peak (merged) tokens")
    anchor_every: int = param(4, 1, 1024, "p: every p-th frame of a segment, counted from its last, is an anchor")
    beta: float = param(0.6, 0.0, 1.0, "lowest weight of the density-peak token itself in its merged average")
    vision_layer: int = param(-1, -64, 63, "vision-encoder layer whose attention ranks tokens (< 0: from the feature layer)")

    def kept_count(self, num_in: int, grid: tuple[int, int, int], ratio: float) -> int:
        """Tokens kept at `ratio` (for --keep/--flops): max(1, int(P * ratio)) per frame. The
        segments are not known yet; a segment of L frames may keep up to ceil(L/p) - 1 fewer
        (anchors get (c * L) // ceil(L / p) each)."""
        num_frames, rows, cols = grid
        return num_frames * max(1, int(rows * cols * ratio))

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens, "put it (after dyseg) before any stage that drops tokens")
        attention = tokens.meta.get("vision_attention")
        if attention is None:
            raise BadInput(f"stage '{self.kind}' needs vision-encoder attention, which this model did not provide")
        segment = tokens.meta.get("segment")
        if segment is None:
            segments = [(0, num_frames)]
        else:
            segments = segments_from_meta(segment.view(num_frames, per_frame)[:, 0])
        result = stprune(
            tokens.features.view(num_frames, per_frame, -1),
            attention.view(num_frames, per_frame),
            segments, ratio=self.ratio, context_share=self.context_share,
            anchor_every=self.anchor_every, beta=self.beta,
        )
        # each row is a coefficient combination of its members: DeepStack rows (Qwen3-VL) combine alike
        out = tokens.merge(result.rows, len(result.index), coefficients=result.coefficients,
                           members=result.members, representatives=result.index)
        state.details["stprune"] = {
            "segments": [[int(s), int(e)] for s, e in segments],
            "salient": int((~result.context).sum()),
            "context": int(result.context.sum()),
        }
        return out
