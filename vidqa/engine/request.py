"""One request end to end: decode -> preprocess -> encode -> prune -> generate (stream) -> stats."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import torch
from transformers import TextStreamer

from vidqa import flops as flops_model
from vidqa.engine import decode as decoding
from vidqa.engine import fit, streaming
from vidqa.engine.context_fit import PromptExtent, remedies
from vidqa.engine.generation import generation_overrides, generation_settings, sampling_note
from vidqa.engine.stats import Stats, measured_request, synchronize, timed
from vidqa.errors import BadInput, RuntimeFailure
from vidqa.models import ModelAdapter
from vidqa.pruning.core.compat import DecoderMismatch, PruningMismatch, cache_keyword, returned_cache
from vidqa.pruning.core.provenance import token_fates
from vidqa.pruning.core.runtime import NO_PRUNING, Pruner, RequestState
from vidqa.pruning.core.verify import PrefillCheck
from vidqa.video.decode import Clip, load_frames, plan_clip
from vidqa.video.frame_rules import FrameRule, UniformFrames


@dataclass
class FrameOptions:
    """--frames N or --fps F choose the frames; with neither, `sampling` (the model family's
    reference rule, `models.frame_rule_for`) does, else 32 uniform frames."""

    frames: int | None = 32
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    sampling: FrameRule | None = None


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None
    decode: str = "auto"  # auto | eager | static | graphs (vidqa/engine/decode.py)


@dataclass
class Answer:
    text: str
    stats: Stats
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # the preset's method-specific stats
    generation: dict = field(default_factory=dict)  # the generation settings in effect (`generation_settings`)
    kept: object = None  # pruning.provenance.TokenFates: where each visual token went (None: unknown)
    preset: object = None  # the Preset that ran when --keep auto chose another than asked (`none` -> evs)


class _CallbackStreamer(TextStreamer):
    """TextStreamer that hands finished text pieces to a callback instead of print().

    It runs inside generate's own loop (no thread, unlike TextIteratorStreamer), so an error in
    generation surfaces as an ordinary exception in the caller.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self._on_text(text)


class _StepClock:
    """Records when each forward of the model ends: the first is the prefill."""

    def __init__(self, model, device):
        self.model, self.device, self.ends = model, device, []

    def __enter__(self):
        def record(module, args, output):
            synchronize(self.device)
            self.ends.append(time.perf_counter())

        self._handle = self.model.register_forward_hook(record)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def decode_video(path: str, options: FrameOptions, chunk_frames: int | None = None) -> Clip:
    """The clip the options sample: decoded, or only planned (its frames decoded a chunk at a
    time later, engine/streaming.py) when it will stream (`streaming.wants_streaming`)."""
    clip = plan_clip(path, num_frames=options.frames, fps=options.fps, start=options.start, end=options.end,
                     sampling=options.sampling or UniformFrames(32))
    return clip if streaming.wants_streaming(clip.num_frames, chunk_frames) else load_frames(clip)


def encoded_video(adapter: ModelAdapter, clip: Clip, prompt, pruner: Pruner, encoded_cache: dict | None = None,
                  state: RequestState | None = None):
    """The clip's vision-encoder tokens, with the encoder attention the pruner's pre-LLM stages
    read (`pruner.vision_layer`). `encoded_cache` (id(clip) -> tokens) lets one clip asked under
    several presets be encoded once; a cached encoding made without that layer's attention is
    redone. With `state`, a pruner whose stages act inside the encoder encodes itself (recording
    its counts in `state`); that encoding is the preset's own and is never cached."""
    if state is not None:
        tokens = pruner.encode_video(adapter, prompt, state)
        if tokens is not None:
            return tokens
    cached = encoded_cache.get(id(clip)) if encoded_cache is not None else None
    layer = pruner.vision_layer
    if cached is not None and layer is not None and cached.vision_layer != adapter.vision_layer_index(prompt, layer):
        cached = None
    tokens = cached if cached is not None else adapter.encode_video_for(prompt, vision_layer=layer)
    if encoded_cache is not None:
        encoded_cache[id(clip)] = tokens
    return tokens


@dataclass
class LongVideoOptions:
    """How a long video is handled (engine/streaming.py, engine/fit.py; README "Long videos").

    chunk_frames: stream with chunks of this many frames (None: stream a planned clip, or one of
    more than streaming.STREAM_ABOVE_FRAMES frames, with chunks sized from the free memory).
    keep_auto: choose the retention (and positions) that fit the context; max_visual_tokens: at
    most this many visual tokens for the LLM. progress: called after each streamed chunk
    (`streaming.Progress`)."""

    chunk_frames: int | None = None
    keep_auto: bool = False
    max_visual_tokens: int | None = None
    progress: Callable | None = None


def video_tokens(adapter, clip: Clip, question: str, pruner: Pruner, stats: Stats, history: tuple = (),
                 encoded_cache: MutableMapping | None = None, long_video: LongVideoOptions | None = None,
                 answer_tokens: int = 0):
    """The prompt and the tokens for the LLM: decoded, encoded and pruned in one piece, or a chunk
    at a time (engine/streaming.py) -> (prompt, tokens, state, pruner: the one that ran, fitted
    to the context by --keep auto / --max-visual-tokens, engine/fit.py). `state.clip` is the clip
    the prompt holds. answer_tokens: the room the context keeps for the answer."""
    long_video = long_video or LongVideoOptions()
    device = adapter.model.device
    streamed = clip.planned or streaming.wants_streaming(clip.num_frames, long_video.chunk_frames)
    refusal = streaming.streaming_refusal(adapter, pruner) if streamed else None
    if refusal is not None and long_video.chunk_frames is not None:
        raise BadInput(f"--chunk-frames: {refusal}; leave --chunk-frames out")
    notes = [f"the clip was decoded and encoded in one piece: {refusal}"] if refusal is not None else []
    fitting = fit.Fitting(adapter, pruner, long_video.keep_auto, long_video.max_visual_tokens, answer_tokens, notes)
    if streamed and refusal is None:
        prompt, tokens, state = streaming.streamed_video(
            adapter, clip, question, fitting, stats, history=history, chunk_frames=long_video.chunk_frames,
            progress=long_video.progress, notes=notes)
        return prompt, tokens, state, fitting.pruner
    if clip.planned:
        started = time.perf_counter()
        clip = load_frames(clip)
        stats.time.video_decode_s += time.perf_counter() - started
    with timed(stats.time, "preprocess_s", device):
        clip = pruner.before_encoder(clip)  # issue #35: a preset's frame selection, before the processor and encoder
        prompt = adapter.prompt_for_clip(clip, question, history=history)
    pruner = fitting.fit(prompt, clip.num_frames)
    state = RequestState(adapter=adapter, prompt=prompt, clip=clip, question=question, device=device, notes=notes)
    fitting.apply_to(state)
    with timed(stats.time, "vision_encoder_s", device):
        tokens = encoded_video(adapter, clip, prompt, pruner, encoded_cache, state)
    if not state.stage_counts:  # else an in-encoder stage recorded the encoder's count and its own
        state.record_stage("vision encoder", len(tokens))
    with timed(stats.time, "pruning_s", device):
        tokens = pruner.before_llm(tokens, state)
    state.llm_tokens = tokens
    return prompt, tokens, state, pruner


def answer(
    adapter: ModelAdapter,
    clip: Clip,
    question: str,
    generation: GenerationOptions | None = None,
    pruner: Pruner = NO_PRUNING,
    on_text: Callable[[str], None] | None = None,
    stats: Stats | None = None,
    encoded_cache: MutableMapping | None = None,
    history: tuple = (),
    long_video: LongVideoOptions | None = None,
) -> Answer:
    """Answer `question` about `clip` (decoded, or planned: its frames decoded a chunk at a time).
    `on_text` receives streamed text.

    encoded_cache: optional mapping reused across calls (batch mode); the vision encoder's output
    for a clip is stored under id(clip), so a clip asked several questions is encoded once.
    Keep the clip object alive as long as the cache holds it.
    history: earlier (question, answer) turns about the same clip (see ModelAdapter.build_prompt).
    long_video: streaming and context fitting (`LongVideoOptions`).
    """
    generation = generation or GenerationOptions()
    if not question.strip():
        raise BadInput("the question is empty; pass it as an argument or on stdin")
    stats = stats or Stats()
    device = adapter.model.device
    asked = pruner
    with measured_request(stats, device):
        with torch.inference_mode():
            prompt, tokens, state, pruner = video_tokens(adapter, clip, question, pruner, stats, history,
                                                         encoded_cache, long_video,
                                                         answer_tokens=generation.max_new_tokens)
            clip = state.clip
            inputs = adapter.generation_inputs(prompt, tokens, positions=pruner.positions)
            check_context(adapter, prompt, inputs, generation, state, clip.num_frames)
            text = generate_text(adapter, inputs, generation, pruner, state, stats, on_text)
        stats.time.pruning_s += state.in_llm_seconds
        fill_counts(stats, adapter, clip, prompt, state, inputs)
        fill_flops(stats, adapter, clip)
    return Answer(text=text.strip(), stats=stats, notes=list(clip.notes) + state.notes, details=state.details,
                  generation=generation_settings(adapter, generation), kept=request_fates(adapter, clip, state, inputs),
                  preset=getattr(pruner, "preset", None) if pruner is not asked else None)


def request_fates(adapter, clip, state, inputs):
    """Where each of the video's tokens went in this request (pruning/core/provenance.py)."""
    return token_fates(state, inputs.visual_rows, adapter.text_config.num_hidden_layers, clip.num_frames)


def check_context(adapter, prompt, inputs, generation, state, num_frames: int) -> None:
    """The positions the LLM reads must fit the model's context (text_config.max_position_embeddings).

    What must fit is the position range, not the row count: kept tokens keep their original
    positions, so pruning before the LLM shortens the range only with compact positions (1-D
    models; under Qwen's M-RoPE a position is a (time, row, col) coordinate and the range is
    the unpruned prompt's either way). A prompt past the context is an error naming the exact
    flags that make it fit (engine/context_fit.py); an answer that may run past it gets a note.
    """
    limit = fit.context_limit(adapter)
    if limit is None:  # a config may not say
        return
    rows = int(inputs.kwargs["input_ids"].shape[1])
    positions = inputs.kwargs.get("position_ids")
    multi_axis = positions is not None and positions.dim() == 3
    if multi_axis and positions.shape[0] == 4:
        positions = positions[1:]  # Qwen's (text row, t, h, w) layout: the rotary positions are t, h, w
    extent = int(positions.max()) + 1 if positions is not None else rows
    if extent > limit:
        if rows < prompt.length:
            size = (f"the prompt is {prompt.length} tokens ({rows} after pruning before the LLM, at positions "
                    f"up to {extent - 1})")
        else:
            size = f"the prompt is {prompt.length} tokens" + (f" (positions up to {extent - 1})" if extent != rows else "")
        visual_tokens = len(prompt.visual_index)
        fixed = prompt.length - visual_tokens
        whole = PromptExtent(fixed=fixed, visual=(extent - fixed) if multi_axis else visual_tokens,
                             visual_tokens=visual_tokens, frames=num_frames, multi_axis=multi_axis)
        fixes = remedies(whole, limit, generation.max_new_tokens, frame_step=2 if multi_axis else 1)
        if not multi_axis and rows < prompt.length and rows <= limit:  # pruned enough, numbered too far
            fixes.insert(0, "-P positions=compact (the pruned prompt fits when renumbered)")
        raise BadInput(f"{size}, more than the model's context of {limit}; use {' or '.join(fixes)}")
    if extent + generation.max_new_tokens > limit:
        state.notes.append(
            f"the answer may run past the model's context of {limit} tokens after {limit - extent} new tokens"
        )


def generate_text(adapter, inputs, generation, pruner, state, stats, on_text, verify: bool = True) -> str:
    """Run `generate`; with `verify`, the prefill is checked against the plan (PrefillCheck).
    verify=False only for a question's rows generated from an already verified video prefix
    (vidqa/engine/session.py): they hold no visual token and nothing is pruned there.

    The decode path (`generation.decode`, vidqa/engine/decode.py): eager runs `generate` to the
    end; static and graphs run the prefill and first token with `generate`, then the engine's
    own fixed-shape decode steps."""
    model, device = adapter.model, adapter.model.device
    tokenizer = adapter.processor.tokenizer
    pieces: list[str] = []

    def emit(text: str) -> None:
        pieces.append(text)
        if on_text is not None:
            on_text(text)

    plan = decoding.plan_decode(adapter, generation)
    if plan.note:
        state.notes.append(plan.note)
    stats.decode_path = plan.path
    streamer = _CallbackStreamer(tokenizer, emit)
    kwargs = dict(inputs.kwargs)
    kwargs.update(generation_overrides(adapter, generation))
    if plan.path == "eager":
        kwargs["streamer"] = streamer
    else:  # the prefill and the first token; the static path streams every token itself
        kwargs.update(decoding.prefill_overrides(plan, kwargs["input_ids"].shape[1]))
    note = sampling_note(adapter, generation)
    if note:
        state.notes.append(note)
    if generation.seed is not None:
        torch.manual_seed(generation.seed)

    prompt_length = kwargs["input_ids"].shape[1]
    try:
        preset = pruner.name
        if plan.path == "eager":
            pruning, selection = pruner.inside_llm(inputs, state), None
        else:  # DyCoke's decode-time selection runs inside the static steps, not as hooks
            pruning, selection = pruner.inside_llm_split(inputs, state)
        # entered after the pruning hooks, so it sees the prefill as they left it (PrefillCheck)
        check = PrefillCheck(adapter, inputs, state, pruning, preset=preset) if verify else contextlib.nullcontext()
        with _StepClock(model, device) as clock, pruning, check:
            synchronize(device)
            start = time.perf_counter()
            output = model.generate(**kwargs)
        decoded = None
        if plan.path != "eager":
            sequence = output.sequences
            positions = inputs.kwargs.get("position_ids")
            if positions is None:  # as generate makes them for an all-ones attention mask
                positions = torch.arange(prompt_length, device=device)[None]
            caller_cache = inputs.kwargs.get(cache_keyword(model)) is not None  # a session's prefix: keep it
            decoded = decoding.decode_rest(
                adapter, plan, sequence, returned_cache(output), positions, generation.max_new_tokens,
                streamer=streamer, selection=selection, release=not caller_cache)
            streamer.end()
            if selection is not None:
                selection.publish()
            output = decoded.sequence
    except DecoderMismatch as error:
        raise PruningMismatch(str(error), preset) from None
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise RuntimeFailure(
            "out of GPU memory; try fewer --frames, a pruning preset (--prune), or a smaller --model"
        ) from None
    if verify:
        stats.verified = check.finish()
    generated = output.shape[1] - prompt_length
    stats.tokens.generated_tokens = int(generated)
    if decoded is not None:
        stats.decode_path, stats.time.decode_warmup_s = decoded.path, decoded.warmup_s
        state.notes.extend(decoded.notes)
    if clock.ends:
        stats.time.prefill_s = clock.ends[0] - start
        if decoded is None:  # eager: from the prefill's end to the last forward's
            stats.time.decode_s = clock.ends[-1] - clock.ends[0]
            steps = len(clock.ends) - 1
        else:  # static/graphs: the same span, without the one-time warm-up
            stats.time.decode_s = max(decoded.end - clock.ends[0] - decoded.warmup_s, 0.0) if decoded.steps else 0.0
            steps = decoded.steps
        stats.time.decode_tokens_per_s = steps / stats.time.decode_s if stats.time.decode_s > 0 else 0.0
    return "".join(pieces) or tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)


def fill_counts(stats, adapter, clip, prompt, state, inputs) -> None:
    counts = stats.tokens
    num_layers = adapter.text_config.num_hidden_layers
    counts.frames = clip.num_frames
    counts.visual_tokens_before = len(prompt.visual_index)
    counts.visual_tokens_per_stage = dict(state.stage_counts)
    counts.encoder_frames_per_layer = list(state.encoder_frames)
    per_layer = state.visual_tokens_per_layer(num_layers)
    counts.visual_tokens_per_layer = per_layer
    counts.visual_tokens_after = per_layer[-1]
    before = max(counts.visual_tokens_before, 1)
    counts.layer_avg_retention = sum(per_layer) / (num_layers * before)
    counts.prompt_tokens = prompt.length
    counts.llm_prompt_tokens = int(inputs.kwargs["input_ids"].shape[1])


def fill_flops(stats, adapter, clip) -> None:
    llm, vision = flops_model.shapes_from_model_config(adapter.model.config)
    counts = stats.tokens
    num_layers = llm.num_layers
    stats.flops.paper_visual_prefill_macs = flops_model.visual_prefill_macs(llm, counts.visual_tokens_per_layer)
    stats.flops.paper_vanilla_macs = flops_model.visual_prefill_macs(llm, [counts.visual_tokens_before] * num_layers)
    stats.flops.paper_fraction = stats.flops.paper_visual_prefill_macs / max(stats.flops.paper_vanilla_macs, 1)
    stats.flops.prompt_prefill_macs = flops_model.prompt_prefill_macs(llm, _prompt_lengths_per_layer(stats))
    if vision is not None:
        stats.flops.vision_encoder_macs = flops_model.vision_encoder_macs(
            vision, clip.num_frames, projector_hidden=llm.hidden,
            images_per_layer=counts.encoder_frames_per_layer or None,  # an in-encoder stage merged frames
        )


def _prompt_lengths_per_layer(stats: Stats) -> list[int]:
    """Prompt length entering each layer: the LLM prompt minus what in-LLM stages removed."""
    counts = stats.tokens
    removed_at = [counts.visual_tokens_per_layer[0] - n for n in counts.visual_tokens_per_layer]
    return [counts.llm_prompt_tokens - r for r in removed_at]
