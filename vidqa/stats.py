"""Measurements of one request: what was processed, where the time went, what it cost.

Every field here is part of the `--json` schema (docs/json.md): add fields, never rename them.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timings:
    """Seconds per phase. prefill_s is time to first token: generate start -> first logits."""

    video_decode_s: float = 0.0
    preprocess_s: float = 0.0
    vision_encoder_s: float = 0.0
    pruning_s: float = 0.0  # time inside the pruning stages themselves (before and inside the LLM)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0


@dataclass
class TokenCounts:
    frames: int = 0
    visual_tokens_before: int = 0  # prunable video tokens the vision encoder produced
    visual_tokens_after: int = 0  # video tokens entering the last decoder layer
    visual_tokens_per_stage: dict[str, int] = field(default_factory=dict)
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    layer_avg_retention: float = 1.0  # (1/L) sum_l n_l / n_0 (design.md §4)
    prompt_tokens: int = 0  # the unpruned prompt, as the processor built it
    llm_prompt_tokens: int = 0  # what the LLM's first layer received
    generated_tokens: int = 0


@dataclass
class Flops:
    """Multiply-accumulates (MACs). `paper_*` follow the papers' convention (design.md §5):
    LLM prefill over the visual tokens only, no vision encoder, no text, no decode."""

    paper_visual_prefill_macs: int = 0
    paper_vanilla_macs: int = 0
    paper_fraction: float = 1.0
    prompt_prefill_macs: int = 0  # every prompt token through every layer, + lm_head for one row
    vision_encoder_macs: int = 0


@dataclass
class Stats:
    tokens: TokenCounts = field(default_factory=TokenCounts)
    time: Timings = field(default_factory=Timings)
    flops: Flops = field(default_factory=Flops)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = "rss"  # "cuda": torch.cuda.max_memory_allocated; "rss": process peak RSS
    # what was checked after the prefill (pruning/verify.py): {"transformers", "checks", "layers"}
    verified: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device | str) -> None:
    """Make GPU work finish before reading the clock (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(timings: Timings, attribute: str, device="cpu"):
    """Add the wall time of the block to `timings.<attribute>`."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        setattr(timings, attribute, getattr(timings, attribute) + time.perf_counter() - start)


def peak_memory(device) -> tuple[int, str]:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "rss"
