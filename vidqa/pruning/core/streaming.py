"""Pre-LLM pruning of a video that is encoded a chunk at a time (engine/streaming.py;
docs/design.md, "Long videos").

The engine pushes the vision encoder's tokens chunk by chunk, in frame order, into a
`TokenStream` and takes the LLM's tokens from `finish()`. A pre-LLM stage that can decide with
state carried over chunk boundaries says so by returning a `ChunkStream` from
`BeforeLLM.open_stream` (EVS: the previous frame and the best-scoring tokens so far), and only
what it may still keep is held. A stage that needs the whole video (statistics over every frame:
VidCom2's channel variance and mean token, segment clustering) returns None: its stream holds
every chunk's tokens (the encoder output, not the pixels or the encoder's activations) and runs
the stages on the whole video at the end, exactly as a one-shot request does.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as replaced

import torch

from vidqa.tensors.tokens import VisualTokens


@dataclass(frozen=True)
class StreamShape:
    """What a stream knows before the first chunk: the whole video's token grid (frames, rows,
    cols) and token count. `len()` and `grid` stand in for the tokens where the pruner solves a
    budget from them (`PresetPruner._pre_llm_fraction`)."""

    grid: tuple[int, int, int]
    count: int

    def __len__(self) -> int:
        return self.count


class ChunkStream:
    """A stage's state across chunks: `push` each chunk's tokens (whole frames, in order), then
    `finish` gives what the stage keeps of the whole video, as `apply` on all of it would."""

    def push(self, tokens: VisualTokens) -> None:
        raise NotImplementedError

    @property
    def held(self) -> int:
        """Tokens held now (shown as progress)."""
        raise NotImplementedError

    def finish(self) -> VisualTokens:
        raise NotImplementedError


class HeldTokens(ChunkStream):
    """Holds every chunk's tokens; `finish` is the whole video's tokens, as one encoding gives them."""

    def __init__(self):
        self.pieces: list[VisualTokens] = []

    def push(self, tokens: VisualTokens) -> None:
        self.pieces.append(tokens)

    @property
    def held(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def finish(self) -> VisualTokens:
        return whole_video(self.pieces)


def whole_video(pieces: list[VisualTokens]) -> VisualTokens:
    """The chunks' tokens as one VisualTokens of the whole video (every token, in frame order)."""
    tokens = VisualTokens.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    return replaced(tokens, origin=torch.arange(len(tokens), device=tokens.features.device))


def kept_origin(ids: torch.Tensor, total: int) -> torch.Tensor:
    """Provenance of a selection made over chunks: token `ids[i]` (index in the whole video) is
    row i, every other token dropped (-1). ids: (k,) long, increasing."""
    origin = torch.full((total,), -1, dtype=torch.long, device=ids.device)
    origin[ids] = torch.arange(len(ids), device=ids.device)
    return origin


class TokenStream:
    """What the engine pushes chunks into: the pruner's first pre-LLM stage streamed (or every
    token held), then, at `finish`, the rest of the pre-LLM stages on what it kept.

    first: (name, stage) streamed by `chunks`, or None when `chunks` holds every token and
    `finish` runs every pre-LLM stage (`run_rest(tokens)`) on the whole video."""

    def __init__(self, chunks: ChunkStream, run_rest, first: tuple[str, object] | None = None, state=None):
        self.chunks, self.run_rest, self.first, self.state = chunks, run_rest, first, state

    @property
    def streamed_stage(self) -> str | None:
        """The name of the stage that prunes chunk by chunk, or None (every token is held)."""
        return None if self.first is None else self.first[0]

    @property
    def held(self) -> int:
        return self.chunks.held

    def push(self, tokens: VisualTokens) -> None:
        self.chunks.push(tokens)

    def finish(self) -> VisualTokens:
        tokens = self.chunks.finish()
        if self.first is not None:
            self.state.record_stage(self.first[0], len(tokens), origin=tokens.origin)
        return self.run_rest(tokens)
