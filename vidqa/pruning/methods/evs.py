"""EVS, Efficient Video Sampling (Bagrov et al., NVIDIA, arXiv:2510.14624; vLLM's
`--video-pruning-rate`, vllm/multimodal/evs.py): drop the tokens that did not change.

Every token of the first frame is kept. A later token scores 1 - cosine(token, the token at the
same grid position in the previous frame); the highest-scoring tokens over the whole clip are
kept, max(P, int(T*P*(1 - q))) in all (P tokens per frame, T frames, q = the pruning rate, the
fraction REMOVED). No attention, no question: the selection happens before the LLM and kept
tokens keep their features unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch.nn import functional as F

from vidqa.pruning.core.stage import BeforeLLM, param

# above any 1 - cosine (at most 2): the first frame always ranks first, as in vLLM
FIRST_FRAME_SCORE = 255.0


def evs_kept_count(per_frame: int, num_frames: int, pruning_rate: float) -> int:
    """Tokens EVS keeps: int(T*P*(1 - q)), never fewer than one whole frame (P)."""
    return max(per_frame, int(per_frame * num_frames * (1 - pruning_rate)))


def evs_scores(grid: torch.Tensor) -> torch.Tensor:
    """(T, P) dissimilarity of each token to the same position in the previous frame.

    grid: (T, P, C) features, frame-major. Row 0 (no previous frame) gets FIRST_FRAME_SCORE.
    """
    changed = 1 - F.cosine_similarity(grid[1:], grid[:-1], dim=-1)  # (T-1, P)
    first = torch.full_like(grid[:1, :, 0], FIRST_FRAME_SCORE)  # (1, P)
    return torch.cat([first, changed], dim=0)


def evs_keep(grid: torch.Tensor, pruning_rate: float) -> torch.Tensor:
    """(k,) sorted indices into the flattened (T*P) grid that EVS keeps at rate q.

    Ranking is by score, highest first; equal scores go to the lower index (a stable sort, as
    vLLM's). grid: (T, P, C).
    """
    num_frames, per_frame = grid.shape[:2]
    scores = evs_scores(grid.float()).flatten()  # (T*P,)
    order = torch.argsort(scores, descending=True, stable=True)
    count = evs_kept_count(per_frame, num_frames, pruning_rate)
    return order[:count].sort().values


@dataclass(frozen=True)
class TemporalChangeSelect(BeforeLLM):
    """Keep the first frame whole and, of the later frames, the tokens that changed most since
    the previous frame (1 - cosine at the same grid position), for a global pruning rate."""

    kind: ClassVar[str] = "temporal_change_select"
    budget_param: ClassVar[str] = "pruning_rate"
    pruning_rate: float = param(
        0.75, 0.0, 1.0, "fraction of the video's tokens REMOVED (vLLM's --video-pruning-rate q); 0 keeps all")

    def with_retention(self, fraction):
        return replace(self, pruning_rate=min(max(1.0 - fraction, 0.0), 1.0))

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens)
        grid = tokens.features.view(num_frames, per_frame, -1)  # (T, P, C)
        kept = evs_keep(grid, self.pruning_rate)
        wanted = int(per_frame * num_frames * (1 - self.pruning_rate))
        if wanted < per_frame:
            state.notes.append(
                f"evs keeps the whole first frame: {per_frame} of {len(tokens)} tokens "
                f"({per_frame / len(tokens):.3f}), more than the {1 - self.pruning_rate:.3f} asked for"
            )
        per_frame_kept = torch.bincount(tokens.frame[kept].cpu(), minlength=num_frames)
        state.details["evs"] = {"pruning_rate": round(self.pruning_rate, 6), "kept_per_frame": per_frame_kept.tolist()}
        return tokens.select(kept)
