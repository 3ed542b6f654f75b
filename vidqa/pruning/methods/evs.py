"""EVS, Efficient Video Sampling (Bagrov et al., NVIDIA, arXiv:2510.14624; vLLM's
`--video-pruning-rate`, vllm/multimodal/evs.py): drop the tokens that did not change.

Every token of the first frame is kept. A later token scores 1 - cosine(token, the token at the
same grid position in the previous frame); the highest-scoring tokens over the whole clip are
kept, max(P, int(T*P*(1 - q))) in all (P tokens per frame, T frames, q = the pruning rate, the
fraction REMOVED). No attention, no question: the selection happens before the LLM and kept
tokens keep their features unchanged.

Streamed (a long video encoded a chunk at a time, pruning/core/streaming.py): a token's score
needs only the previous frame, carried over the chunk boundary, and the clip-wide top-k is the
top-k of (the best k so far + this chunk's tokens) under the same order (score, then index), so
`ChangeStream` holds at most the k tokens it may keep and keeps exactly what `apply` keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch.nn import functional as F

from vidqa.pruning.core.stage import BeforeLLM, param
from vidqa.pruning.core.streaming import ChunkStream, kept_origin
from vidqa.tensors.tokens import VisualTokens

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
        selected = tokens.select(kept)
        self.report(selected, tokens.grid, state)
        return selected

    def report(self, kept, grid: tuple[int, int, int], state) -> None:
        """The note when the first frame alone is more than asked, and the stats of `kept`."""
        num_frames, rows, cols = grid
        per_frame, total = rows * cols, num_frames * rows * cols
        if int(total * (1 - self.pruning_rate)) < per_frame:
            state.notes.append(
                f"evs keeps the whole first frame: {per_frame} of {total} tokens "
                f"({per_frame / total:.3f}), more than the {1 - self.pruning_rate:.3f} asked for"
            )
        per_frame_kept = torch.bincount(kept.frame.cpu(), minlength=num_frames)
        state.details["evs"] = {"pruning_rate": round(self.pruning_rate, 6), "kept_per_frame": per_frame_kept.tolist()}

    def open_stream(self, grid, state):
        return ChangeStream(self, grid, state)


class ChangeStream(ChunkStream):
    """EVS over chunks of whole frames: the previous frame's features and the (at most k) best
    tokens so far, with their scores and indices in the video, are all it holds."""

    def __init__(self, stage: TemporalChangeSelect, grid: tuple[int, int, int], state):
        self.stage, self.grid, self.state = stage, grid, state
        num_frames, rows, cols = grid
        self.per_frame = rows * cols
        self.count = evs_kept_count(self.per_frame, num_frames, stage.pruning_rate)
        self.previous: torch.Tensor | None = None  # (P, C) the last frame pushed
        self.kept: VisualTokens | None = None
        self.scores = torch.zeros(0)  # (k,) float32 scores of `kept`
        self.ids = torch.zeros(0, dtype=torch.long)  # (k,) their indices in the whole video, increasing
        self.seen = 0

    @property
    def held(self) -> int:
        return 0 if self.kept is None else len(self.kept)

    def push(self, tokens: VisualTokens) -> None:
        frames = len(tokens) // self.per_frame
        grid = tokens.features.view(frames, self.per_frame, -1)  # (t, P, C)
        if self.previous is None:
            scores = evs_scores(grid.float())
        else:  # the first row compares with the previous chunk's last frame
            scores = evs_scores(torch.cat([self.previous[None], grid]).float())[1:]
        self.previous = grid[-1].clone()  # not a view: the chunk's features can go
        ids = torch.arange(self.seen, self.seen + len(tokens), device=tokens.features.device)
        self.seen += len(tokens)
        if self.kept is None:
            candidates, all_scores, all_ids = tokens, scores.flatten(), ids
        else:  # the kept tokens come first: equal scores still go to the lower index
            candidates = VisualTokens.concatenate([self.kept, tokens])
            all_scores = torch.cat([self.scores.to(scores.device), scores.flatten()])
            all_ids = torch.cat([self.ids.to(ids.device), ids])
        best = torch.argsort(all_scores, descending=True, stable=True)[:self.count].sort().values
        self.kept, self.scores, self.ids = candidates.select(best), all_scores[best], all_ids[best]

    def finish(self) -> VisualTokens:
        kept = replace(self.kept, origin=kept_origin(self.ids, self.seen))
        self.stage.report(kept, self.grid, self.state)
        return kept
