"""Many questions about one video: the video's prefill is paid once.

The prompt is [system + video tokens] + [question + chat template]. With causal attention the
KV cache of the first part does not depend on the question, so for `none` and for every preset
that acts only before the LLM (question-agnostic) a `VideoSession` encodes, prunes and
prefills the video prefix once, keeps its DynamicCache, and answers each question by
generating from that cache with only the question's rows. Presets with in-LLM stages read the
question inside the decoder, so their prefix is not reusable: the session then runs every
question the ordinary way (`engine.answer`, the clip encoded once).

Later questions cost only their text: the first question (or `prepare`) builds the prompt with
the clip's pixels (in one piece, or a chunk at a time for a long clip: engine/streaming.py); every
later one is the family's `prompt_layout` for the new question (the processor on blank stand-in
frames, no real pixel preprocessed again), whose ids, visual rows and grid inputs are the full
prompt's (tests/test_session.py compares them on every family that `streams`; a family without a
tested layout runs its processor on the clip again).

Positions: each question's rows take their positions from the adapter's `generation_inputs`
on the full (pruned) prompt, exactly as without reuse: 1-D families (`original` or `compact`)
and Qwen2.5-VL's M-RoPE alike; `generate` slices the rows after the cache. Every question's
prefix rows (ids and positions) are compared with the cached ones, so a prompt whose prefix
differs is never answered from a wrong cache (it falls back to a full prefill, with a note).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from vidqa.engine import request as engine
from vidqa.engine.stats import Stats, measured_request, synchronize, timed
from vidqa.errors import BadInput
from vidqa.models import GenerationInputs, ModelAdapter
from vidqa.models.base import without_pixels
from vidqa.pruning.core.compat import DecoderMismatch, PruningMismatch, cache_keyword
from vidqa.pruning.core.runtime import NO_PRUNING, Pruner, RequestState
from vidqa.pruning.core.verify import PrefillCheck
from vidqa.video.decode import Clip


def prefix_reusable(pruner: Pruner) -> bool:
    """True when the pruned video cannot depend on the question: `none`, and presets whose
    stages all act before the LLM without reading the question. A pre-LLM stage that reads it
    (text-guided selection) says so with `BeforeLLM.reads_question = True`."""
    preset = pruner.preset
    if preset is None:
        return True
    return not preset.inside_llm and not any(stage.reads_question for _, stage in preset.before_llm)


@dataclass
class _Prefix:
    """The video prefix, computed once: the pruned tokens, its rows, and their KV cache."""

    tokens: object  # VisualTokens after the pre-LLM stages
    state: RequestState  # the first request's state: stage counts, notes, budget details
    prompt: object = None  # the first prompt without its pixels: the grid later prompts' layouts read
    ids: torch.Tensor | None = None  # (1, s) input_ids of the prefix
    positions: torch.Tensor | None = None  # (..., s) position ids of the prefix
    cache: DynamicCache | None | bool = None  # None: not yet prefilled; False: not reusable
    prefill_s: float = 0.0
    verified: dict | None = None  # what PrefillCheck checked on the prefix prefill


PLACEHOLDER_QUESTION = "?"  # what prepare() builds the prompt with: only its video prefix is kept


class VideoSession:
    """One clip, asked many questions. Not thread-safe; batch size 1.

    history=True keeps the conversation: each question's prompt holds the earlier turns
    (question, answer) after the video, re-read as text; the video prefix is still reused.
    encoded_cache: optional mapping shared with engine.answer (vision-encoder output under
    id(clip)), so a batch that asks one clip under several presets encodes it once.
    long_video: --keep auto / --max-visual-tokens (the fit is decided once, from the first
    prompt's layout) and streaming: a planned clip (`Clip.planned`) is decoded, encoded and pruned
    a chunk at a time on the first question, and only the pruned prefix is kept.
    """

    def __init__(self, adapter: ModelAdapter, clip: Clip, pruner: Pruner = NO_PRUNING,
                 generation: engine.GenerationOptions | None = None, reuse: bool = True, history: bool = False,
                 encoded_cache: dict | None = None, long_video: engine.LongVideoOptions | None = None):
        # a preset's frame selection runs once: on the decoded clip here, or a chunk at a time when
        # a planned clip streams (engine/streaming.py); every question sees the same frames
        self.adapter, self.pruner, self._asked = adapter, pruner, pruner  # _asked: before --keep auto's fit
        self.clip = clip if clip.planned else pruner.before_encoder(clip)
        self.generation = generation or engine.GenerationOptions()
        self.reuse = reuse and prefix_reusable(pruner)
        self.history = history
        self.long_video = long_video or engine.LongVideoOptions()
        self.turns: list[tuple[str, str]] = []
        self._prefix: _Prefix | None = None
        self._encoded = encoded_cache if encoded_cache is not None else {}

    @property
    def prefix(self) -> _Prefix | None:
        """The computed video prefix (tokens, timings), or None before the first question/prepare()."""
        return self._prefix

    def prepare(self, stats: Stats | None = None) -> Stats:
        """Encode, prune and (when reusable) prefill the video now, before any question.
        Returns what that cost (vision_encoder_s, pruning_s, video_prefill_s, token counts)."""
        stats = stats or Stats()
        with torch.inference_mode():
            prompt = self._encode_and_prune(PLACEHOLDER_QUESTION, (), stats)
            prefix = self._prefix
            if self.reuse:
                inputs = self.adapter.generation_inputs(prompt, prefix.tokens, positions=self.pruner.positions)
                self._prefill(inputs, stats)
        counts = stats.tokens
        counts.frames = self.clip.num_frames
        counts.visual_tokens_before = len(prompt.visual_index)
        counts.visual_tokens_per_stage = dict(prefix.state.stage_counts)
        counts.visual_tokens_after = len(prefix.tokens)
        return stats

    def ask(self, question: str, on_text: Callable[[str], None] | None = None, stats: Stats | None = None) -> engine.Answer:
        """Answer one question (streamed to `on_text`); with history, remember the turn."""
        if not question.strip():
            raise BadInput("the question is empty")
        history = tuple(self.turns) if self.history else ()
        if self.reuse:
            result = self._ask_reusing(question, history, on_text, stats or Stats())
        else:
            result = engine.answer(self.adapter, self.clip, question, self.generation, pruner=self.pruner,
                                   on_text=on_text, stats=stats, encoded_cache=self._encoded, history=history,
                                   long_video=self.long_video)
        if self.history:
            self.turns.append((question, result.text))
        return result

    # -- the reuse path ------------------------------------------------------------------------
    def _ask_reusing(self, question, history, on_text, stats: Stats) -> engine.Answer:
        adapter, device = self.adapter, self.adapter.model.device
        with measured_request(stats, device):
            with torch.inference_mode():
                if self._prefix is None:
                    prompt = self._encode_and_prune(question, history, stats)
                else:
                    with timed(stats.time, "preprocess_s", device):
                        prompt = self.question_prompt(question, history)
                prefix = self._prefix
                inputs = adapter.generation_inputs(prompt, prefix.tokens, positions=self.pruner.positions)
                if prefix.cache is None:
                    self._prefill(inputs, stats)
                elif isinstance(prefix.cache, DynamicCache):
                    stats.prefix_reused = True
                    stats.time.prefill_saved_s = prefix.prefill_s
                # after the first prefill: a note it adds (e.g. the cache cannot be cropped) reaches this answer
                state = RequestState(adapter=adapter, prompt=prompt, clip=self.clip, question=question,
                                     device=device, stage_counts=dict(prefix.state.stage_counts),
                                     notes=list(prefix.state.notes), details=dict(prefix.state.details),
                                     llm_tokens=prefix.tokens, stage_origins=dict(prefix.state.stage_origins),
                                     encoder_frames=list(prefix.state.encoder_frames))
                # a later question (or a longer history) may not fit where the first did
                engine.check_context(adapter, prompt, inputs, self.generation, state, self.clip.num_frames)
                suffix_inputs = self._suffix_inputs(inputs, state)
                if suffix_inputs is None:
                    stats.prefix_reused, stats.time.prefill_saved_s = False, 0.0
                if suffix_inputs is not None:  # the video's rows were verified when the prefix was prefilled
                    stats.verified = prefix.verified
                text = engine.generate_text(adapter, suffix_inputs or inputs, self.generation, self.pruner, state,
                                            stats, on_text, verify=suffix_inputs is None)
            engine.fill_counts(stats, adapter, self.clip, prompt, state, inputs)
            engine.fill_flops(stats, adapter, self.clip)
        return engine.Answer(text=text.strip(), stats=stats, notes=list(self.clip.notes) + state.notes,
                             details=state.details, kept=engine.request_fates(adapter, self.clip, state, inputs),
                             preset=getattr(self.pruner, "preset", None) if self.pruner is not self._asked else None)

    def question_prompt(self, question: str, history: tuple = ()):
        """The prompt of a later question: the family's `prompt_layout` for it (its text, with the
        video's rows and grid inputs; no pixel preprocessed again), else, for a family without a
        tested layout (`streams` False), its processor on the decoded clip again."""
        if not self.adapter.streams:
            return self.adapter.prompt_for_clip(self.clip, question, history=history)
        return self.adapter.prompt_layout(self.clip, question, history, first_chunk=self._prefix.prompt)

    def _encode_and_prune(self, question: str, history: tuple, stats: Stats):
        """The video's tokens after the pre-LLM stages, computed once (in one piece or streamed,
        fitted by --keep auto / --max-visual-tokens: engine.video_tokens); the cost goes to
        `stats`. Returns this question's prompt."""
        prompt, tokens, state, pruner = engine.video_tokens(
            self.adapter, self.clip, question, self.pruner, stats, history, self._encoded, self.long_video,
            answer_tokens=self.generation.max_new_tokens)
        self.pruner, self.clip = pruner, state.clip  # the fitted pruner; the clip the prompt holds (selected)
        self._prefix = _Prefix(tokens=tokens, state=state, prompt=without_pixels(prompt))
        return prompt

    def _prefill(self, inputs: GenerationInputs, stats: Stats) -> None:
        """Run the LLM over the prefix rows once and keep their KV cache (cache = False when this
        model's cache cannot be cropped back to the prefix: no reuse then)."""
        prefix, model, device = self._prefix, self.adapter.model, self.adapter.model.device
        length = self.adapter.prefix_length(inputs)
        kwargs = inputs.kwargs
        cache = DynamicCache(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            prefix.cache, self.reuse = False, False  # sliding-window or recurrent layers
            prefix.state.notes.append("this model's KV cache cannot be cropped; the video prefix is not reused")
            return
        prefix_kwargs = {
            "input_ids": kwargs["input_ids"][:, :length],
            "attention_mask": kwargs["attention_mask"][:, :length],
            "position_ids": kwargs["position_ids"][..., :length],
            "mm_encoder_outputs": kwargs["mm_encoder_outputs"],
        }
        if "mm_token_type_ids" in kwargs:
            prefix_kwargs["mm_token_type_ids"] = kwargs["mm_token_type_ids"][:, :length]
        # the prefix holds every visual row: check its prefill as the engine checks a full one
        check = PrefillCheck(self.adapter, replace(inputs, kwargs=prefix_kwargs), prefix.state, None,
                             preset=self.pruner.name)
        synchronize(device)
        started = time.perf_counter()
        try:
            with check:
                model(**prefix_kwargs, **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
        except DecoderMismatch as error:
            raise PruningMismatch(str(error), check.preset) from None
        prefix.verified = check.finish()
        synchronize(device)
        prefix.prefill_s = stats.time.video_prefill_s = time.perf_counter() - started
        prefix.ids, prefix.positions, prefix.cache = prefix_kwargs["input_ids"], prefix_kwargs["position_ids"], cache

    def _suffix_inputs(self, inputs: GenerationInputs, state: RequestState) -> GenerationInputs | None:
        """`inputs` to generate from the cached prefix, or None when there is no usable cache or
        this prompt's prefix rows (ids, positions) differ from the cached ones (a full prefill then)."""
        prefix = self._prefix
        if not isinstance(prefix.cache, DynamicCache):
            return None
        length = prefix.ids.shape[1]
        ids, positions = inputs.kwargs["input_ids"], inputs.kwargs["position_ids"]
        same = (self.adapter.prefix_length(inputs) == length < ids.shape[1]
                and torch.equal(ids[:, :length], prefix.ids) and torch.equal(positions[..., :length], prefix.positions))
        if not same:
            state.notes.append("this prompt's video prefix differs from the cached one; prefilled in full")
            return None
        cache = prefix.cache
        extra = cache.get_seq_length() - length
        if extra:
            cache.crop(-extra)  # drop the previous question's rows; the prefix's tensors are never written
        kwargs = {key: value for key, value in inputs.kwargs.items() if key != "mm_encoder_outputs"}
        kwargs[cache_keyword(self.adapter.model)] = cache
        return replace(inputs, kwargs=kwargs)
