"""EarlyTom (Wang et al., CVPR 2026, arXiv:2605.30010; code: viridisGreen/EarlyTom): token
compression that starts inside the vision encoder, as three stages.

- `EarlyTomFrames` (`type: earlytom_frames`, inside the vision encoder): after each of a few
  encoder layers (PRUNE_LAYERS, 8/21/23 or 10/21/23 of LLaVA-OneVision's 26), the frames are
  cut into segments and the middle frames of each segment are mixed pairwise, so every later
  layer, the projector and the pooling see fewer frames. The last of those layers cuts the
  merged frames into segments once more; they, and that layer's attention, leave the encoder.
- `EarlyTomSpatial` (`type: earlytom_spatial`, before the LLM): per segment, its first and last
  frames ("dynamic") keep their most attended tokens, its middle frames ("static") one token per
  contiguous window of the frame, so that the clip keeps `ratio` of its ORIGINAL tokens.
- the optional inner merge (their `modeling_qwen2.py`) is HoliTom's, word for word: the preset
  uses HoliTom's `similarity_merge` stage (pruning/methods/holitom.py).

The released code (earlytom/llava_arch.py and the SigLIP encoder of their LLaVA-NeXT copy,
`SigLipEncoder.compression`, `coarse_segment`, `fine_segment`):

1. Segments (`ema_segments`): frame 0 is the reference; for each next frame i the mean over
   patches of the cosine to the reference's same patch, s_i, updates sim <- ema * s_i +
   (1 - ema) * sim (sim starts at 1); when sim < tau, or the segment would reach M frames
   (i - start + 1 >= M, so a segment holds at most M - 1), a new segment starts at i with i
   as the reference.
2. Mixing (`mix_segments`): a segment of one or two frames stays. A longer one keeps its first
   and last frames; its L middle frames, with c_j the mean cosine of middle frames j and j + 1
   and tau' the mean cosine of the segment's first and last frames, are walked j = 0, 1, ...:
   frame j and j + 1 become w * f_j + (1 - w) * f_{j+1} when c_j > tau' and c_j > c_{j+1}
   (w = c_j / (c_j + c_{j+1})), or, for the last pair, when c_j > tau' (w = 1: f_j alone);
   otherwise f_j stays alone. As released, the walk stops at j = L - 1, so a segment's last
   middle frame never survives on its own (it is dropped, or weighted 0 in the last pair).
3. After the last prune layer the merged frames are segmented again (step 1); the attention of
   that layer (mean over heads and queries, mixed with the same weights) leaves the encoder.
4. After projection and pooling, with T frames in, M left and P tokens per frame, r' =
   min(ratio / (M / T), 1): a segment's first and last frames (every frame of a segment of at
   most two) keep their ceil(P r') most attended tokens; each middle frame is cut into
   max(1, round(P r')) contiguous windows of its raster order (the first P mod n windows one
   token longer) and keeps each window's most attended token. Tokens stay in frame and raster
   order. (Their D > 0 path, contextual tokens by DPC-KNN, raises on video, and `D` defaults
   to 0: it is not offered.)

Everything between the hooks is a handful of tensor ops; the segment decisions read one (F, F)
similarity table per prune layer on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from vidqa.errors import BadInput
from vidqa.pruning.core.stage import BeforeLLM, InsideEncoder, param, scaled_encoder_layer
from vidqa.pruning.ops.segments import Segment
from vidqa.tensors.frames import FrameMerge

DETAILS_KEY = "earlytom"
SEGMENT, DYNAMIC = "earlytom_segment", "earlytom_dynamic"  # per-token meta the frame stage hands on


def frame_similarity(hidden: Tensor) -> Tensor:
    """(F, F) float32: mean over patches of the cosine between the same patch of two frames.

    hidden: (F, S, D). One matmul over the L2-normalised patches (F, S * D)."""
    frames, patches, _ = hidden.shape
    normed = F.normalize(hidden.float(), p=2, dim=-1).reshape(frames, -1)
    return normed @ normed.T / patches


def ema_segments(similarity: list[list[float]], tau: float, ema: float, max_window: int) -> list[Segment]:
    """Step 1 of the module docstring on the host copy of `frame_similarity`; half-open ranges."""
    num_frames = len(similarity)
    if num_frames <= 1:
        return [(0, num_frames)]
    segments, start, sim = [], 0, 1.0
    for i in range(1, num_frames):
        sim = ema * similarity[start][i] + (1 - ema) * sim
        if sim < tau or (i - start + 1) >= max_window:
            segments.append((start, i))
            start, sim = i, 1.0
    segments.append((start, num_frames))
    return segments


def mix_segments(similarity: list[list[float]], segments: list[Segment]) -> tuple[list[int], list[float], int]:
    """Step 2 of the module docstring: (rows (F,) output frame of each frame or -1, coefficients
    (F,), output frames M). Output frames keep the segments' time order."""
    num_frames = len(similarity)
    rows, weights, out = [-1] * num_frames, [0.0] * num_frames, 0

    def alone(frame: int) -> None:
        nonlocal out
        rows[frame], weights[frame], out = out, 1.0, out + 1

    for start, end in segments:
        if end - start <= 2:
            for frame in range(start, end):
                alone(frame)
            continue
        alone(start)
        middle = list(range(start + 1, end - 1))
        if len(middle) < 2:
            alone(middle[0])
        else:
            tau = similarity[start][end - 1]
            adjacent = [similarity[a][a + 1] for a in middle[:-1]]  # (L - 1,)
            j = 0
            while j < len(middle) - 1:
                current = adjacent[j]
                if j + 1 < len(middle) - 1:
                    following = adjacent[j + 1]
                    merge = current > tau and current > following
                else:
                    following = 0.0
                    merge = current > tau
                if merge:
                    # (a zero sum, which their tensor division turns into inf/nan, keeps f_j alone)
                    weight = current / (current + following) if following != 0 and current + following != 0 else 1.0
                    rows[middle[j]], weights[middle[j]] = out, weight
                    if 1 - weight != 0:  # weight 1: the second frame adds nothing, it is dropped
                        rows[middle[j + 1]], weights[middle[j + 1]] = out, 1 - weight
                    out += 1
                    j += 2
                else:
                    alone(middle[j])
                    j += 1
        alone(end - 1)
    return rows, weights, out


def segment_meta(segments: list[Segment], device) -> dict[str, Tensor]:
    """Per frame: its segment's index, and whether it is dynamic (a segment's first or last
    frame; every frame of a segment of at most two)."""
    segment, dynamic = [], []
    for index, (start, end) in enumerate(segments):
        for frame in range(start, end):
            segment.append(index)
            dynamic.append(end - start <= 2 or frame in (start, end - 1))
    return {SEGMENT: torch.tensor(segment, dtype=torch.long, device=device),
            DYNAMIC: torch.tensor(dynamic, dtype=torch.bool, device=device)}


@dataclass
class FrameCompression:
    """One prune layer's result: the merge, the segments it mixed within, and (at the last prune
    layer) the segments of the merged frames handed to the spatial stage."""

    merge: FrameMerge
    segments: list[Segment]
    refined: list[Segment] | None


def compress_frames(hidden: Tensor, tau: float, ema: float, max_window: int, last: bool) -> FrameCompression:
    """Steps 1-3 of the module docstring on one layer's output hidden (F, S, D)."""
    num_frames, device = hidden.shape[0], hidden.device
    if num_frames <= 1:
        merge = FrameMerge.identity(num_frames, device=device)
        segments = [(0, num_frames)]
    else:
        similarity = frame_similarity(hidden).tolist()
        segments = ema_segments(similarity, tau, ema, max_window)
        rows, weights, count = mix_segments(similarity, segments)
        values = torch.tensor([rows, weights], dtype=torch.float64).to(device)  # one copy
        merge = FrameMerge(values[0].long(), values[1].float(), count)
    refined = None
    if last:
        merged = merge.apply(hidden) if num_frames > 1 else hidden
        refined = ema_segments(frame_similarity(merged).tolist(), tau, ema, max_window) if len(merged) > 1 else [(0, len(merged))]
        merge.meta = segment_meta(refined, device)
    return FrameCompression(merge, segments, refined)


def spatial_keep(attention: Tensor, dynamic: Tensor, retention: float) -> Tensor:
    """Step 4 of the module docstring: (M, P) bool, the tokens each frame keeps.

    attention: (M, P) attention received per token; dynamic: (M,) bool; retention: r'.
    Ties: the lower index first (the released top-k leaves ties to the kernel)."""
    frames, per_frame = attention.shape
    device = attention.device
    keep = torch.zeros(frames, per_frame, dtype=torch.bool, device=device)
    dominant = min(per_frame, math.ceil(per_frame * retention))
    order = torch.argsort(attention.float(), dim=1, descending=True, stable=True)[:, :dominant]
    top = keep.clone().scatter_(1, order, True)
    windows = max(1, round(per_frame * retention))
    base, remainder = divmod(per_frame, windows)
    sizes = torch.tensor([base + 1] * remainder + [base] * (windows - remainder), device=device)
    starts = torch.cumsum(sizes, 0) - sizes
    offset = torch.arange(base + (remainder > 0), device=device)
    index = starts[:, None] + offset  # (windows, longest)
    valid = offset < sizes[:, None]
    scores = attention.float()[:, index.clamp(max=per_frame - 1)].masked_fill(~valid, float("-inf"))
    picks = index.expand(frames, -1, -1).gather(2, scores.argmax(dim=2, keepdim=True))[..., 0]  # first maximum
    local = keep.clone().scatter_(1, picks, True)
    return torch.where(dynamic.to(device)[:, None], top, local)


def parse_layers(text: str) -> list[int]:
    """'8,21,23' -> [8, 21, 23]; BadInput naming the value otherwise."""
    try:
        layers = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        layers = []
    if not layers or any(not 0 <= layer <= 255 for layer in layers):
        raise BadInput(f"earlytom_frames.layers = '{text}': expected comma-separated encoder layer indices, e.g. 8,21,23")
    return layers


@dataclass(frozen=True)
class EarlyTomFrames(InsideEncoder):
    """EarlyTom's frame merge inside the vision encoder (steps 1-3): after each of `layers`
    (LLaVA-OneVision's 26-layer numbering, scaled round(k*L/26) to an L-layer tower; equal
    layers act once), segment the frames and mix each segment's middle frames; the last layer
    re-segments and carries its attention out."""

    kind: ClassVar[str] = "earlytom_frames"
    carries_attention = True
    layers: str = param("10,21,23", help="PRUNE_LAYERS: encoder layers after which frames merge (of 26; scaled round(k*L/26))")
    tau: float = param(0.3, 0.0, 1.01, "T: a segment ends when the EMA of the mean cosine to its first frame drops below tau")
    max_window: int = param(6, 1, 1 << 20, "M: a segment ends before reaching M frames (at most M - 1, as released)")
    ema: float = param(0.9, 0.0, 1.0, "EMA: weight of the newest frame's similarity in the running similarity")

    def __post_init__(self):
        parse_layers(self.layers)

    def resolved_layers(self, depth: int) -> list[int]:
        return sorted({scaled_encoder_layer(layer, depth) for layer in parse_layers(self.layers)})

    def apply(self, hidden, layer, last, state):
        result = compress_frames(hidden, self.tau, self.ema, self.max_window, last)
        record = {"layer": int(layer), "frames_in": int(hidden.shape[0]), "frames_out": result.merge.num_frames,
                  "segments": [[start, end] for start, end in result.segments]}
        details = state.details.setdefault(DETAILS_KEY, {})
        details.setdefault("frames", []).append(record)
        if result.refined is not None:
            details["segments"] = [[start, end] for start, end in result.refined]
        return result.merge


@dataclass(frozen=True)
class EarlyTomSpatial(BeforeLLM):
    """EarlyTom's spatial compression (step 4), on the frames `earlytom_frames` left: keeps
    about `ratio` of the clip's ORIGINAL tokens (r' = min(ratio * T / M, 1) of each frame's).
    Reads meta "vision_attention" and the segments that stage carries out of the encoder."""

    kind: ClassVar[str] = "earlytom_spatial"
    budget_param: ClassVar[str] = "ratio"
    budget_with_inner_stages: ClassVar[bool] = True  # the inner merge keeps its own ratio
    budget_of_clip: ClassVar[bool] = True  # RETAIN_RATIO counts the clip's tokens before the frame merge
    ratio: float = param(0.10, 0.0, 1.0, "RETAIN_RATIO: tokens entering the LLM / tokens of the clip (--keep sets it)")

    def apply(self, tokens, state):
        num_frames, rows, cols = tokens.grid
        per_frame = rows * cols
        missing = [name for name in ("vision_attention", SEGMENT, DYNAMIC) if name not in tokens.meta]
        if missing:
            raise BadInput(f"stage '{self.kind}' needs the frames and attention of an 'earlytom_frames' stage before it")
        left = len(tokens) // per_frame
        frame = tokens.frame.view(-1)
        if len(tokens) != left * per_frame or bool((frame.view(left, per_frame) != frame.view(left, per_frame)[:, :1]).any()):
            raise BadInput(f"stage '{self.kind}' needs whole frames; put it right after 'earlytom_frames'")
        total = num_frames * per_frame
        ratio = max(self.ratio, 1.0 / total)  # at least one token of the clip
        retention = min(ratio / ((total - (num_frames - left) * per_frame) / total), 1)  # their rescale, as written
        dynamic = tokens.meta[DYNAMIC].view(left, per_frame)[:, 0]
        keep = spatial_keep(tokens.meta["vision_attention"].view(left, per_frame), dynamic, retention)
        out = tokens.select(keep.reshape(-1).nonzero().flatten())
        state.details.setdefault(DETAILS_KEY, {})["spatial"] = {
            "frames": left,
            "dynamic_frames": int(dynamic.sum()),
            "frame_retention": round(retention, 6),
            "per_dynamic_frame": min(per_frame, math.ceil(per_frame * retention)),
            "per_static_frame": max(1, round(per_frame * retention)),
        }
        return out
