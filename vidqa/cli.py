"""The `vidqa` command line. Thin: parse, call the engine, render. No model logic here."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import BadInput, VidqaError

EXIT_CODES = "Exit codes: 0 ok · 1 runtime failure (model load, out of memory) · 2 bad input · 130 interrupted."

app = typer.Typer(
    name="vidqa",
    help="Ask a local video LLM about your videos, fast: training-free visual-token pruning with honest stats.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, highlight=False)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Attention(str, Enum):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from . import __version__

        typer.echo(f"vidqa {__version__}")
        raise typer.Exit(0)


def fail(error: VidqaError) -> None:
    err_console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
    raise typer.Exit(error.exit_code)


def read_question(argument: str | None) -> str:
    """The argument, with piped stdin joined before it (as `llm` does)."""
    piped = ""
    if not sys.stdin.isatty():
        try:
            piped = sys.stdin.read()
        except (OSError, ValueError):
            piped = ""
    parts = [part.strip() for part in (piped, argument or "") if part and part.strip()]
    return "\n".join(parts)


# Options shared by `ask` and `batch` ------------------------------------------------------
from .models import DEFAULT_MODEL  # noqa: E402  (after the app, kept near the options that use it)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id or local checkpoint directory.")]
FramesOpt = Annotated[int, typer.Option("--frames", "-f", help="Frames sampled uniformly (LLaVA-OneVision was evaluated with 32).")]
FpsOpt = Annotated[Optional[float], typer.Option("--fps", help="Sample at this rate instead of --frames.")]
StartOpt = Annotated[Optional[float], typer.Option("--start", help="Start of the window, seconds.")]
EndOpt = Annotated[Optional[float], typer.Option("--end", help="End of the window, seconds.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto = cuda when available.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="auto = bf16 on GPUs that support it (else fp16), fp32 on CPU.")]
AttnOpt = Annotated[Attention, typer.Option("--attn", help="Attention kernel; pruning never needs eager.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy (default).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling (with --temperature > 0).")]


def _check_generation(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise BadInput(f"--temperature must be 0 (greedy) or more, got {temperature}")


@app.command(epilog=EXIT_CODES)
def ask(
    video: Annotated[Path, typer.Argument(help="Video file (mp4, mkv, webm, avi...).", show_default=False)],
    question: Annotated[Optional[str], typer.Argument(help="The question; piped stdin is joined before it.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    frames: FramesOpt = 32,
    fps: FpsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attention.sdpa,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the answer token by token.")] = True,
    stats: Annotated[
        Optional[bool], typer.Option("--stats/--no-stats", help="Stats table on stderr [default: on when stderr is a terminal].", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (answer + stats) on stdout; no streaming.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print the answer only.")] = False,
) -> None:
    """Answer a question about a video: sample frames, (prune), stream the answer, show stats.

    Example: vidqa ask clip.mp4 "What happens in this video?"
    """
    from . import engine
    from .models import load_model

    try:
        text = read_question(question)
        if not text:
            raise BadInput("the question is empty; pass it as an argument or pipe it on stdin")
        _check_generation(max_new_tokens, temperature)
        frame_options = engine.FrameOptions(frames=frames, fps=fps, start=start, end=end)
        from .stats import Stats, timed

        run_stats = Stats()
        with timed(run_stats.time, "video_decode_s"):
            clip = engine.decode_video(str(video), frame_options)
        with err_console.status("loading model…", spinner="dots") if _interactive() else _nothing():
            adapter = load_model(model, device=device.value, dtype=dtype.value, attn=attn.value)
        streaming = stream and not as_json
        on_text = _stdout_writer() if streaming else None
        result = engine.answer(
            adapter,
            clip,
            text,
            engine.GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
            on_text=on_text,
            stats=run_stats,
        )
    except VidqaError as error:
        fail(error)
        return
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130)

    parameters = {
        "frames": frames, "fps": fps, "start": start, "end": end, "device": str(adapter.model.device),
        "dtype": str(adapter.model.dtype).removeprefix("torch."), "attn": attn.value,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
    }
    if as_json:
        from .report import ask_record

        record = ask_record(result, model=model, preset="none", parameters=parameters)
        sys.stdout.write(json.dumps(record) + "\n")
        return
    if streaming:
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result.text + "\n")
    sys.stdout.flush()
    if quiet:
        return
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    if stats if stats is not None else sys.stderr.isatty():
        from .report import print_stats

        print_stats(result.stats, "none", err_console)


def _interactive() -> bool:
    return sys.stderr.isatty()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _stdout_writer():
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return write


def main() -> None:
    """Console entry point: one line per error, never a traceback (VIDQA_DEBUG=1 shows it)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except Exception as error:  # a bug: still one line, with a way to see more
        if os.environ.get("VIDQA_DEBUG"):
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(error).__name__}: {error} (set VIDQA_DEBUG=1 for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
