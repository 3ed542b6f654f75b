"""What the `vidqa` commands share: the stderr console, one-line errors, option types, small checks.

The command modules import this one (cli.py: the app, `ask`, `presets`, `models`; cli_batch.py:
`batch`, `summarize`); it imports neither, so the command-line layer has no cycles. Nothing here
imports torch or transformers: `vidqa --help` stays fast.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from vidqa.errors import BadInput, RuntimeFailure, VidqaError
from vidqa.hub import DEFAULT_MODEL  # noqa: F401  (re-exported: every command's --model default)

EXIT_CODES = "Exit codes: 0 ok · 1 runtime failure (model load, hub unreachable, out of memory, disk full) · 2 bad input · 130 interrupted."

err_console = Console(stderr=True, highlight=False)


def click_module():
    """The Click that Typer runs on: recent Typer vendors it as typer._click, older ones import click."""
    import typer.core

    return getattr(typer.core, "_click", None) or typer.core.click


def fail(error: VidqaError) -> None:
    """Print the error as one line on stderr and exit with its code."""
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
    raise typer.Exit(error.exit_code)


# --- files -----------------------------------------------------------------------------------

NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def stream_name(stream) -> str:
    """A readable name for a standard stream: the file it is redirected to, where the OS says."""
    try:
        target = os.readlink(f"/proc/self/fd/{stream.fileno()}")
    except (OSError, ValueError, AttributeError):
        target = ""
    return target if target.startswith("/") else getattr(stream, "name", "the output")


def file_error(error: OSError, resumable: bool = False) -> VidqaError:
    """A file that cannot be read or written, as one line: the user's to fix (exit 2), or a full
    disk / failing device (exit 1)."""
    name = error.filename or "the output"
    if error.errno in NO_SPACE:
        rerun = "rerun to resume" if resumable else "rerun"
        return RuntimeFailure(f"no space left on the device writing {name}; free space, then {rerun}")
    what = f"{name}: {error.strerror or error}" if error.filename else str(error)
    if isinstance(error, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return BadInput(f"cannot use {what}")
    return RuntimeFailure(f"file error: {what}")


# --- the question ----------------------------------------------------------------------------


def read_question(argument: str | None) -> str:
    """The question: the argument; without one, or with `-`, what is piped on stdin.

    stdin is read only then, so `while read f; do vidqa ask "$f" "what happens?"; done < list.txt`
    leaves the rest of the list to the loop, as shell users expect."""
    if argument is not None and argument.strip() != "-":
        return argument.strip()
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    try:
        return sys.stdin.read().strip()
    except (OSError, ValueError):
        return ""


# --- terminal helpers ------------------------------------------------------------------------


def interactive() -> bool:
    return sys.stderr.isatty()


class nothing:
    """A context manager that does nothing (instead of a spinner when stderr is not a terminal)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- options shared by `ask` and `batch` -----------------------------------------------------


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DeviceMap(str, Enum):
    auto = "auto"
    none = "none"


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Attention(str, Enum):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class Decode(str, Enum):  # vidqa.engine.generation.DECODE_PATHS
    auto = "auto"
    eager = "eager"
    static = "static"
    graphs = "graphs"


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local checkpoint directory, or 'micro' (the bundled demo model: offline, answers questions about samples/).")]
FramesOpt = Annotated[Optional[int], typer.Option("--frames", "-f", help="Frames sampled uniformly. Default: the model family's reference sampling (LLaVA-OneVision 32 uniform; Qwen2.5-VL 2 fps, 4-768 frames; SmolVLM2 1 fps, at most 64; --model micro: 8).", show_default=False)]
FpsOpt = Annotated[Optional[float], typer.Option("--fps", help="Sample at this rate instead of --frames.")]
StartOpt = Annotated[Optional[float], typer.Option("--start", help="Start of the window, seconds.")]
EndOpt = Annotated[Optional[float], typer.Option("--end", help="End of the window, seconds.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto = cuda when available.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="auto = bf16 on GPUs that support it (else fp16), fp32 on CPU.")]
AttnOpt = Annotated[Attention, typer.Option("--attn", help="Attention kernel; pruning never needs eager.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy (default).")]
DecodeOpt = Annotated[Decode, typer.Option("--decode", help="How tokens after the first are decoded: eager = transformers' generate; static = fixed-shape steps over a pre-allocated KV cache; graphs = static steps replayed as CUDA graphs (GPU only); auto = graphs on a GPU when --max-new-tokens is 32 or more, else eager; static on CPU. Same tokens on every path (README \"Decode paths\").")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling (with --temperature > 0).")]
MaxPixelsOpt = Annotated[
    Optional[int], typer.Option("--max-pixels", help="Qwen2.5-VL and Qwen3-VL: most pixels per frame, e.g. 200704 (= 448x448); default: qwen-vl-utils' budget.", show_default=False)
]
DeviceMapOpt = Annotated[
    Optional[DeviceMap], typer.Option("--device-map", help="auto = shard the model over the visible GPUs (CPU, then disk, as a last resort; needs accelerate); none = one device. Default: one device when the weights fit it, else auto.", show_default=False)
]
SystemOpt = Annotated[
    Optional[str], typer.Option("--system", help="System prompt; \"\" for none. Default: the family's (LLaVA-OneVision: the one it was trained with; Qwen2.5-VL: its chat template's).", show_default=False)
]
PruneOpt = Annotated[str, typer.Option("--prune", "-p", help="Pruning preset name (see `vidqa presets`) or a preset .yaml file.")]
KeepOpt = Annotated[Optional[str], typer.Option("--keep", callback=lambda text: keep_text(text), help="Layer-averaged fraction of visual tokens the LLM processes, in (0, 1]; 'auto' = the most that fits the model's context (with --prune none: evs), and the positions rule that fits, both reported; default: the preset's paper setting.", show_default=False)]
ChunkFramesOpt = Annotated[Optional[int], typer.Option("--chunk-frames", help="Decode, encode and prune the video this many frames at a time (bounded memory; Qwen-VL rounds up to an even count). Default: chunks sized from the free memory for clips of more than 128 frames, else one piece (README \"Long videos\").", show_default=False)]
MaxVisualTokensOpt = Annotated[Optional[int], typer.Option("--max-visual-tokens", help="At most this many visual tokens for the LLM: the retention (and positions) are chosen to fit, as with --keep auto.", show_default=False)]
FlopsOpt = Annotated[Optional[float], typer.Option("--flops", help="Ask for this fraction of the vanilla visual-prefill FLOPs instead of --keep.")]
ShowKeptOpt = Annotated[Optional[Path], typer.Option("--show-kept", metavar="PNG", help="Also draw the sampled frames with each visual token's cell shaded: kept, merged, dropped before or inside the LLM (needs matplotlib: pip install -e \".[plot]\").", show_default=False)]
ParamOpt = Annotated[Optional[list[str]], typer.Option("--param", "-P", help="Override a preset parameter: -P ratio=0.3 or -P select.layer=4 (repeatable).")]


def named(error: OSError, stream) -> OSError:
    """The error with the file behind `stream` as its filename (writes to stdout carry none)."""
    if error.filename is None:
        error.filename = stream_name(stream)
    return error


def stdout_writer():
    def write(text: str) -> None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as error:
            raise named(error, sys.stdout) from None

    return write


def keep_text(text: str | None) -> str | None:
    """--keep's parse check (typer's callback), as typer checks a number: the text is kept as
    given; its range is checked later, with the other budgets, in `api.check_options`."""
    keep_value(text)
    return text


def keep_value(text: str | None) -> float | str | None:
    """--keep as a value: None, a number, or "auto"; anything else is a usage error."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a number or 'auto'.") from None


def request_settings(*, model, device, dtype, attn, max_pixels, device_map, system, frames, fps, start, end, prune,
                     keep, flops, param, max_new_tokens, temperature, seed, decode, chunk_frames=None,
                     max_visual_tokens=None):
    """The shared options of `ask` and `chat` as `vidqa.api.Settings` (the enums' values, -P as a tuple)."""
    from vidqa import api

    return api.Settings(
        model=model, device=device.value, dtype=dtype.value, attn=attn.value, max_pixels=max_pixels,
        device_map=device_map.value if device_map else None, system=system, frames=frames, fps=fps, start=start,
        end=end, prune=prune, keep=keep_value(keep), flops=flops, params=tuple(param or ()),
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, decode=decode.value,
        chunk_frames=chunk_frames, max_visual_tokens=max_visual_tokens,
    )


class ProgressBar:
    """A long video's progress on stderr (rich): frames encoded, visual tokens kept so far. Drawn
    only on a terminal and never with -q/--json (`wanted`); the engine calls it after each chunk
    (vidqa.engine.streaming.Progress), and it is closed by leaving the `with`."""

    def __init__(self, wanted: bool):
        self.wanted, self.bar, self.task, self.done = wanted and interactive(), None, None, False

    def __enter__(self):
        return self

    def __call__(self, progress) -> None:
        if not self.wanted or self.done:
            return
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("frames"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[kept]}"),
                                TimeElapsedColumn(), console=err_console, transient=True, redirect_stdout=False,
                                redirect_stderr=False)
            self.bar.start()
            self.task = self.bar.add_task("frames", total=progress.frames_total, kept="")
        self.bar.update(self.task, completed=progress.frames_done, kept=f"{progress.tokens_kept} tokens kept")
        if progress.frames_done >= progress.frames_total:  # gone before the answer streams
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.bar, self.done = None, True

    def __exit__(self, *exc):
        self.close()
        return False


def write_answer(text: str, record: dict | None, streaming: bool) -> None:
    """The answer on stdout: the --json record, or the text (after streaming, just its newline).
    Flushed here, not at exit, so a full disk is reported, not ignored."""
    try:
        if record is not None:
            sys.stdout.write(json.dumps(record) + "\n")
        else:
            sys.stdout.write("\n" if streaming else text + "\n")
        sys.stdout.flush()
    except OSError as error:
        fail(file_error(named(error, sys.stdout)))
