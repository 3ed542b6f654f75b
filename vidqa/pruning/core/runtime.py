"""Per-request pruning state and the interface the engine calls.

A preset is frozen configuration; everything that belongs to one request (the prompt, which
tokens were kept, counts per stage and per layer, time spent) lives in a fresh `RequestState`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

# Profiler range around every stage's work ("vidqa.stage:<preset stage name>"): benchmarks/ops.py
# counts the ops and host syncs inside, and a user's own torch.profiler trace shows them by name.
STAGE_RANGE = "vidqa.stage:"


@dataclass
class RequestState:
    adapter: Any
    prompt: Any
    clip: Any
    question: str
    device: torch.device
    stage_counts: dict[str, int] = field(default_factory=dict)
    # decoder layer index -> visual tokens entering that layer, for layers where it changes
    layer_counts: dict[int, int] = field(default_factory=dict)
    # decoder layer index -> (n,) row of the LLM input behind each row leaving that layer's stage
    kept_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    in_llm_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # method-specific stats for --json
    llm_tokens: Any = None  # the VisualTokens handed to the LLM (after the pre-LLM stages)
    # provenance (pruning/core/provenance.py): stage name -> VisualTokens.origin after that pre-LLM stage
    stage_origins: dict[str, torch.Tensor] = field(default_factory=dict)
    # decoder layer -> (members, into): LLM-input rows that an in-LLM stage merged at that layer, and
    # the LLM-input row each one went into (a row that stays, or the row an inserted merge takes)
    layer_merges: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # frames entering each vision-encoder layer, then the frames leaving it, as observed when an
    # in-encoder stage changed them (pruning/core/encoder.py); empty: every frame everywhere
    encoder_frames: list[int] = field(default_factory=list)

    def record_stage(self, name: str, count: int, origin: torch.Tensor | None = None) -> None:
        self.stage_counts[name] = int(count)
        if origin is not None:
            self.stage_origins[name] = origin

    def record_merge(self, layer: int, members: torch.Tensor, into: torch.Tensor) -> None:
        """An in-LLM stage merged the LLM-input rows `members` (m,) into the rows `into` (m,) at `layer`."""
        self.layer_merges[layer] = (members, into)

    def record_layer(self, layer: int, count: int, rows: torch.Tensor | None = None) -> None:
        self.layer_counts[layer] = int(count)
        if rows is not None:
            self.kept_rows[layer] = rows

    def visual_tokens_per_layer(self, num_layers: int) -> list[int]:
        """Visual tokens entering each decoder layer (the last stage count before the LLM holds
        until an in-LLM stage changes it)."""
        current = list(self.stage_counts.values())[-1] if self.stage_counts else 0
        counts = []
        for layer in range(num_layers):
            current = self.layer_counts.get(layer, current)
            counts.append(current)
        return counts


@contextlib.contextmanager
def stage_threads(device):
    """Run a pruning stage's CPU work on one intra-op thread (no-op on accelerators).

    A stage is hundreds of small ops (DPC-KNN, top-k, gathers on a few hundred rows). With
    several intra-op threads every op above PyTorch's grain size is a parallel region whose
    barrier waits for all threads; on a CPU shared with other jobs a thread that lost its core
    stalls the region for a scheduler time slice, and a PruneVid merge that takes ~20 ms on one
    thread took 0.1-1.6 s with 2 threads on a loaded 2-core machine. One thread loses little
    on an idle machine (the ops are too small to scale) and never stalls. The model's own
    layers keep every thread.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Pruner:
    """What the engine calls. The default does nothing: that is the `none` preset. Every
    attribute the engine reads is declared here; a pruner overrides what it needs."""

    name = "none"  # the preset's name, for messages, records and the prefill check
    positions = "original"  # "original": kept tokens keep their positions in the unpruned prompt
    # vision-encoder layer whose attention a stage reads (models/vision_attention.py); None = none.
    # Read by engine/request.py, which has the encoder return that attention.
    vision_layer: int | None = None
    # the Preset this pruner runs, or None (no stages: the pruned video cannot depend on the
    # question). Read by engine/session.py to decide whether the video prefix is reusable.
    preset = None

    def before_encoder(self, clip, chunks=None):
        """The clip of the frames to encode: the pruner's before-encoder stage picks them from the
        decoded frames (pruning/core/frame_selection.py; a planned clip's from `chunks`, its frames
        decoded a chunk at a time); the default keeps the clip as it is."""
        return clip

    def encode_video(self, adapter, prompt, state: RequestState):
        """The clip's VisualTokens when the pruner's stages act inside the vision encoder (it
        then records the encoder's unpruned count and its stages' in `state`), else None: the
        engine encodes as usual (and may share that encoding across presets)."""
        return None

    def before_llm(self, tokens, state: RequestState):
        """Prune/merge the video's tokens before the LLM; returns VisualTokens."""
        return tokens

    def token_stream(self, shape, state: RequestState):
        """A `pruning.core.streaming.TokenStream` for a video encoded a chunk at a time (shape: a
        `StreamShape` of the whole video's tokens): the default holds every chunk's tokens and
        runs `before_llm` on the whole video at the end."""
        from vidqa.pruning.core.streaming import HeldTokens, TokenStream

        return TokenStream(HeldTokens(), lambda tokens: self.before_llm(tokens, state))

    def inside_llm(self, inputs, state: RequestState):
        """Context manager active around `generate`; attaches (and always removes) hooks."""
        return contextlib.nullcontext()

    def inside_llm_split(self, inputs, state: RequestState):
        """`inside_llm` in two parts, for a decode loop of the engine's own (engine/decode.py):
        (a context manager for the prefill, the decode-time KV selection to apply at each step
        or None). A pruner whose inside_llm acts after the prefill overrides this (the default
        says inside_llm acts on the prefill only)."""
        return self.inside_llm(inputs, state), None


NO_PRUNING = Pruner()
