"""VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip): per frame, keep the "dominant"
tokens that receive the most attention inside the vision encoder and merge the rest into a few
"contextual" tokens by key similarity.

The released code is for CLIP towers (LLaVA-1.5/NeXT): dominant = the CLS token plus the patches
the CLS row attends to most in the feature layer (-2). SigLIP (LLaVA-OneVision, SmolVLM2) and
Qwen2.5-VL's tower have no CLS token; as in the LLaVA-OneVision video port used by the later video
papers (cokeshao/HoliTom's `visionzip`), a token's score is the attention it RECEIVES in the
feature layer, averaged over heads and queries, pooled like the features, and the frames of a
video are the batch. Contextual merging, on the tokens left: every `step`-th of them (in order)
is a target, step = max(1, left // contextual); each other token joins the target whose
head-averaged key is most cosine-similar; a contextual token = target + mean of its joiners.
Output per frame: dominant tokens in their original order, then contextual tokens in target order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from vidqa.errors import BadInput
from vidqa.pruning.core.stage import BeforeLLM, param

DEFAULT_RATIO = 64 / 576  # the authors' headline and README setting: 54 dominant + 10 contextual of 576
DEFAULT_DOMINANT_SHARE = 54 / 64  # 54:10, 108:20, 162:30 in the paper's three budgets


class Zipped(NamedTuple):
    """VisionZip on a batch of frames.

    features: (B, dominant + contextual, C) dominant rows (original order), then contextual rows.
    dominant: (B, dominant) long, dominant token indices, ascending.
    targets: (B, contextual) long, the token index each contextual row sits on.
    assignment: (B, P) long, for every token the output row it went into (dominant: its own row;
        -1: dropped, when there are no contextual rows).
    coefficients: (B, P) float32, every token's coefficient in its row: 1 for a dominant token and
        a target, 1/n for each of a target's n joiners (0 when dropped). A row is the sum of its
        members times their coefficients (`VisualTokens.merge(coefficients=...)`), which is how
        `features` is computed.
    """

    features: torch.Tensor
    dominant: torch.Tensor
    targets: torch.Tensor
    assignment: torch.Tensor
    coefficients: torch.Tensor

    def flat_rows(self) -> torch.Tensor:
        """(B * P,) each token's row among the B * (dominant + contextual) rows, frame-major; -1 dropped."""
        return frame_major_rows(self.assignment, self.features.shape[1])


def frame_major_rows(assignment: torch.Tensor, rows_per_frame: int) -> torch.Tensor:
    """(B * P,) flat output rows from per-frame ones (B, P) (-1 stays -1)."""
    offsets = torch.arange(assignment.shape[0], device=assignment.device)[:, None] * rows_per_frame
    return torch.where(assignment >= 0, assignment + offsets, -1).reshape(-1)


def zip_tokens(
    features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> Zipped:
    """features: (B, P, C); attention: (B, P) attention received; keys: (B, P, d) metric.

    The top `dominant` tokens by attention stay; of the P - dominant left, `contextual` targets
    (at most as many as are left) absorb the others by cosine similarity of `keys`.
    """
    frames, count, _ = features.shape
    device = features.device
    dominant = max(0, min(int(dominant), count))
    order = torch.argsort(attention.float(), dim=1, descending=True, stable=True)
    kept = order[:, :dominant].sort(dim=1).values  # (B, dominant) ascending
    left = order[:, dominant:].sort(dim=1).values  # (B, P - dominant) ascending
    remaining = count - dominant
    contextual = max(0, min(int(contextual), remaining))
    assignment = torch.empty(frames, count, dtype=torch.long, device=device)
    assignment.scatter_(1, kept, torch.arange(dominant, device=device).expand(frames, dominant))
    coefficients = torch.ones(frames, count, dtype=torch.float32, device=device)
    if contextual == 0:
        assignment.scatter_(1, left, -1)  # dropped
        coefficients.scatter_(1, left, 0.0)
        return _combined(features, kept, left[:, :0], assignment, coefficients)

    # which places in `left` are targets is the same for every frame: split them on the host
    step = max(1, remaining // contextual)
    target_slots = list(range(0, remaining, step))[:contextual]
    joiner_slots = sorted(set(range(remaining)) - set(target_slots))
    targets = left[:, _on(device, target_slots)]  # (B, c) token indices
    joiners = left[:, _on(device, joiner_slots)]  # (B, m)
    metric = keys.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    target_metric = metric.gather(1, targets[..., None].expand(-1, -1, metric.shape[-1]))
    joiner_metric = metric.gather(1, joiners[..., None].expand(-1, -1, metric.shape[-1]))
    choice = torch.bmm(joiner_metric, target_metric.transpose(1, 2)).argmax(dim=2)  # (B, m) target slot
    # a contextual row = its target + the mean of its joiners: coefficient 1 on the target, 1/n on each joiner
    counts = torch.zeros(frames, contextual, device=device).scatter_add_(1, choice, torch.ones_like(choice, dtype=torch.float32))
    coefficients.scatter_(1, joiners, 1.0 / counts.gather(1, choice))
    assignment.scatter_(1, targets, dominant + torch.arange(contextual, device=device).expand(frames, contextual))
    assignment.scatter_(1, joiners, dominant + choice)
    return _combined(features, kept, targets, assignment, coefficients)


CHUNK_ELEMENTS = 1 << 24  # float32 products at once in _combined (64 MB), as tokens.affine_row_sums


def _on(device, values: list[int]) -> torch.Tensor:
    """A host list of indices on `device`, copied without waiting for the device's queue."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def _combined(features, dominant, targets, assignment, coefficients) -> Zipped:
    """The Zipped result with its rows summed from the members by their coefficients, in token
    order and float32 (`tokens.affine_row_sums`' arithmetic; dropped tokens go to a spare row
    rather than being filtered out, which would read their count back from the device)."""
    frames, count, channels = features.shape
    num_rows = dominant.shape[1] + targets.shape[1]
    rows = frame_major_rows(assignment, num_rows)
    rows = torch.where(rows >= 0, rows, frames * num_rows)
    flat, scale = features.reshape(frames * count, channels), coefficients.reshape(-1, 1)
    sums = torch.zeros(frames * num_rows + 1, channels, dtype=torch.float32, device=features.device)
    step = max(1, CHUNK_ELEMENTS // max(channels, 1))
    for start in range(0, len(flat), step):  # a few large chunks, to bound the products' memory
        part = slice(start, start + step)
        sums.index_add_(0, rows[part], flat[part].float() * scale[part])
    merged = sums[:-1].to(features.dtype)
    return Zipped(merged.view(frames, num_rows, channels), dominant, targets, assignment, coefficients)


@dataclass(frozen=True)
class VisionZip(BeforeLLM):
    """Per frame (Qwen2.5-VL: per temporal patch), keep round(ratio * tokens) tokens (at least one):
    int(that * dominant_share) dominant tokens by vision-encoder attention received, the rest as
    contextual tokens merged by key similarity. `ratio` is what --keep/--flops solve."""

    kind: ClassVar[str] = "visionzip"
    budget_param: ClassVar[str] = "ratio"  # --keep/--flops set the retained fraction per frame
    ratio: float = param(DEFAULT_RATIO, 0.0, 1.0, "retained fraction per frame (dominant + contextual)")
    dominant_share: float = param(DEFAULT_DOMINANT_SHARE, 0.0, 1.0, "share of the retained tokens that are dominant")
    vision_layer: int = param(-1, -64, 63, "vision-encoder layer whose attention ranks tokens (-1: the layer the projector reads)")

    def counts(self, per_frame: int, ratio: float) -> tuple[int, int]:
        """(dominant, contextual) tokens kept per frame of `per_frame` tokens."""
        retained = min(per_frame, max(1, round(ratio * per_frame)))
        dominant = int(retained * self.dominant_share)
        return dominant, retained - dominant

    def kept_at_retention(self, num_in: int, grid: tuple[int, int, int], fraction: float) -> int:
        """Tokens leaving this stage at `ratio` = `fraction` (used to solve --keep/--flops)."""
        frames, rows, cols = grid
        return frames * sum(self.counts(rows * cols, fraction))

    def apply(self, tokens, state):
        num_frames, per_frame = self.full_grid(tokens)
        if "vision_attention" not in tokens.meta:
            raise BadInput(f"stage '{self.kind}' needs vision-encoder attention; this model's adapter did not provide it")
        dominant, contextual = self.counts(per_frame, self.ratio)
        zipped = zip_tokens(
            tokens.features.view(num_frames, per_frame, -1),
            tokens.meta["vision_attention"].view(num_frames, per_frame),
            tokens.meta["vision_keys"].view(num_frames, per_frame, -1),
            dominant,
            contextual,
        )
        offsets = (torch.arange(num_frames, device=zipped.dominant.device) * per_frame)[:, None]
        rows_from = torch.cat([zipped.dominant, zipped.targets], dim=1) + offsets  # (T, kept)
        # contextual tokens take their target's place; DeepStack rows (Qwen3-VL) merge as the features do
        out = tokens.merge(zipped.flat_rows(), rows_from.numel(), features=zipped.features.flatten(0, 1),
                           coefficients=zipped.coefficients.reshape(-1), representatives=rows_from.reshape(-1))
        state.details["visionzip"] = {
            "dominant_per_frame": dominant,
            "contextual_per_frame": zipped.targets.shape[1],
            "vision_layer": tokens.vision_layer,
        }
        return out
