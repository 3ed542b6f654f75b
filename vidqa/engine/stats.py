"""Measurements of one request: what was processed, where the time went, what it cost.

Every field here is part of the `--json` schema (docs/json.md): add fields, never rename them.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from vidqa.tensors.device import synchronize


@dataclass
class Timings:
    """Seconds per phase. prefill_s is time to first token: generate start -> first logits."""

    video_decode_s: float = 0.0
    preprocess_s: float = 0.0
    vision_encoder_s: float = 0.0
    pruning_s: float = 0.0  # time inside the pruning stages themselves (before and inside the LLM)
    prefill_s: float = 0.0
    # with a reused video prefix (vidqa chat, batch): prefill_s covers the question's rows only;
    # video_prefill_s is the video prefix's prefill when THIS request paid it (else 0), and
    # prefill_saved_s the prefix prefill a request reusing it did not pay (else 0)
    video_prefill_s: float = 0.0
    prefill_saved_s: float = 0.0
    # decode after the first token; on the static/graphs paths without decode_warmup_s, the
    # one-time set-up (the padded KV cache, the CUDA graph capture) reported on its own
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    decode_warmup_s: float = 0.0
    total_s: float = 0.0


@dataclass
class TokenCounts:
    frames: int = 0
    visual_tokens_before: int = 0  # prunable video tokens the vision encoder produced
    visual_tokens_after: int = 0  # video tokens entering the last decoder layer
    visual_tokens_per_stage: dict[str, int] = field(default_factory=dict)
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    # frames entering each vision-encoder layer, then leaving it (layers + 1 entries), when a stage
    # inside the encoder merged frames (EarlyTom); empty: every frame went through every layer
    encoder_frames_per_layer: list[int] = field(default_factory=list)
    layer_avg_retention: float = 1.0  # (1/L) sum_l n_l / n_0 (docs/design.md, "Budgets")
    prompt_tokens: int = 0  # the unpruned prompt, as the processor built it
    llm_prompt_tokens: int = 0  # what the LLM's first layer received
    generated_tokens: int = 0


@dataclass
class Flops:
    """Multiply-accumulates (MACs). `paper_*` follow the papers' convention (docs/design.md, "FLOPs"):
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
    # the request's own peak: memory in use at its peak minus what was in use when it started
    # (the loaded model, anything cached between requests); see RequestMemory for the kinds
    peak_memory_bytes: int = 0
    peak_memory_kind: str = "rss"
    peak_memory_total_bytes: int = 0  # in use at that peak, the loaded model included
    # what was checked after the prefill (pruning/core/verify.py): {"transformers", "checks", "layers"}
    verified: dict = field(default_factory=dict)
    prefix_reused: bool = False  # generation started from a cached video prefix (vidqa/engine/session.py)
    decode_path: str = "eager"  # the decode path that ran: eager | static | graphs (vidqa/engine/decode.py)

    def to_dict(self) -> dict:
        return asdict(self)


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


class RequestMemory:
    """The peak memory of one request above what was in use when it started.

    kinds:
    - "cuda": torch.cuda.max_memory_allocated minus memory_allocated at the start (the peak
      counter is reset at the start);
    - "rss": Linux resident set size: the kernel's high-water mark (VmHWM) is reset at the start
      (writing 5 to /proc/self/clear_refs), read at the end, minus the RSS at the start;
    - "rss-sampled": where that reset is not allowed, the RSS sampled every 5 ms by a thread;
    - "rss-process": elsewhere (no /proc), the growth of the process's lifetime peak RSS during
      the request: 0 unless the request went above every earlier peak (a lower bound).
    RSS counts what the process holds: memory freed back to the C allocator and reused by the
    request does not show as growth, so on CPU this is the request's growth in footprint.
    """

    SAMPLE_SECONDS = 0.005

    def __init__(self, device):
        self.device = torch.device(device)
        self.kind, self.start_bytes = "rss", 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0

    def start(self) -> "RequestMemory":
        if self.device.type == "cuda":
            self.kind = "cuda"
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        elif _proc_status_kib("VmRSS") is None:
            self.kind = "rss-process"
            self.start_bytes = _lifetime_peak_rss()
        else:
            self.start_bytes = _proc_status_kib("VmRSS") * 1024
            if not _reset_rss_high_water():
                self.kind = "rss-sampled"
                self._sampled_peak = self.start_bytes
                # the thread holds only a weak reference: a request that fails never calls stop(),
                # and its sampler ends once this object is gone
                self._sampler = threading.Thread(
                    target=_sample_rss, args=(weakref.ref(self), self._stop), name="vidqa-rss", daemon=True)
                self._sampler.start()
        return self

    def stop(self) -> tuple[int, int, str]:
        """(bytes above the start, bytes in use at the peak, kind), at the end of the request."""
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
        if self.kind == "cuda":
            total = int(torch.cuda.max_memory_allocated(self.device))
        elif self.kind == "rss":
            total = (_proc_status_kib("VmHWM") or 0) * 1024
        elif self.kind == "rss-sampled":
            total = max(self._sampled_peak, (_proc_status_kib("VmRSS") or 0) * 1024)
        else:
            total = _lifetime_peak_rss()
        return max(0, total - self.start_bytes), total, self.kind


@contextmanager
def measured_request(stats: Stats, device):
    """One request's total time and peak memory, into `stats` when the block succeeds. The total
    counts video decoding already in `stats` (a clip decoded before the request) as well as the
    block's wall time (a streamed clip decodes inside it)."""
    start, decoded_before = time.perf_counter(), stats.time.video_decode_s
    memory = RequestMemory(device).start()
    yield
    stats.time.total_s = time.perf_counter() - start + decoded_before
    stats.peak_memory_bytes, stats.peak_memory_total_bytes, stats.peak_memory_kind = memory.stop()


def _sample_rss(memory_ref, stop: threading.Event) -> None:
    while not stop.wait(RequestMemory.SAMPLE_SECONDS):
        memory, rss = memory_ref(), _proc_status_kib("VmRSS")
        if memory is None:
            return
        if rss is not None:
            memory._sampled_peak = max(memory._sampled_peak, rss * 1024)
        del memory


def _proc_status_kib(field_name: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_high_water() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _lifetime_peak_rss() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
