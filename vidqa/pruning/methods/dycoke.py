"""DyCoke's temporal token merging (Tao et al., CVPR 2025; code: KD-TAO/DyCoke, `dycole_ttm`).

Frames are taken in windows of 4 (f0, f1, f2, f3). The window's first frame f0 is kept whole;
f1 and f2 are compared with f0, f3 with f2, token by token at the same grid position (cosine).
Of each compared frame only the tokens LEAST similar to their anchor are kept, int((1 - K) * P)
per frame (K = merge_ratio, P tokens per frame); the others are dropped ("merged" into the
anchor, whose token at that position stays). No attention, no question; before the LLM.
Released-code details kept here: the last window of a clip (frames i with i + 4 >= T) does not
compare its third frame with its first, so that frame stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch.nn import functional as F

from vidqa.pruning.core.stage import BeforeLLM, DuringDecode, param


def window_plan(num_frames: int) -> list[tuple[int, int]]:
    """(frame, anchor frame) for every frame that is pruned against an anchor, in frame order.

    Pairs (i, i+1) for even i; then (i+2, i) for i in range(0, T-4, 4), as the released code's
    second loop (its bound T-4 leaves the last window's third frame whole). A last, unpaired
    frame of an odd T is kept whole (the released code drops it; see docs/methods.md).
    """
    plan = {i + 1: i for i in range(0, num_frames - 1, 2)}
    plan.update({i + 2: i for i in range(0, num_frames - 4, 4)})
    return sorted(plan.items())


def dycoke_kept_count(num_frames: int, per_frame: int, keep_per_frame: int) -> int:
    pruned = len(window_plan(num_frames))
    return (num_frames - pruned) * per_frame + pruned * keep_per_frame


def dycoke_keep(grid: torch.Tensor, keep_per_frame: int) -> torch.Tensor:
    """(k,) sorted indices into the flattened (T*P) grid that DyCoke's merging keeps.

    grid: (T, P, C) features, frame-major. keep_per_frame: tokens kept of each compared frame,
    the least similar to the anchor (ascending cosine, ties to the lower index). Every compared
    frame is scored against its anchor at once, (n, P); k is known from the plan, so the kept
    indices come out without reading anything back from the device.
    """
    num_frames, per_frame = grid.shape[:2]
    device = grid.device
    plan = window_plan(num_frames)
    kept = torch.ones(num_frames, per_frame, dtype=torch.bool, device=device)
    if plan:
        pairs = torch.tensor(plan, dtype=torch.long).to(device, non_blocking=True)  # (n, 2) frame, anchor
        grid = grid.float()
        similarity = F.cosine_similarity(grid[pairs[:, 1]], grid[pairs[:, 0]], dim=-1)  # (n, P)
        order = torch.argsort(similarity, dim=-1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(per_frame, device=device).expand_as(order))
        kept[pairs[:, 0]] = rank < keep_per_frame
    count = (num_frames - len(plan)) * per_frame + len(plan) * min(max(keep_per_frame, 0), per_frame)
    positions = torch.arange(num_frames * per_frame, device=device)
    return torch.where(kept.flatten(), positions, len(positions)).sort().values[:count]


@dataclass(frozen=True)
class WindowTemporalMerge(BeforeLLM):
    """Windows of 4 frames: keep each window's first frame, and of the others only the tokens
    that differ most from their anchor frame (DyCoke's token temporal merging)."""

    kind: ClassVar[str] = "window_temporal_merge"
    budget_param: ClassVar[str] = "merge_ratio"
    merge_ratio: float = param(
        0.7, 0.0, 1.0, "K: fraction of each compared frame's tokens dropped (the released code's dycoke_k); 0 keeps all")
    retention: float = param(
        0.0, 0.0, 1.0, "set by --keep/--flops: the fraction of the clip's tokens to keep (overrides merge_ratio); 0 = off")

    def with_retention(self, fraction):
        return replace(self, retention=min(max(float(fraction), 1e-9), 1.0))

    def kept_at_retention(self, num_in: int, grid, fraction: float) -> int:
        """Tokens left when `retention` = `fraction` (the pruner's lower bound, at 0: every
        compared frame dropped, the windows' first frames whole)."""
        num_frames, rows, cols = grid
        per_frame = rows * cols
        keep_per_frame = self.with_retention(fraction).keep_per_frame(num_frames, per_frame)
        return dycoke_kept_count(num_frames, per_frame, keep_per_frame)

    def keep_per_frame(self, num_frames: int, per_frame: int) -> int:
        if self.retention <= 0:
            return int((1 - self.merge_ratio) * per_frame)  # int() as the released code
        pruned = len(window_plan(num_frames))
        if pruned == 0:
            return per_frame
        wanted = self.retention * num_frames * per_frame - (num_frames - pruned) * per_frame
        return min(max(round(wanted / pruned), 0), per_frame)

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens)
        keep_per_frame = self.keep_per_frame(num_frames, per_frame)
        grid = tokens.features.view(num_frames, per_frame, -1)  # (T, P, C)
        kept = dycoke_keep(grid, keep_per_frame)
        state.details.setdefault("dycoke", {})["merge"] = {
            "windows": -(-num_frames // 4), "kept_per_compared_frame": keep_per_frame, "kept": len(kept)}
        return tokens.select(kept)


@dataclass(frozen=True)
class DecodeAttentionKV(DuringDecode):
    """DyCoke's dynamic KV-cache pruning: at every decoding step, layers >= `layer` attend only
    to the `decode_keep` fraction of the visual KV entries that the current token attends to
    most at layer `layer` - 1 (mean over heads); text entries are always attended. The cache
    itself keeps every entry, so an entry skipped at one step can be chosen again at the next.
    Runs in pruning/core/decode_kv.py; prefill is untouched."""

    kind: ClassVar[str] = "decode_attention_kv"
    layer: int = param(3, 1, 31, "first layer that attends to the selected entries (32-layer numbering; scaled to the model)")
    decode_keep: float = param(
        0.2, 0.0, 1.0, "fraction of the visual KV entries attended per decode step (1 - the released dycoke_p); 1 = all")
