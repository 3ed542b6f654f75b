"""Does pruning turn saved FLOPs into saved time, and at what overhead?

For one model and one clip, runs `none` and every pruning preset at several `--keep` budgets
(after warm-up, repetitions interleaved across configurations so that drift in a shared machine
hits all of them alike) through the real request path (`vidqa.engine.request.answer`), and reports per
configuration:

- LLM prefill: the model's first forward in `generate` (embeddings -> decoder -> lm_head on the
  last row), in-LLM pruning stages included; median, min, max over the repetitions;
- TTFT: time to first token from the start of the request (the clip is already decoded):
  preprocessing, vision encoder, pre-LLM pruning, budget solve, generate setup, prefill;
- pruning overhead: time inside the pruning stages (before and inside the LLM) plus the budget
  solve, as % of the vanilla prefill;
- decode tokens/s from a short greedy generate (exactly --decode-tokens tokens);
- peak memory above the weights: on CUDA `max_memory_allocated` minus what was allocated before
  the request; on CPU the peak of live bytes in PyTorch's CPU allocator during the request, read
  from the profiler's memory events in one extra, untimed run per configuration;
- FLOPs (analytic, vidqa.flops): the full-prompt prefill fraction (every prompt token through
  every layer + lm_head, pruned / vanilla) and the papers' visual-only fraction;
- realised gain = speedup x FLOPs fraction = speedup / (1 / fraction), i.e. the share of the
  theoretical speedup that is realised. Speedup is the vanilla prefill over the configuration's
  prefill plus its pre-LLM pruning time (the whole path from the visual features to the first
  logits). Computed against both FLOPs fractions; the full-prompt one is the honest denominator.
- hardware reference (--reference-frames): `none` on fewer frames of the same clip, i.e. an
  unpruned prompt of about the pruned length; "vs unpruned prompt of equal FLOPs" is its
  (interpolated) time over the configuration's: 1.0 = pruning is as fast as a shorter prompt, so
  whatever is missing from the FLOPs ideal is the hardware's, not the pruning's.

Without --model it builds (once, cached under --workdir) a random-weight LLaVA-OneVision with
the text dimensions of llava-onevision-qwen2-0.5b (Qwen2-0.5B: hidden 896, 24 layers, 14 heads,
2 KV heads, FFN 4864), a word-level vocabulary and a 1-layer SigLIP (hidden 32) at 384 px /
patch 14 (27x27 patches -> 14x14 = 196 tokens per frame), so that the LLM dominates. The clip is
generated (vidqa.testing.videos): a textured static half, a moving square, a bouncing disc and a
sliding bar, so PruneVid and AdaTP meet realistic redundancy. `--bench-dims qwen2-7b` builds
every dimension of llava-onevision-qwen2-7b instead (Qwen2-7B text, the 26-layer SigLIP-so400m
tower): 7.0 B random parameters drawn on the GPU and saved in bf16, for GPUs
(benchmarks/gpu_round.sh runs it with the CUDA tests and the decode benchmark).

    python benchmarks/prefill.py --threads 2                         # CPU, bench model
    python benchmarks/prefill.py --bench-dims qwen2-7b --device cuda --frames 32   # GPU, 7B dims
    python benchmarks/prefill.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf \
        --device cuda --frames 32                                     # a real model on a GPU

Writes results.json, table.md and speedup.png to --out; prints the table (`--replot
results.json` redraws both). Measures, never asserts timings. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_PRESETS = ("none", "fastv", "prunevid", "sparsevlm", "adatp", "evs", "vidcom2", "visionzip", "fastvid", "dycoke", "flashvid", "holitom", "earlytom")
DEFAULT_KEEPS = (0.1, 0.25, 0.5)
QUESTION = "what happens in this video ? which way does the square move , left or right ?"

# The bench model: llava-onevision-qwen2-0.5b's text dimensions, a tiny vision tower.
BENCH_MODEL = dict(
    image_size=384, patch_size=14, vision_hidden=32, vision_layers=1,
    text_hidden=896, text_layers=24, text_heads=14, text_kv_heads=2, text_intermediate=4864,
    max_positions=32768,  # its context too: 32 frames of 196 tokens pass the tiny models' 4096
    weight_scale=1.0,  # HF's own init (std 0.02): well-scaled activations, distinct patch features
)
BENCH_MODEL_VERSION = 2  # 2: the real model's context (32768), which the context check needs
# --bench-dims qwen2-7b: every dimension of llava-onevision-qwen2-7b-ov (Qwen2-7B text, the
# 26-layer SigLIP-so400m tower it reads), random weights drawn on the GPU and saved in bf16
# (13 GiB); a GPU model: its prefill, not a toy vision tower, is what users wait for.
BENCH_MODEL_7B = dict(
    image_size=384, patch_size=14, vision_hidden=1152, vision_layers=26, vision_heads=16, vision_intermediate=4304,
    text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944,
    max_positions=32768, weight_scale=1.0,
)
# --bench-dims qwen2-0.5b-so400m: every dimension of llava-onevision-qwen2-0.5b-ov (Qwen2-0.5B text,
# the 26-layer SigLIP-so400m tower); the CPU model where the vision encoder is most of a request
# (benchmarks/encoder_savings.py).
BENCH_MODEL_05B_SO400M = dict(BENCH_MODEL, vision_hidden=1152, vision_layers=26, vision_heads=16, vision_intermediate=4304)
BENCH_DIMS = {"qwen2-0.5b": BENCH_MODEL, "qwen2-0.5b-so400m": BENCH_MODEL_05B_SO400M, "qwen2-7b": BENCH_MODEL_7B}


# -- inputs ----------------------------------------------------------------------------------
def bench_model_dir(workdir: Path, dims: str = "qwen2-0.5b") -> Path:
    """Build the bench checkpoint once; later runs reuse it (a marker file says it is complete)."""
    from vidqa.testing.builders import build_tiny_llava_onevision

    spec = BENCH_DIMS[dims]
    path = workdir / f"llava-ov-{dims}-dims-v{BENCH_MODEL_VERSION}"
    marker = path / ".complete"
    if not marker.exists():
        print(f"building the bench model in {path} (once) ...", file=sys.stderr, flush=True)
        large = dims != "qwen2-0.5b"
        build_tiny_llava_onevision(
            path, **spec,
            init_device="cuda" if large and torch.cuda.is_available() else "cpu",
            save_dtype=torch.bfloat16 if large else None,
        )
        marker.write_text(json.dumps(spec))
    return path


def bench_frames(num_frames: int = 32, size: int = 384, seed: int = 0) -> np.ndarray:
    """Static checkerboard on the left, a bouncing disc and a sliding bar on the right (from
    vidqa.testing.videos), a red square crossing the top, light sensor noise. uint8 [T, H, W, 3]."""
    from vidqa.testing.videos import static_left_half_frames

    frames = static_left_half_frames(num_frames=num_frames, size=(size, size), seed=seed, right="shapes")
    side = size // 6
    for t in range(num_frames):
        left = round(t / max(num_frames - 1, 1) * (size - side))
        frames[t, size // 10 : size // 10 + side, left : left + side] = (220, 30, 30)
    rng = np.random.default_rng(seed)
    noisy = frames.astype(np.float32) + rng.normal(0.0, 2.0, frames.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def bench_clip_path(workdir: Path, size: int) -> Path:
    from vidqa.testing.videos import write_video

    path = workdir / f"bench-clip-{size}px.mp4"
    if not path.exists():
        write_video(path, bench_frames(size=size), fps=8.0)
    return path


# -- measuring one request -------------------------------------------------------------------
@dataclass
class Sample:
    prefill_s: float  # first model forward (in-LLM pruning included)
    ttft_s: float  # request start -> end of the first forward
    pre_llm_s: float  # pre-LLM pruning stages
    overhead_s: float  # all pruning stages + budget solve
    decode_tokens_per_s: float
    generated_tokens: int
    peak_bytes: int | None = None  # CUDA: measured every run; CPU: only in the memory run


class _FirstForward:
    """Start and end of the model's first forward (the prefill) during one generate."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.start = self.end = None

    def __enter__(self):
        from vidqa.engine.stats import synchronize

        def before(module, args, kwargs):
            if self.start is None:
                synchronize(self.device)
                self.start = time.perf_counter()

        def after(module, args, kwargs, output):
            if self.end is None:
                synchronize(self.device)
                self.end = time.perf_counter()

        self._handles = [
            self.model.register_forward_pre_hook(before, with_kwargs=True),
            self.model.register_forward_hook(after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


class _StageTimer:
    """Wraps a pruner's before_llm / inside_llm to time the pre-LLM stages and the budget solve
    (inside_llm solves --keep before generate starts; the engine times neither separately)."""

    def __init__(self, pruner, device):
        self.pruner, self.device = pruner, device
        self.pre_llm_s = self.setup_s = 0.0

    def __enter__(self):
        from vidqa.engine.stats import synchronize

        before_llm, inside_llm = self.pruner.before_llm, self.pruner.inside_llm

        def timed_before(tokens, state):
            synchronize(self.device)
            started = time.perf_counter()
            try:
                return before_llm(tokens, state)
            finally:
                synchronize(self.device)
                self.pre_llm_s += time.perf_counter() - started

        def timed_inside(inputs, state):
            started = time.perf_counter()
            try:
                return inside_llm(inputs, state)
            finally:
                self.setup_s += time.perf_counter() - started

        self.pruner.before_llm, self.pruner.inside_llm = timed_before, timed_inside
        return self

    def __exit__(self, *exc):
        del self.pruner.before_llm, self.pruner.inside_llm  # back to the class's methods


def cpu_peak_bytes(run) -> tuple[object, int]:
    """(run(), peak live bytes in PyTorch's CPU allocator above the level at the start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak


def run_once(adapter, clip, question, preset, keep, decode_tokens, memory=False):
    """One request through vidqa.engine.request.answer -> (Sample, Answer)."""
    from vidqa.engine import request as engine
    from vidqa.pruning.core.presets import build_pruner

    device = adapter.model.device
    pruner = build_pruner(preset, adapter, keep=None if preset.name == "none" else keep)
    generation = engine.GenerationOptions(max_new_tokens=decode_tokens)
    is_cuda = device.type == "cuda"

    def request():
        with _FirstForward(adapter.model, device) as clock, _StageTimer(pruner, device) as stages:
            if is_cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            result = engine.answer(adapter, clip, question, generation, pruner=pruner)
        return result, clock, stages, started

    peak = None
    if is_cuda:
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        (result, clock, stages, started) = request()  # engine.answer resets the peak counter
        peak = torch.cuda.max_memory_allocated(device) - baseline
    elif memory:
        (result, clock, stages, started), peak = cpu_peak_bytes(request)
    else:
        result, clock, stages, started = request()
    times = result.stats.time
    sample = Sample(
        prefill_s=clock.end - clock.start,
        ttft_s=clock.end - started,
        pre_llm_s=stages.pre_llm_s,
        overhead_s=times.pruning_s + stages.setup_s,
        decode_tokens_per_s=times.decode_tokens_per_s,
        generated_tokens=result.stats.tokens.generated_tokens,
        peak_bytes=peak,
    )
    return sample, result


# -- configurations --------------------------------------------------------------------------
@dataclass
class Config:
    preset: str
    keep: float | None  # None for `none`
    samples: list[Sample] = field(default_factory=list)
    unreachable: str | None = None
    peak_bytes: int | None = None
    info: dict = field(default_factory=dict)  # counts, FLOPs, notes from one request
    reference_frames: int | None = None  # hardware reference: `none` on a clip of fewer frames
    clip: object = None  # that clip (None: the benchmark's clip)

    @property
    def label(self) -> str:
        if self.reference_frames is not None:
            return f"none, {self.reference_frames} frames (reference)"
        return self.preset if self.keep is None else f"{self.preset} @ {self.keep:g}"


def causal_prefill_macs(shape, stats) -> int:
    """Full-prompt prefill MACs with the causal mask discounted: row i attends to i + 1 keys, so
    the attention term of a layer with n rows is n(n+1) q_width instead of 2 n^2 q_width. This
    is what a causal SDPA/flash kernel that skips masked blocks computes (vidqa.flops counts the
    dense n^2, as the papers do)."""
    before = stats.tokens.visual_tokens_per_layer[0] if stats.tokens.visual_tokens_per_layer else 0
    lengths = [stats.tokens.llm_prompt_tokens - (before - n) for n in stats.tokens.visual_tokens_per_layer]
    return stats.flops.prompt_prefill_macs - sum(shape.q_width * n * (n - 1) for n in lengths)


def record_info(config: Config, result, shape) -> None:
    stats = result.stats
    config.info = {
        "visual_tokens_before": stats.tokens.visual_tokens_before,
        "visual_tokens_per_layer": stats.tokens.visual_tokens_per_layer,
        "visual_tokens_per_stage": stats.tokens.visual_tokens_per_stage,
        "retention": stats.tokens.layer_avg_retention,
        "prompt_tokens": stats.tokens.prompt_tokens,
        "llm_prompt_tokens": stats.tokens.llm_prompt_tokens,
        "prompt_prefill_macs": stats.flops.prompt_prefill_macs,
        "causal_prefill_macs": causal_prefill_macs(shape, stats),
        "paper_visual_prefill_macs": stats.flops.paper_visual_prefill_macs,
        "paper_fraction": stats.flops.paper_fraction,
        "notes": list(result.notes),
    }


def measure(adapter, clip, question, presets, keeps, repeats, warmup, decode_tokens, memory=True, log=print,
            reference_clips=()):
    """reference_clips: shorter clips of the same video; `none` on each is the hardware reference
    (an unpruned prompt of about the pruned length: what time the hardware needs for it)."""
    from vidqa import flops
    from vidqa.errors import BadInput
    from vidqa.pruning.core.presets import load_preset

    shape, _ = flops.shapes_from_model_config(adapter.model.config)

    configs = [Config("none", None)] + [Config(name, keep) for name in presets if name != "none" for keep in keeps]
    configs += [Config("none", None, reference_frames=c.num_frames, clip=c) for c in reference_clips]
    loaded = {name: load_preset(name) for name in {c.preset for c in configs}}
    for config in configs:  # warm-up, reachability, counts, memory
        preset = loaded[config.preset]
        try:
            for _ in range(max(warmup, 1)):
                sample, result = run_once(adapter, config.clip or clip, question, preset, config.keep, decode_tokens)
        except BadInput as error:
            lowest = re.search(r"at least ([0-9.]+)", str(error))
            config.unreachable = f"lowest keep {lowest.group(1)}" if lowest else str(error)
            log(f"  {config.label}: unreachable: {error}")
            continue
        record_info(config, result, shape)
        if warmup == 0:  # the reachability run counts as a repetition
            config.samples.append(sample)
        if memory:
            sample, _ = run_once(adapter, config.clip or clip, question, preset, config.keep, decode_tokens,
                                 memory=adapter.model.device.type == "cpu")
            config.peak_bytes = sample.peak_bytes
        log(f"  {config.label}: warm ({config.info['llm_prompt_tokens']} prompt tokens, "
            f"retention {config.info['retention']:.3f})")
    runnable = [c for c in configs if c.unreachable is None]
    for repeat in range(repeats - (1 if warmup == 0 else 0)):
        for config in runnable:  # interleaved: drift hits every configuration alike
            sample, _ = run_once(adapter, config.clip or clip, question, loaded[config.preset], config.keep, decode_tokens)
            config.samples.append(sample)
        log(f"  repetition {repeat + 1} done")
    if adapter.model.device.type == "cuda":
        for config in runnable:
            peaks = [s.peak_bytes for s in config.samples if s.peak_bytes is not None]
            config.peak_bytes = max(peaks) if peaks else config.peak_bytes
    return configs


def layer_cost_curve(adapter, lengths, repeats=3) -> list[dict]:
    """Time ONE decoder layer (the middle one) on n random rows, for each n: is the hardware's
    time linear in the FLOPs at the sequence lengths the pruned prompts have? (If so, any
    shortfall of the realised speedup is the pruning's own.)"""
    from vidqa import flops
    from vidqa.engine.stats import synchronize

    shape, _ = flops.shapes_from_model_config(adapter.model.config)
    model, device = adapter.model, adapter.model.device
    layers = adapter.decoder_layers
    layer = layers[len(layers) // 2]
    rotary = adapter.language_model.rotary_emb
    curve = []
    for n in lengths:
        hidden = torch.randn(1, n, shape.hidden, device=device, dtype=model.dtype) * 0.1
        positions = torch.arange(n, device=device)[None]
        times = []
        with torch.inference_mode():
            position_embeddings = rotary(hidden, positions)
            for _ in range(repeats + 1):  # the first is a warm-up
                synchronize(device)
                started = time.perf_counter()
                layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
                synchronize(device)
                times.append(time.perf_counter() - started)
        best = min(times[1:])
        dense = flops.layer_macs(shape, n)
        causal = dense - shape.q_width * n * (n - 1)
        curve.append({"tokens": n, "layer_s": best, "us_per_token": 1e6 * best / n,
                      "gmacs_per_s_dense": dense / best / 1e9, "gmacs_per_s_causal": causal / best / 1e9})
    return curve


# -- summary ---------------------------------------------------------------------------------
def summarise(configs: list[Config]) -> list[dict]:
    vanilla = configs[0]
    assert vanilla.preset == "none" and vanilla.samples, "the vanilla configuration must run"
    vanilla_prefill = statistics.median(s.prefill_s for s in vanilla.samples)
    vanilla_effective = statistics.median(s.prefill_s + s.pre_llm_s for s in vanilla.samples)  # ~ the same
    vanilla_best = min(s.prefill_s + s.pre_llm_s for s in vanilla.samples)
    vanilla_macs = vanilla.info["prompt_prefill_macs"]
    vanilla_causal = vanilla.info["causal_prefill_macs"]
    rows = []
    for config in configs:
        row = {"preset": config.preset, "keep": config.keep, "label": config.label,
               "reference_frames": config.reference_frames}
        if config.unreachable is not None:
            row["unreachable"] = config.unreachable
            rows.append(row)
            continue
        prefill = [s.prefill_s for s in config.samples]
        effective = statistics.median(s.prefill_s + s.pre_llm_s for s in config.samples)
        full_fraction = config.info["prompt_prefill_macs"] / vanilla_macs
        # visual-only MACs over the benchmark clip's vanilla ones (= stats' paper_fraction for the
        # presets; for a reference clip, its fewer frames' share)
        paper_fraction = config.info["paper_visual_prefill_macs"] / vanilla.info["paper_visual_prefill_macs"]
        causal_fraction = config.info["causal_prefill_macs"] / vanilla_causal
        speedup = vanilla_effective / effective
        # best-of-N: on a machine shared with other jobs the minimum is the usual estimate of the
        # undisturbed time
        best = min(s.prefill_s + s.pre_llm_s for s in config.samples)
        speedup_best = vanilla_best / best
        overhead = statistics.median(s.overhead_s for s in config.samples)
        row.update(
            repetitions=len(config.samples),
            retention=config.info["retention"] * config.info["visual_tokens_before"] / vanilla.info["visual_tokens_before"],
            prefill_median_s=statistics.median(prefill),
            prefill_min_s=min(prefill),
            prefill_max_s=max(prefill),
            prefill_plus_pre_llm_s=effective,
            ttft_median_s=statistics.median(s.ttft_s for s in config.samples),
            overhead_median_s=overhead,
            overhead_pct_of_vanilla_prefill=100 * overhead / vanilla_prefill,
            decode_tokens_per_s=statistics.median(s.decode_tokens_per_s for s in config.samples),
            generated_tokens=config.samples[0].generated_tokens,
            peak_bytes=config.peak_bytes,
            flops_full_fraction=full_fraction,
            flops_paper_fraction=paper_fraction,
            flops_causal_fraction=causal_fraction,
            speedup=speedup,
            realised_full=speedup * full_fraction,
            realised_paper=speedup * paper_fraction,
            realised_causal=speedup * causal_fraction,
            speedup_best=speedup_best,
            realised_full_best=speedup_best * full_fraction,
            overhead_min_s=min(s.overhead_s for s in config.samples),
            llm_prompt_tokens=config.info["llm_prompt_tokens"],
            visual_tokens_per_layer=config.info["visual_tokens_per_layer"],
            notes=config.info["notes"],
        )
        rows.append(row)
    add_reference_ratio(rows)
    return rows


def add_reference_ratio(rows: list[dict]) -> None:
    """rows[i]["vs_reference"]: the time an UNPRUNED prompt with the same full-prompt FLOPs takes
    (interpolated, log-log, between `none` on the reference frame counts and on the whole clip)
    over this configuration's prefill + pre-LLM time. 1.0 = pruning is as fast as simply having
    a shorter prompt; what is missing from the FLOPs ideal is then the hardware's, not the
    pruning's. Extrapolated below the smallest reference. No-op without reference rows."""
    vanilla = rows[0]
    points = sorted([(1.0, vanilla["prefill_plus_pre_llm_s"])] + [
        (r["flops_full_fraction"], r["prefill_plus_pre_llm_s"]) for r in rows
        if r.get("reference_frames") is not None and "unreachable" not in r])
    if len(points) < 2:
        return
    xs = [math.log(f) for f, _ in points]
    ys = [math.log(t) for _, t in points]
    for row in rows:
        if "unreachable" in row:
            continue
        x = math.log(row["flops_full_fraction"])
        i = max(0, min(len(xs) - 2, sum(1 for value in xs if value <= x) - 1))
        y = ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
        row["reference_prefill_s"] = math.exp(y)
        row["vs_reference"] = math.exp(y) / row["prefill_plus_pre_llm_s"]


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| config | retention | LLM prefill ms: median (min–max) | TTFT ms | pruning overhead ms (% vanilla prefill) "
        "| decode tok/s | peak mem MiB | FLOPs % full prompt | FLOPs % paper | speedup | realised (full) | realised (paper) "
        "| realised (full, best-of-N) |"
    )
    with_reference = any("vs_reference" in row for row in rows)
    if with_reference:
        header += " vs unpruned prompt of equal FLOPs |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        if "unreachable" in row:
            lines.append(f"| {row['label']} | unreachable: {row['unreachable']} |" + " |" * (header.count("|") - 3))
            continue
        peak = "–" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {row['label']} | {row['retention']:.3f} "
            f"| {1000 * row['prefill_median_s']:.0f} ({1000 * row['prefill_min_s']:.0f}–{1000 * row['prefill_max_s']:.0f}) "
            f"| {1000 * row['ttft_median_s']:.0f} "
            f"| {1000 * row['overhead_median_s']:.1f} ({row['overhead_pct_of_vanilla_prefill']:.2f}%) "
            f"| {row['decode_tokens_per_s']:.1f} | {peak} "
            f"| {100 * row['flops_full_fraction']:.1f} | {100 * row['flops_paper_fraction']:.1f} "
            f"| {row['speedup']:.2f}x | {row['realised_full']:.2f} | {row['realised_paper']:.2f} "
            f"| {row['realised_full_best']:.2f} |"
            + (f" {row['vs_reference']:.2f} |" if with_reference else "")
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Three panels, one series per preset (the keeps), with `none` on fewer frames as the
    hardware reference: prefill speedup vs the full-prompt FLOPs fraction and vs the papers'
    visual-only fraction (log-log, ideal speedup = 1/fraction dashed), and the realised share
    speedup x fraction (full prompt) vs that fraction (ideal 1, the 0.9 target dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    measured = [r for r in rows if "unreachable" not in r and r["preset"] != "none"]
    references = sorted((r for r in rows if r.get("reference_frames") is not None and "unreachable" not in r),
                        key=lambda r: r["flops_full_fraction"])
    presets = list(dict.fromkeys(r["preset"] for r in measured))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>"
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    low = min([r["flops_paper_fraction"] for r in measured + references] + [0.1]) * 0.8
    for axis, key, name in (
        (axes[0], "flops_full_fraction", "FLOPs fraction, full prompt prefill"),
        (axes[1], "flops_paper_fraction", "FLOPs fraction, paper convention (visual only)"),
    ):
        xs = np.geomspace(low, 1.0, 100)
        axis.plot(xs, 1 / xs, "k--", linewidth=1, label="ideal: speedup = 1 / fraction")
        if references:
            axis.plot([r[key] for r in references] + [1.0], [r["speedup"] for r in references] + [1.0], "x-.",
                      color="grey", label="none on fewer frames (hardware reference)")
        for index, preset in enumerate(presets):
            points = sorted((r[key], r["speedup"]) for r in measured if r["preset"] == preset)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=markers[index % len(markers)],
                      color=colours[index % len(colours)], linewidth=1, alpha=0.85, label=preset)
        axis.plot([1.0], [1.0], "ks", label="none")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.xaxis.set_major_locator(FixedLocator([t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if t >= low]))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.yaxis.set_major_locator(FixedLocator([1, 1.5, 2, 3, 5, 7, 10, 15]))
        axis.yaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
        axis.set_xlabel(name)
        axis.set_ylabel("prefill speedup over none (median)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axis = axes[2]
    axis.axhline(1.0, color="k", linestyle="--", linewidth=1, label="ideal")
    axis.axhline(0.9, color="k", linestyle=":", linewidth=1, label="target 0.9")
    if references:
        axis.plot([r["flops_full_fraction"] for r in references], [r["realised_full"] for r in references], "x-.",
                  color="grey", label="none on fewer frames")
    for index, preset in enumerate(presets):
        points = sorted((r["flops_full_fraction"], r["realised_full"], r["keep"]) for r in measured if r["preset"] == preset)
        colour = colours[index % len(colours)]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=markers[index % len(markers)], color=colour,
                  linewidth=1, alpha=0.85, label=preset)
        for x, y, keep in points:
            axis.annotate(f"{keep:g}", (x, y), textcoords="offset points", xytext=(5, -3), fontsize=7, color=colour)
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(FixedLocator([t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if t >= low]))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    values = [r["realised_full"] for r in measured + references]
    axis.set_ylim(min(values + [0.85]) - 0.03, 1.05)
    axis.set_xlabel("FLOPs fraction, full prompt prefill (labels: --keep)")
    axis.set_ylabel("realised share = speedup x fraction")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": _cpu_name(),
    }
    if hasattr(os, "getloadavg"):  # a loaded machine (other jobs) makes every timing noisier
        info["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# -- entry point -----------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or checkpoint directory (default: build the CPU bench model)")
    parser.add_argument("--bench-dims", default="qwen2-0.5b", choices=sorted(BENCH_DIMS),
                        help="the bench model's dimensions, without --model (qwen2-7b: llava-onevision-qwen2-7b's, for GPUs)")
    parser.add_argument("--video", help="video file (default: the generated bench clip)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated; `none` always runs")
    parser.add_argument("--keeps", default=",".join(map(str, DEFAULT_KEEPS)), help="comma-separated --keep values")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per configuration first")
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens generated per run (decode tokens/s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory-profiling run")
    parser.add_argument("--workdir", default=os.environ.get("VIDQA_BENCH_DIR", "~/.cache/vidqa-bench"),
                        help="where the bench model and clip are cached")
    parser.add_argument("--out", default="bench-results", help="directory for results.json, table.md, speedup.png")
    parser.add_argument("--reference-frames", default="1,2,4",
                        help="comma-separated frame counts: also run `none` on that many frames (hardware reference); '' for none")
    parser.add_argument("--layer-curve", default="",
                        help="comma-separated sequence lengths: also time one decoder layer at each (linearity check)")
    parser.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw table.md and the plot from a results.json")
    parser.add_argument("--plot-name", default="speedup.png", help="file name of the plot in --out")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, flush=True, **k))
    workdir = Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        add_reference_ratio(results["rows"])
        table = markdown_table(results["rows"])
        (out / "table.md").write_text(table + "\n")
        plot(results["rows"], out / args.plot_name, results.get("title", ""))
        print(table)
        return results

    from vidqa.models import load_model
    from vidqa.video.decode import load_clip

    model_id = args.model or str(bench_model_dir(workdir, args.bench_dims))
    adapter = load_model(model_id, device=args.device, dtype=args.dtype, attn=args.attn)
    # Decode exactly --decode-tokens tokens: a random model may otherwise stop at once.
    adapter.model.generation_config.min_new_tokens = args.decode_tokens
    size = getattr(getattr(adapter.model.config, "vision_config", None), "image_size", None) or 384
    video = args.video or str(bench_clip_path(workdir, size))
    clip = load_clip(video, num_frames=args.frames)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    log(f"model {model_id} on {adapter.model.device} ({adapter.model.dtype}), {clip.num_frames} frames, "
        f"{torch.get_num_threads()} threads; {args.warmup} warm-up + {args.repeats} timed runs per configuration")

    load_at_start = machine().get("load_average_1_5_15_min")
    wall_start, cpu_start = time.perf_counter(), os.times()
    reference_clips = [load_clip(video, num_frames=int(f)) for f in args.reference_frames.split(",") if f.strip()]
    reference_clips = [c for c in reference_clips if c.num_frames < clip.num_frames]
    configs = measure(adapter, clip, args.question, presets, keeps, args.repeats, args.warmup,
                      args.decode_tokens, memory=not args.no_memory, log=log, reference_clips=reference_clips)
    cpu_end = os.times()
    # CPU time this process got / (wall time x threads): well below 1 on a machine shared with
    # other jobs (threads waiting for a core), ~0.9-1 on an idle one
    cpu_share = ((cpu_end.user - cpu_start.user + cpu_end.system - cpu_start.system)
                 / ((time.perf_counter() - wall_start) * torch.get_num_threads()))
    rows = summarise(configs)
    lengths = [int(n) for n in args.layer_curve.split(",") if n.strip()]
    curve = []
    if lengths:
        try:
            curve = layer_cost_curve(adapter, lengths)
        except Exception as error:  # e.g. M-RoPE models want 3-D positions: the check is optional
            log(f"layer curve skipped: {type(error).__name__}: {error}")
    table = markdown_table(rows)
    text = adapter.text_config
    results = {
        "model": model_id if args.model else f"bench model (random weights, llava-onevision {args.bench_dims} dimensions)",
        "model_config": {
            "hidden": text.hidden_size, "layers": text.num_hidden_layers, "heads": text.num_attention_heads,
            "kv_heads": text.num_key_value_heads, "ffn": text.intermediate_size, "vocab": text.vocab_size,
            "image_size": size,
        },
        "device": str(adapter.model.device),
        "dtype": str(adapter.model.dtype).removeprefix("torch."),
        "frames": clip.num_frames,
        "question": args.question,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "decode_tokens": args.decode_tokens,
        "peak_memory_kind": "cuda max_memory_allocated above the weights" if adapter.model.device.type == "cuda"
        else "CPU allocator peak live bytes during the request (profiler memory events)",
        "machine": {**machine(), "load_average_at_start": load_at_start,
                    "cpu_share_of_threads": round(cpu_share, 3) if adapter.model.device.type == "cpu" else None},
        "rows": rows,
        "layer_curve": curve,
        "raw": [{"label": c.label, "samples": [asdict(s) for s in c.samples]} for c in configs],
    }
    results["title"] = (f"{text.num_hidden_layers}-layer, hidden {text.hidden_size} LLM, {clip.num_frames} frames, "
                        f"{results['device']}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table + "\n")
    plot(rows, out / args.plot_name, results["title"])
    print(table)
    if curve:
        print("\n| tokens | one layer ms | µs/token | GMAC/s (dense count) | GMAC/s (causal count) |\n|---|---|---|---|---|")
        for point in curve:
            print(f"| {point['tokens']} | {1000 * point['layer_s']:.1f} | {point['us_per_token']:.0f} "
                  f"| {point['gmacs_per_s_dense']:.1f} | {point['gmacs_per_s_causal']:.1f} |")
    return results


if __name__ == "__main__":
    main()
