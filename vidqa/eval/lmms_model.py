"""`--model vidqa` for lmms-eval: benchmark tasks answered through vidqa's engine and presets.

    python -m lmms_eval --model vidqa --tasks videomme,mvbench --batch_size 1 --log_samples \
        --output_path results/ \
        --model_args model=llava-hf/llava-onevision-qwen2-7b-ov-hf,frames=32,prune=adatp,keep=0.25

Registered through the `lmms_eval.models` entry point in pyproject.toml (lmms-eval loads it when
its model registry starts), so lmms-eval is not edited. This is the only module of vidqa that
imports lmms_eval; install it with `pip install -e ".[eval]"`.

Each request goes through the same code as one `vidqa batch` record (batch.Runner: preset with
-P overrides, clip decode, engine.answer), with the task's context as the question. The vidqa
stats of each answer travel in the sample's `token_counts` entry (lmms-eval writes it into the
samples JSONL under --log_samples); the run's means go through lmms-eval's metric log into the
results JSON's `throughput` block. Model arguments: docs/eval.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from vidqa import api
from vidqa.batch import runner as batching
from vidqa.engine import request as engine
from vidqa.errors import BadInput
from vidqa.hub import DEFAULT_MODEL
from vidqa.pruning.core.presets import check_budget, load_preset

MODEL_NAME = "vidqa"
LOGLIKELIHOOD_UNSUPPORTED = (
    "vidqa answers by generation only: log-likelihood requests (tasks with output_type "
    "loglikelihood or multiple_choice) are not supported; pick the generate_until variant of "
    "the task (e.g. videomme, mvbench)"
)
# per-sample stats also averaged over the run (results JSON, throughput.avg_vidqa_*)
RUN_MEANS = ("visual_tokens_before", "visual_tokens_after", "layer_avg_retention", "flops_percent", "prefill_s", "total_s")


def manifest():
    """The `lmms_eval.models` entry point: registers `--model vidqa` with lmms-eval."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VidqaLMM")


@dataclasses.dataclass
class VidqaTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus vidqa's stats for the sample.

    input_tokens: prompt tokens the LLM received (after pre-LLM pruning); output_tokens: generated.
    """

    vidqa: dict | None = None

    def to_dict(self) -> dict:
        counts = super().to_dict()
        if self.vidqa is not None:
            counts["vidqa"] = self.vidqa
        return counts


def parse_params(text) -> list[str]:
    """`select.ratio=0.3;merge.tau=0.9` -> ['select.ratio=0.3', 'merge.tau=0.9'] (-P overrides).

    `;` separates them because lmms-eval splits --model_args on commas."""
    if text is None or text == "":
        return []
    return batching.parse_overrides([part.strip() for part in str(text).split(";") if part.strip()])


def _optional(value, kind, name):
    if value is None or value == "" or str(value).lower() == "none":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BadInput(f"model_args {name}={value}: expected a {kind.__name__}") from None


class VidqaLMM(lmms):
    """vidqa as an lmms-eval model: one request at a time (batch size 1), generation only.

    Arguments (lmms-eval's --model_args, comma-separated key=value; `pretrained` is an alias of
    `model`): model, device, dtype, attn, max_pixels, frames, fps, start, end, prune, keep,
    params (-P overrides joined by `;`), max_new_tokens and temperature (default: the task's
    generation_kwargs), seed, cache_mb (decoded clips kept in memory).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pretrained: str | None = None,
        device: str | None = "auto",
        dtype: str = "auto",
        attn: str = "sdpa",
        max_pixels: int | None = None,
        frames: int | None = 32,
        fps: float | None = None,
        start: float | None = None,
        end: float | None = None,
        prune: str = "none",
        keep: float | None = None,
        params: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        cache_mb: int = 1024,
        batch_size: int | str = 1,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            names = ", ".join(sorted(unknown))
            raise BadInput(f"model_args: unknown argument(s) {names} for --model vidqa; see docs/eval.md")
        if str(batch_size) != "1":
            raise BadInput(f"--batch_size {batch_size}: vidqa answers one request at a time; use --batch_size 1")
        model = pretrained or model
        frames = _optional(frames, int, "frames")
        fps = _optional(fps, float, "fps")
        if fps is not None:
            frames = None  # as `vidqa ask --fps`: the rate replaces the frame count
        keep = _optional(keep, float, "keep")
        check_budget(keep, None)
        self.prune = str(prune)
        self.keep = keep
        overrides = parse_params(params)
        load_preset(self.prune, batching.overrides_for(self.prune, overrides))  # bad names fail before loading
        self._max_new_tokens = _optional(max_new_tokens, int, "max_new_tokens")
        self._temperature = _optional(temperature, float, "temperature")
        self._seed = _optional(seed, int, "seed")
        self.model = api.open_model(api.Settings(model=model, device=str(device or "auto"), dtype=dtype, attn=attn,
                                                 max_pixels=_optional(max_pixels, int, "max_pixels")))
        self.adapter = self.model.adapter
        self.model.pruner(self.model.settings.replace(prune=self.prune, keep=keep, params=tuple(
            batching.overrides_for(self.prune, overrides))))  # an unreachable keep fails here, once
        self.settings = batching.Settings(
            model=model,
            frame_options=engine.FrameOptions(frames=frames, fps=fps, start=_optional(start, float, "start"),
                                              end=_optional(end, float, "end")),
            generation=engine.GenerationOptions(),
            overrides=overrides,
            attn=attn,
        )
        self.runner = batching.Runner(self.model, self.settings, batching.ClipCache(int(cache_mb) * 2**20))
        self._warned: set[str] = set()

    # --- lmms-eval interface -------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def device(self):
        return self.adapter.model.device

    def loglikelihood(self, requests):
        raise NotImplementedError(LOGLIKELIHOOD_UNSUPPORTED)

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vidqa answers one question per video: multi-round tasks are not supported")

    def generate_until(self, requests) -> list[GenerationResult]:
        """requests[i].args = (context, gen_kwargs, doc_to_visual, doc_id, task, split); the
        visual of a video task is a list with one video path."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        results, samples = [], []
        started = time.perf_counter()
        for number, request in enumerate(requests, start=1):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visual = doc_to_visual(self.task_dict[task][split][doc_id])
            record = self.answer(context, _video_path(visual, task, doc_id), gen_kwargs or {},
                                 record_id=f"{task}/{split}/{doc_id}", number=number)
            text = _cut_at_stops(record.get("answer") or "", (gen_kwargs or {}).get("until"))
            sample = sample_stats(record)
            samples.append(sample)
            stats = record.get("stats") or {}
            tokens = stats.get("tokens") or {}
            results.append(GenerationResult(text=text, token_counts=VidqaTokenCounts(
                input_tokens=tokens.get("llm_prompt_tokens"), output_tokens=tokens.get("generated_tokens"),
                vidqa=sample)))
        failed = [s for s in samples if s["error"]]
        if samples and len(failed) == len(samples):
            raise RuntimeError(f"vidqa: every request failed; the first: {failed[0]['error']}")
        summary = run_summary(samples)
        generated = sum(r.token_counts.output_tokens or 0 for r in results)
        elapsed = time.perf_counter() - started
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=generated,
                    avg_speed=generated / elapsed if elapsed > 0 else 0.0,
                    additional_metrics={f"vidqa_{k}": v for k, v in summary.items() if v is not None})
        return results

    # --- one request ---------------------------------------------------------------------------

    def answer(self, question: str, video: str, gen_kwargs: dict, record_id: str = "1", number: int = 1) -> dict:
        """One question about one video -> the `vidqa batch` record (answer, stats, error)."""
        self.runner.settings = dataclasses.replace(self.settings, generation=self._generation(gen_kwargs))
        row = batching.Row(number=number, line=0, id=record_id, video=video, video_path=Path(video),
                           question=question)
        record = self.runner.run(batching.Task(row, self.prune, self.keep))
        if record.get("error"):
            from loguru import logger

            logger.warning(f"vidqa: {record_id}: {record['error']}")
        return record

    def _generation(self, gen_kwargs: dict):
        """The task's generation_kwargs, unless model_args set max_new_tokens / temperature."""
        max_new = self._max_new_tokens or gen_kwargs.get("max_new_tokens") or engine.GenerationOptions.max_new_tokens
        temperature = self._temperature
        if temperature is None:
            sampling = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0) > 0
            temperature = float(gen_kwargs["temperature"]) if sampling else 0.0
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            self._warn_once("num_beams", "vidqa decodes greedily (or samples with temperature > 0); num_beams is ignored")
        return engine.GenerationOptions(max_new_tokens=int(max_new), temperature=temperature, seed=self._seed)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            from loguru import logger

            self._warned.add(key)
            logger.warning(message)


def _video_path(visual, task: str, doc_id) -> str:
    """doc_to_visual's output for a video task: [path] (a path alone is accepted too)."""
    items = [visual] if isinstance(visual, (str, Path)) else list(visual or [])
    if len(items) != 1 or not isinstance(items[0], (str, Path)):
        kinds = ", ".join(type(item).__name__ for item in items) or "nothing"
        raise BadInput(f"{task} doc {doc_id}: vidqa answers about one video file per question; "
                       f"the task gave {kinds}")
    return str(items[0])


def _cut_at_stops(text: str, until) -> str:
    """Cut the answer at the first of the task's stop strings (generate_until's `until`)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def sample_stats(record: dict) -> dict:
    """What the samples JSONL carries per answer: the headline numbers and the full stats."""
    stats = record.get("stats") or {}
    tokens, times, flops = stats.get("tokens") or {}, stats.get("time") or {}, stats.get("flops") or {}
    fraction = flops.get("paper_fraction")
    return {
        "preset": record.get("preset"),
        "keep": record.get("keep"),
        "error": record.get("error"),
        "visual_tokens_before": tokens.get("visual_tokens_before"),
        "visual_tokens_after": tokens.get("visual_tokens_after"),
        "layer_avg_retention": tokens.get("layer_avg_retention"),
        "flops_percent": None if fraction is None else 100 * fraction,
        "prefill_s": times.get("prefill_s"),
        "total_s": times.get("total_s"),
        "stats": stats or None,
        "pruning": record.get("pruning") or {},
        "notes": record.get("notes") or [],
        "parameters": record.get("parameters"),
    }


def run_summary(samples: list[dict]) -> dict:
    """Means over the successful samples of RUN_MEANS, plus counts."""
    ok = [s for s in samples if not s["error"]]
    summary: dict = {"samples": len(samples), "errors": len(samples) - len(ok)}
    for name in RUN_MEANS:
        values = [float(s[name]) for s in ok if s.get(name) is not None and math.isfinite(float(s[name]))]
        summary[name] = sum(values) / len(values) if values else None
    return summary


__all__ = ["LOGLIKELIHOOD_UNSUPPORTED", "MODEL_NAME", "VidqaLMM", "VidqaTokenCounts", "manifest", "parse_params",
           "run_summary", "sample_stats"]
