"""The Python API: the one seam every front end calls (`vidqa ask`, `chat`, `batch`, the
lmms-eval model). A front end parses its input into `Settings`, calls these functions, and
renders what comes back; the request itself lives in `vidqa.engine` (docs/design.md, "Layers").

    from vidqa import api

    settings = api.Settings(model="micro", prune="evs", keep=0.3)
    model = api.open_model(settings)
    result = model.ask("samples/square.mp4", "Which way does the square move?")
    print(result.text, result.stats.tokens.visual_tokens_after)

    session = model.session("samples/square.mp4")  # many questions, one video prefill
    for question in ("What colour is the square?", "Which way does the square move?"):
        print(session.ask(question).text)

Errors are `vidqa.errors.VidqaError`s: `BadInput` (the caller's to fix) or `RuntimeFailure`,
each with a one-line message. Nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vidqa.errors import BadInput
from vidqa.hub import DEFAULT_MODEL, bundled


@dataclass(frozen=True)
class Settings:
    """Everything one request depends on: the model and how it loads, the frames, the pruning
    preset and its budget, and generation. Defaults are the CLI's."""

    # the model and how it loads (docs/models.md)
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    attn: str = "sdpa"  # sdpa | eager | flash_attention_2
    max_pixels: int | None = None  # Qwen-VL families: most pixels per frame
    device_map: str | None = None  # None: one device when the weights fit, else auto; "auto" | "none"
    system: str | None = None  # None: the family's system prompt; "": none
    # frames: `frames` uniform or `fps`; neither: the family's reference sampling
    frames: int | None = None
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    # pruning: a preset name or .yaml path, its budget (--keep or --flops), -P overrides
    prune: str = "none"
    keep: float | str | None = None  # a retention in (0, 1], or "auto": the one that fits the context
    flops: float | None = None
    params: tuple[str, ...] = ()
    # generation
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None
    # the decode path: auto | eager | static | graphs (vidqa/engine/decode.py; README "Decode paths")
    decode: str = "auto"
    # long videos (README "Long videos"): frames per streamed chunk (None: stream above
    # engine.streaming.STREAM_ABOVE_FRAMES frames, chunks from the free memory), and the most
    # visual tokens the LLM may receive (the retention is chosen to fit, as with keep="auto")
    chunk_frames: int | None = None
    max_visual_tokens: int | None = None

    @property
    def keep_auto(self) -> bool:
        return self.keep == "auto"

    @property
    def keep_fraction(self) -> float | None:
        """--keep as a number (None when it is "auto" or not given)."""
        return None if self.keep_auto else self.keep

    def replace(self, **changes) -> Settings:
        return replace(self, **changes)

    def load_options(self) -> dict[str, Any]:
        """`vidqa.models.load_model` keyword arguments."""
        return {"device": self.device, "dtype": self.dtype, "attn": self.attn, "max_pixels": self.max_pixels,
                "device_map": self.device_map, "system_prompt": self.system}

    def same_model(self, other: Settings) -> bool:
        return self.model == other.model and self.load_options() == other.load_options()


def check_generation(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise BadInput(f"--temperature must be 0 (greedy) or more, got {temperature}")


def check_options(settings: Settings, video: str | Path | None = None) -> None:
    """The checks that need neither torch nor a model: generation values, the budget's range, the
    frame options, then that `video` (when given) is a file. Fast: the CLI runs them first."""
    from vidqa.engine.generation import check_decode
    from vidqa.pruning.core.budget import check_budget
    from vidqa.video.decode import check_frame_options, check_video_path

    check_generation(settings.max_new_tokens, settings.temperature)
    check_decode(settings.decode)
    if isinstance(settings.keep, str) and not settings.keep_auto:
        raise BadInput(f"--keep must be a number in (0, 1] or 'auto', got '{settings.keep}'")
    if settings.keep_auto and settings.flops is not None:
        raise BadInput("give --keep auto or --flops, not both")
    check_budget(settings.keep_fraction, settings.flops)
    if settings.chunk_frames is not None and settings.chunk_frames < 1:
        raise BadInput(f"--chunk-frames must be at least 1, got {settings.chunk_frames}")
    if settings.max_visual_tokens is not None and settings.max_visual_tokens < 1:
        raise BadInput(f"--max-visual-tokens must be at least 1, got {settings.max_visual_tokens}")
    frames = settings.frames if settings.frames is not None or settings.fps is not None else 1
    check_frame_options(frames, settings.fps, settings.start, settings.end)
    if video is not None:  # last: a mistyped option is named even when the path is wrong too
        check_video_path(video)


def check_settings(settings: Settings, video: str | Path | None = None):
    """Validate everything that needs no model: `check_options`, then the preset and its
    overrides; returns the loaded preset. Called before a model loads, so a typo costs no load."""
    from vidqa.pruning.core.presets import build_pruner, load_preset

    check_options(settings, video)
    preset = load_preset(settings.prune, list(settings.params))
    if not preset.stages:  # `none`: its --keep/--flops limits need no model
        build_pruner(preset, None, keep=settings.keep_fraction, flops=settings.flops)
    return preset


def frames_for_model(model: str, frames: int | None) -> int | None:
    """--frames as given; without it, a bundled model's own clip length, else None (the model
    family's reference sampling then chooses, see `models.frame_rule_for`)."""
    found = bundled(model) if frames is None else None
    return found.frames if found is not None else frames


def frame_options(settings: Settings):
    """The engine's FrameOptions for these settings (reads the model's config, not its weights,
    when the family's reference sampling decides)."""
    from vidqa.engine.request import FrameOptions
    from vidqa.models import frame_rule_for

    frames = frames_for_model(settings.model, settings.frames)
    rule = frame_rule_for(settings.model) if frames is None and settings.fps is None else None
    return FrameOptions(frames=frames, fps=settings.fps, start=settings.start, end=settings.end, sampling=rule)


def decode_video(video: str | Path, settings: Settings, stats=None):
    """Sample the video's frames as `settings` say -> Clip; the time goes to `stats.time.video_decode_s`."""
    from vidqa.engine.request import decode_video as decode
    from vidqa.engine.stats import Stats, timed

    options = frame_options(settings)
    stats = stats if stats is not None else Stats()
    with timed(stats.time, "video_decode_s"):
        return decode(str(video), options, chunk_frames=settings.chunk_frames)


def generation_options(settings: Settings):
    from vidqa.engine.request import GenerationOptions

    return GenerationOptions(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                             seed=settings.seed, decode=settings.decode)


def placement(model) -> dict | None:
    """{device: modules placed there} for a sharded model; None on one device."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping or len(set(mapping.values())) < 2:
        return None
    counts: dict[str, int] = {}
    for where in mapping.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def open_model(settings: Settings | str | None = None) -> Model:
    """Load the model `settings` name (a hub id, a checkpoint directory, or "micro")."""
    from vidqa.models import load_model

    if settings is None or isinstance(settings, str):
        settings = Settings(model=settings or DEFAULT_MODEL)
    adapter = load_model(settings.model, **settings.load_options())
    return Model(adapter, settings)


@dataclass
class Result:
    """One answered question: the engine's Answer with what produced it."""

    answer: Any  # engine.request.Answer: text, stats, notes, details, generation, kept
    clip: Any  # video.decode.Clip: the frames the model saw
    settings: Settings
    preset: Any  # pruning.core.presets.Preset
    parameters: dict  # the settings in effect, as --json records them

    @property
    def text(self) -> str:
        return self.answer.text

    @property
    def stats(self):
        return self.answer.stats

    @property
    def notes(self) -> list[str]:
        return self.answer.notes

    def record(self, placement_notes: list[str] = ()) -> dict:
        """The `--json` record (docs/json.md)."""
        from vidqa.render.report import ask_record

        record = ask_record(self.answer, model=self.settings.model, preset=self.preset.name,
                            parameters=self.parameters, details=self.answer.details)
        record["notes"] = list(placement_notes) + record["notes"]
        return record

    def draw_kept(self, path: str | Path, question: str) -> Path:
        """Draw the frames with each visual token's fate (needs matplotlib) -> the image's path."""
        from vidqa.errors import RuntimeFailure
        from vidqa.render.show_kept import describe, draw_kept
        from vidqa.video.decode import load_frames

        if self.answer.kept is None:
            raise RuntimeFailure("no kept-token image: this request's tokens carry no provenance")
        clip = load_frames(self.clip)  # a streamed clip is decoded again, for the drawing only
        draw_kept(self.answer.kept, clip.frames, clip.timestamps, Path(path),
                  describe(self.settings.model, self.preset.name, self.settings.keep, question, self.stats))
        return Path(path)


class Model:
    """A loaded model. Ask it about videos with any frames/pruning/generation settings; the
    load options (device, dtype, ...) are fixed at `open_model`. One request at a time."""

    def __init__(self, adapter, settings: Settings):
        self.adapter, self.settings = adapter, settings
        self._presets: dict[tuple, Any] = {}
        self._frame_options: dict[Settings, Any] = {}

    @property
    def notes(self) -> list[str]:
        """What loading decided that a user should know (e.g. that the model was sharded)."""
        return list(self.adapter.placement_notes)

    def _settings(self, settings: Settings | None, changes: dict) -> Settings:
        settings = (settings or self.settings).replace(**changes) if changes else (settings or self.settings)
        if settings.model != self.settings.model:
            raise BadInput(f"this model is {self.settings.model}, not {settings.model}; open that one with open_model")
        return settings

    def preset(self, settings: Settings):
        """The settings' preset, loaded once per (name, overrides)."""
        from vidqa.pruning.core.presets import load_preset

        key = (settings.prune, tuple(settings.params))
        if key not in self._presets:
            self._presets[key] = load_preset(settings.prune, list(settings.params))
        return self._presets[key]

    def pruner(self, settings: Settings | None = None):
        """A fresh pruner for this model with the settings' preset and budget."""
        from vidqa.pruning.core.presets import build_pruner

        settings = settings or self.settings
        return build_pruner(self.preset(settings), self.adapter, keep=settings.keep_fraction, flops=settings.flops)

    def frame_options(self, settings: Settings):
        """FrameOptions for `settings`, worked out once (the reference rule reads the config)."""
        if settings not in self._frame_options:
            self._frame_options[settings] = frame_options(settings)
        return self._frame_options[settings]

    def parameters(self, settings: Settings, **extra) -> dict:
        """The settings in effect, as the `--json` record's `parameters` (docs/json.md)."""
        model = self.adapter.model
        preset = self.preset(settings)
        options = self.frame_options(settings)
        return {
            "frames": options.frames, "fps": settings.fps, "start": settings.start, "end": settings.end,
            "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."), "attn": settings.attn,
            "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature, "seed": settings.seed,
            "decode": settings.decode, "chunk_frames": settings.chunk_frames,
            "max_visual_tokens": settings.max_visual_tokens,
            "keep": settings.keep, "flops": settings.flops, "preset_parameters": preset.parameters(),
            "positions": preset.positions, "max_pixels": settings.max_pixels,
            "sampling": options.sampling.describe() if options.sampling is not None else None,
            "system_prompt": self.adapter.system_prompt, "device_map": placement(model), **extra,
        }

    def _clip(self, video, settings: Settings, stats):
        from vidqa.video.decode import Clip

        if isinstance(video, Clip):
            return video
        from vidqa.engine.request import decode_video as decode
        from vidqa.engine.stats import timed

        with timed(stats.time, "video_decode_s"):
            return decode(str(video), self.frame_options(settings), chunk_frames=settings.chunk_frames)

    def ask(self, video, question: str, settings: Settings | None = None, *,
            on_text: Callable[[str], None] | None = None, stats=None, encoded_cache=None,
            progress: Callable | None = None, **changes) -> Result:
        """Answer `question` about `video` (a path, or a Clip from `decode_video`).

        settings/changes: this request's settings (default: the model's, with `changes` applied,
        e.g. prune="evs", keep=0.3). on_text receives the answer as it streams; progress, a
        long video's `engine.streaming.Progress` after each chunk."""
        from vidqa.engine import request as engine
        from vidqa.engine.stats import Stats

        settings = self._settings(settings, changes)
        stats = stats if stats is not None else Stats()
        pruner = self.pruner(settings)
        clip = self._clip(video, settings, stats)
        long_video = engine.LongVideoOptions(chunk_frames=settings.chunk_frames, keep_auto=settings.keep_auto,
                                             max_visual_tokens=settings.max_visual_tokens, progress=progress)
        answer = engine.answer(self.adapter, clip, question, generation_options(settings), pruner=pruner,
                               on_text=on_text, stats=stats, encoded_cache=encoded_cache, long_video=long_video)
        parameters = self.parameters(settings, generation=answer.generation)
        if "fit" in answer.details:  # --keep auto / --max-visual-tokens chose the positions rule too
            parameters["positions"] = answer.details["fit"]["positions"]
        preset = self.preset(settings) if answer.preset is None else answer.preset
        return Result(answer, clip, settings, preset, parameters)

    def session(self, video, settings: Settings | None = None, *, history: bool = False, reuse: bool = True,
                encoded_cache=None, stats=None, **changes) -> Session:
        """Ask one video many questions: decoded, encoded and pruned once, and (for `none` and
        question-agnostic pre-LLM presets) prefilled once (vidqa/engine/session.py). keep="auto" /
        max_visual_tokens fit the video's prefix to the context once; a long clip's first encoding
        streams (README "Long videos"), only its pruned prefix kept."""
        from vidqa.engine import request as engine
        from vidqa.engine.session import VideoSession, prefix_reusable
        from vidqa.engine.stats import Stats, timed
        from vidqa.video.decode import load_frames

        settings = self._settings(settings, changes)
        stats = stats if stats is not None else Stats()
        clip = self._clip(video, settings, stats)
        pruner = self.pruner(settings)
        if not (reuse and prefix_reusable(pruner)):  # every question runs in full: hold the decoded clip
            with timed(stats.time, "video_decode_s"):
                clip = load_frames(clip)
        long_video = engine.LongVideoOptions(chunk_frames=settings.chunk_frames, keep_auto=settings.keep_auto,
                                             max_visual_tokens=settings.max_visual_tokens)
        session = VideoSession(self.adapter, clip, pruner, generation_options(settings), reuse=reuse,
                               history=history, encoded_cache=encoded_cache, long_video=long_video)
        return Session(self, session, settings, decode_stats=stats)


@dataclass
class Session:
    """A video held ready for questions (`Model.session`)."""

    model: Model
    video: Any  # engine.session.VideoSession
    settings: Settings
    decode_stats: Any = None  # the decode's cost (video_decode_s)
    notes_seen: set = field(default_factory=set)

    @property
    def clip(self):
        return self.video.clip

    @property
    def reuse(self) -> bool:
        """Whether questions reuse the video's prefill (False for in-LLM presets or --no-reuse)."""
        return self.video.reuse

    def prepare(self, stats=None):
        """Encode, prune and (when reusable) prefill the video now -> what it cost (Stats)."""
        stats = stats if stats is not None else self.decode_stats
        return self.video.prepare(stats)

    def ask(self, question: str, *, on_text: Callable[[str], None] | None = None, stats=None) -> Result:
        answer = self.video.ask(question, on_text=on_text, stats=stats)
        parameters = self.model.parameters(self.settings, history=self.video.history, reuse=self.video.reuse)
        if "fit" in answer.details:  # --keep auto / --max-visual-tokens chose the positions rule too
            parameters["positions"] = answer.details["fit"]["positions"]
        preset = self.model.preset(self.settings) if answer.preset is None else answer.preset
        return Result(answer, self.clip, self.settings, preset, parameters)


def ask(video, question: str, settings: Settings | None = None, **changes) -> Result:
    """Load the model and answer one question (for many, keep the Model from `open_model`)."""
    settings = (settings or Settings()).replace(**changes) if changes else (settings or Settings())
    check_settings(settings)
    return open_model(settings).ask(video, question, settings)
