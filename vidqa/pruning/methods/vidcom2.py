"""VidCom2 (Liu et al., EMNLP 2025; code: xuyang-liu16/VidCom2): frame-uniqueness budgets.

No attention and no question. On the video's projected features:
1. keep the half of the channels with the LOWEST variance over all tokens (the released code's
   choice), and L2-normalise every token on them;
2. similarity of each token to the video's mean token and to its own frame's mean token, each a
   sum of Gaussian kernels exp(-d^2 / (2a)) over bandwidths a in {1/8, 1/4, 1/2, 1, 2};
3. frame uniqueness u_t = -(mean similarity of frame t's tokens to the video mean); frame t keeps
   round(P * s_t) tokens (at least 1) with s_t = min(1, base * (1 + p_t - mean(p))),
   p = softmax(u / 0.01): the budgets average `base`, and the most unique frame gets the most;
4. within a frame, keep the tokens LEAST similar to the video and the frame (sum of both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from vidqa.pruning.core.stage import BeforeLLM, param

BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)  # the released code's 2**k, k = -3..1


def low_variance_channels(features: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """(k,) indices of the int(C*fraction) channels with the lowest variance over the N tokens.

    features: (N, C)."""
    variance = features.var(dim=0, unbiased=False)  # (C,)
    count = int(features.shape[-1] * fraction)
    return torch.topk(variance, k=count, largest=False).indices


def gaussian_similarity(tokens: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """sum_a exp(-|x - c|^2 / (2a)) over BANDWIDTHS. tokens: (T, P, C), center broadcastable -> (T, P)."""
    squared = ((tokens - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-squared / (2 * bandwidth)) for bandwidth in BANDWIDTHS)


def vidcom2_scores(grid: torch.Tensor, channel_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (video_similarity, frame_similarity), each (T, P). grid: (T, P, C)."""
    num_frames, per_frame, _ = grid.shape
    flat = grid.reshape(num_frames * per_frame, -1)
    chosen = flat[:, low_variance_channels(flat, channel_fraction)]
    tokens = F.normalize(chosen.view(num_frames, per_frame, -1), dim=-1)  # (T, P, k)
    video_center = tokens.mean(dim=(0, 1), keepdim=True)  # (1, 1, k)
    frame_center = tokens.mean(dim=1, keepdim=True)  # (T, 1, k)
    return gaussian_similarity(tokens, video_center), gaussian_similarity(tokens, frame_center)


def frame_budgets(video_similarity: torch.Tensor, base: float, temperature: float = 0.01) -> torch.Tensor:
    """(T,) tokens each frame keeps: round(P * min(1, base*(1 + p_t - mean p))), at least 1, with
    p = softmax(uniqueness / temperature) and uniqueness_t = -mean_j video_similarity[t, j].

    Rounding is half-to-even (torch.round), as in the released code. video_similarity: (T, P)."""
    per_frame = video_similarity.shape[1]
    uniqueness = -video_similarity.mean(dim=-1)  # (T,)
    probs = F.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    return (scales * per_frame).round().long().clamp(min=1)


def vidcom2_keep(grid: torch.Tensor, base: float, temperature: float = 0.01,
                 channel_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (kept, budgets): (k,) sorted indices into the flattened (T*P) grid and (T,) budgets.

    Within frame t, the budgets[t] tokens with the lowest video + frame similarity (ties: lower
    index first). grid: (T, P, C)."""
    num_frames, per_frame, _ = grid.shape
    video_similarity, frame_similarity = vidcom2_scores(grid.float(), channel_fraction)
    budgets = frame_budgets(video_similarity, base, temperature)
    order = torch.argsort(video_similarity + frame_similarity, dim=-1, stable=True)  # (T, P), most distinct first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(per_frame, device=grid.device).expand(num_frames, -1))
    keep = rank < budgets[:, None]  # (T, P)
    return keep.flatten().nonzero().flatten(), budgets


@dataclass(frozen=True)
class FrameUniquenessSelect(BeforeLLM):
    """Per-frame budgets from each frame's uniqueness against the whole video; within a frame,
    the tokens most distinct from the video and the frame. `ratio` is the released code's
    R_RATIO (base_scale); ratio 1 keeps every token."""

    kind: ClassVar[str] = "frame_uniqueness_select"
    budget_param: ClassVar[str] = "ratio"
    ratio: float = param(0.25, 0.0, 1.0, "base retention (R_RATIO): frame budgets average it before the cap at 1")
    temperature: float = param(0.01, 1e-6, 1e6, "softmax temperature over frame uniqueness (large = equal budgets)")
    channel_fraction: float = param(0.5, 0.01, 1.0, "share of the channels (lowest variance) used for scoring")

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens)
        if self.ratio >= 1.0:  # retention 1 = no pruning (the released code still trims the common frames)
            state.details["vidcom2"] = {"frame_budgets": [per_frame] * num_frames}
            return tokens
        grid = tokens.features.view(num_frames, per_frame, -1)  # (T, P, C)
        kept, budgets = vidcom2_keep(grid, self.ratio, self.temperature, self.channel_fraction)
        state.details["vidcom2"] = {"frame_budgets": budgets.tolist()}
        return tokens.select(kept)
