"""A long video in bounded memory: decode, preprocess, encode and prune a chunk of frames at a
time (docs/design.md, "Long videos").

The prompt's token layout (input ids, visual rows, the grid inputs positions are computed from)
depends on the frame count and times, not on the pixels, so it is built first
(`ModelAdapter.prompt_layout`); then each chunk of frames is decoded (`video.decode.clip_chunks`),
preprocessed within the whole clip's pixel budget (`ModelAdapter.chunk_prompt`), encoded, and
pushed into the pruner's `TokenStream` (pruning/core/streaming.py), which keeps only what the
pre-LLM stages may still keep. What is held at once: one chunk's pixels and encoder activations,
the kept tokens, and the prompt's ids. Generation then runs as for a one-shot request.

When: `--chunk-frames N`, or automatically above STREAM_ABOVE_FRAMES frames (`wants_streaming`).
The chunk size is N, or `auto_chunk_frames` from the free memory; Qwen-VL families round it up
to an even count (two frames make one temporal patch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace as replaced

from vidqa.engine.stats import Stats, timed
from vidqa.errors import BadInput
from vidqa.pruning.core.runtime import RequestState
from vidqa.pruning.core.streaming import StreamShape
from vidqa.video.decode import clip_chunks

STREAM_ABOVE_FRAMES = 128  # more sampled frames than this stream without --chunk-frames
# frames per chunk when memory allows: larger chunks encode no faster. On CPU, 16: buffers of
# larger chunks, freed and reallocated, fragment the C heap (its peak then grows with the video:
# 83 MiB for 1,024 frames of the micro model at 64 frames a chunk, 48 MiB at 16; 42 MiB one-shot at 64)
MAX_AUTO_CHUNK = {"cuda": 64, "cpu": 16}
FRAME_COST_BYTES = 48 * 2**20  # a frame's pixels and encoder activations, generously (a 7B SigLIP frame ~35 MB)
MEMORY_SHARE = 8  # a chunk may take 1/8 of the free memory


@dataclass(frozen=True)
class Progress:
    """Where a streamed request is, for a progress display (the cli draws it; nothing here prints).

    frames_done / frames_total: frames decoded and encoded so far / in all; tokens_kept: the
    visual tokens held for the LLM so far (before the stages that run at the end)."""

    frames_done: int
    frames_total: int
    tokens_kept: int


ProgressCallback = Callable[[Progress], None]


def wants_streaming(num_frames: int, chunk_frames: int | None) -> bool:
    """Stream when asked (--chunk-frames) or when the clip has more than STREAM_ABOVE_FRAMES frames."""
    return chunk_frames is not None or num_frames > STREAM_ABOVE_FRAMES


def check_chunk_frames(chunk_frames: int | None) -> None:
    if chunk_frames is not None and chunk_frames < 1:
        raise BadInput(f"--chunk-frames must be at least 1, got {chunk_frames}")


def free_memory_bytes(device) -> int | None:
    """Memory free for this request on `device`: CUDA's free memory, or Linux's MemAvailable; None if unknown."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def auto_chunk_frames(device) -> int:
    """Frames per chunk from the free memory: a chunk may take 1/MEMORY_SHARE of it at
    FRAME_COST_BYTES a frame, at most MAX_AUTO_CHUNK frames for the device, at least 2."""
    import torch

    most = MAX_AUTO_CHUNK["cuda" if torch.device(device).type == "cuda" else "cpu"]
    free = free_memory_bytes(device)
    if free is None:
        return most
    return max(2, min(most, free // (MEMORY_SHARE * FRAME_COST_BYTES)))


def chunk_size(adapter, requested: int | None, num_frames: int, notes: list[str]) -> int:
    """The chunk size in frames: `requested` (or the automatic one) rounded up to the family's
    multiple (a note says so when it was asked for), at most the clip (rounded up likewise)."""
    multiple = adapter.stream_frame_multiple
    size = requested if requested is not None else auto_chunk_frames(adapter.model.device)
    rounded = math.ceil(size / multiple) * multiple
    if requested is not None and rounded != requested:
        notes.append(f"--chunk-frames {requested} rounded up to {rounded}: {adapter.family} encodes frames in "
                     f"pairs (one temporal patch)")
    return min(rounded, math.ceil(num_frames / multiple) * multiple)


def streaming_refusal(adapter, pruner) -> str | None:
    """Why this request cannot stream (one line), or None."""
    if not adapter.streams:
        return f"{adapter.family} has no streamed prompt layout yet"
    if getattr(pruner, "encoder_stage", None) is not None:
        return (f"preset '{pruner.name}' merges frames inside the vision encoder across the whole clip, so its "
                f"frames cannot be encoded a chunk at a time")
    return None


def streamed_video(adapter, clip, question: str, fitting, stats: Stats, history: tuple = (),
                   chunk_frames: int | None = None, progress: ProgressCallback | None = None,
                   notes: list[str] | None = None):
    """Encode and prune `clip` (planned or decoded) a chunk at a time -> (the prompt layout, the
    tokens for the LLM, the request's RequestState). `fitting` (engine/fit.py) gives the pruner
    once the layout is known. Timings add to `stats` (video_decode_s: the chunks' decoding);
    notes: the request's notes list."""
    device = adapter.model.device
    notes = [] if notes is None else notes
    size = chunk_size(adapter, chunk_frames, clip.num_frames, notes)
    pruner = fitting.pruner
    if getattr(pruner, "frame_stage", None) is not None:
        with timed(stats.time, "preprocess_s", device):  # the selection pass, its decoding apart
            clip = pruner.before_encoder(clip, chunks=decode_timed(clip_chunks(clip, size), stats))
    chunks = clip_chunks(clip, size)
    state = stream = layout = None
    done, offset, rows_done = 0, 0, 0
    while True:
        started = time.perf_counter()
        chunk = next(chunks, None)
        stats.time.video_decode_s += time.perf_counter() - started
        if chunk is None:
            break
        with timed(stats.time, "preprocess_s", device):
            pixels = adapter.chunk_prompt(chunk, clip.num_frames)
            if layout is None:
                layout = adapter.prompt_layout(clip, question, history, first_chunk=pixels)
                pruner = fitting.fit(layout, clip.num_frames)  # before any encoding: a misfit is refused at once
        count = len(pixels.visual_index)
        placed = replaced(pixels, visual_index=layout.visual_index[rows_done:rows_done + count],
                          fixed_visual_index=layout.fixed_visual_index)
        with timed(stats.time, "vision_encoder_s", device):
            tokens = adapter.encode_video_for(placed, vision_layer=pruner.vision_layer)
        if state is None:
            state = RequestState(adapter=adapter, prompt=layout, clip=clip, question=question, device=device,
                                 notes=notes)
            fitting.apply_to(state)
            if getattr(pruner, "frame_stage", None) is not None:
                pruner.record_frame_selection(layout, state)  # "decoded frames", the selector, before the encoder
            shape = whole_grid(tokens.grid, len(layout.visual_index))
            state.record_stage("vision encoder", shape.count)
            with timed(stats.time, "pruning_s", device):
                stream = pruner.token_stream(shape, state)
        tokens = replaced(tokens, frame=tokens.frame + offset, grid=shape.grid, origin=None)
        with timed(stats.time, "pruning_s", device):
            stream.push(tokens)
        rows_done += count
        offset += tokens_grid_frames(pixels, tokens)
        done += chunk.num_frames
        if progress is not None:
            progress(Progress(done, clip.num_frames, stream.held))
    if rows_done != len(layout.visual_index):
        raise BadInput(f"the chunks gave {rows_done} visual tokens for a prompt laid out with "
                       f"{len(layout.visual_index)}; rerun without --chunk-frames")
    with timed(stats.time, "pruning_s", device):
        kept = stream.finish()
    state.llm_tokens = kept
    if stream.streamed_stage is None and getattr(pruner, "preset", None) is not None and pruner.preset.before_llm:
        state.notes.append(f"streamed: preset '{pruner.name}' needs the whole video at once, so the encoder's "
                           f"tokens were held until the last chunk (docs/methods.md)")
    return layout, kept, state


def decode_timed(chunks, stats: Stats):
    """`chunks` (decoded Clips), their decoding time added to stats.time.video_decode_s and taken
    off preprocess_s, which the selection pass around it is timed as."""
    while True:
        started = time.perf_counter()
        chunk = next(chunks, None)
        spent = time.perf_counter() - started
        stats.time.video_decode_s += spent
        stats.time.preprocess_s -= spent
        if chunk is None:
            return
        yield chunk


def whole_grid(chunk_grid: tuple[int, int, int], total_tokens: int) -> StreamShape:
    """The whole video's token grid from one chunk's (rows and cols are every chunk's)."""
    _, rows, cols = chunk_grid
    return StreamShape(grid=(total_tokens // (rows * cols), rows, cols), count=total_tokens)


def tokens_grid_frames(pixels, tokens) -> int:
    """Grid frames (frames, or Qwen's temporal patches) one chunk's tokens span."""
    _, rows, cols = tokens.grid
    return len(pixels.visual_index) // (rows * cols)
