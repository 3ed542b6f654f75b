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
MaxPixelsOpt = Annotated[
    Optional[int], typer.Option("--max-pixels", help="Qwen2.5-VL only: most pixels per frame, e.g. 200704 (= 448x448); default: the processor's own budget.", show_default=False)
]
PruneOpt = Annotated[str, typer.Option("--prune", "-p", help="Pruning preset name (see `vidqa presets`) or a preset .yaml file.")]
KeepOpt = Annotated[Optional[float], typer.Option("--keep", help="Layer-averaged fraction of visual tokens the LLM processes, in (0, 1]; default: the preset's paper setting.")]
FlopsOpt = Annotated[Optional[float], typer.Option("--flops", help="Ask for this fraction of the vanilla visual-prefill FLOPs instead of --keep.")]
ParamOpt = Annotated[Optional[list[str]], typer.Option("--param", "-P", help="Override a preset parameter: -P ratio=0.3 or -P select.layer=4 (repeatable).")]


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
    prune: PruneOpt = "none",
    keep: KeepOpt = None,
    flops: FlopsOpt = None,
    param: ParamOpt = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the answer token by token.")] = True,
    stats: Annotated[
        Optional[bool], typer.Option("--stats/--no-stats", help="Stats table on stderr \\[default: on when stderr is a terminal].", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (answer + stats) on stdout; no streaming.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print the answer only.")] = False,
    max_pixels: MaxPixelsOpt = None,
) -> None:
    """Answer a question about a video: sample frames, (prune), stream the answer, show stats.

    Example: vidqa ask clip.mp4 "What happens in this video?"
    """
    from . import engine
    from .models import load_model
    from .pruning.presets import build_pruner, check_budget, load_preset

    try:
        text = read_question(question)
        if not text:
            raise BadInput("the question is empty; pass it as an argument or pipe it on stdin")
        _check_generation(max_new_tokens, temperature)
        preset = load_preset(prune, param or [])
        check_budget(keep, flops)  # fail before the model loads
        if not preset.stages:
            build_pruner(preset, None, keep=keep, flops=flops)
        frame_options = engine.FrameOptions(frames=frames, fps=fps, start=start, end=end)
        from .stats import Stats, timed

        run_stats = Stats()
        with timed(run_stats.time, "video_decode_s"):
            clip = engine.decode_video(str(video), frame_options)
        with err_console.status("loading model…", spinner="dots") if _interactive() else _nothing():
            adapter = load_model(model, device=device.value, dtype=dtype.value, attn=attn.value, max_pixels=max_pixels)
        pruner = build_pruner(preset, adapter, keep=keep, flops=flops)
        streaming = stream and not as_json
        on_text = _stdout_writer() if streaming else None
        result = engine.answer(
            adapter,
            clip,
            text,
            engine.GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
            pruner=pruner,
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
        "keep": keep, "flops": flops, "preset_parameters": preset.parameters(), "positions": preset.positions,
        "max_pixels": max_pixels,
    }
    if as_json:
        from .report import ask_record

        record = ask_record(result, model=model, preset=preset.name, parameters=parameters, details=result.details)
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

        print_stats(result.stats, preset.name, err_console)


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


# `vidqa presets` ---------------------------------------------------------------------------
presets_app = typer.Typer(help="List pruning presets, or show one's resolved parameters.", invoke_without_command=True)
app.add_typer(presets_app, name="presets")


@presets_app.callback()
def presets_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the presets: name, where they act, default keep, description."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from .pruning.presets import available_presets, default_retention, load_preset

    rows = []
    try:
        for name in available_presets():
            preset = load_preset(name)
            rows.append({
                "name": preset.name, "where": preset.where, "default_keep": default_retention(preset),
                "description": preset.description, "reference": preset.reference,
            })
    except VidqaError as error:
        fail(error)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="pruning presets (--prune NAME)", title_justify="left")
    for column in ("name", "acts", "default keep", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        keep = "1.00" if row["name"] == "none" else (f"{row['default_keep']:.2f}" if row["default_keep"] is not None else "clip-dependent")
        table.add_row(row["name"], row["where"], keep, row["description"])
    Console().print(table)
    Console().print("default keep: layer-averaged retention with the paper's settings on LLaVA-OneVision-7B, 32 frames (≈ for data-dependent methods).")


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name or .yaml path.")],
    param: ParamOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a preset's resolved parameters (after any -P overrides) and how --keep maps onto it."""
    from .pruning.presets import load_preset

    try:
        preset = load_preset(name, param or [])
    except VidqaError as error:
        fail(error)
        return
    record = {
        "name": preset.name, "description": preset.description, "reference": preset.reference,
        "where": preset.where, "positions": preset.positions, "source": preset.source,
        "stages": [{"name": n, "type": s.kind, "where": s.where, **preset.parameters()[n]} for n, s in preset.stages],
        "keep": preset.keep_rule,
    }
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    console = Console()
    console.print(f"[bold]{preset.name}[/] — {preset.description}")
    if preset.reference:
        console.print(f"reference: {preset.reference}")
    console.print(f"acts: {preset.where}; positions of kept tokens: {preset.positions}")
    for stage in record["stages"]:
        values = ", ".join(f"{k}={v}" for k, v in stage.items() if k not in ("name", "type", "where"))
        console.print(f"  stage [bold]{stage['name']}[/] ({stage['type']}, {stage['where']}): {values}")
    if preset.keep_rule:
        console.print(f"--keep: {preset.keep_rule}")


# `vidqa models` ----------------------------------------------------------------------------
@app.command("models")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the supported model families: family, model_type, class, example checkpoints."""
    from .models import ADAPTERS

    rows = [
        {"family": a.family, "model_types": list(a.model_types), "class": a.model_class,
         "checkpoints": list(a.checkpoints), "max_pixels": a.supports_max_pixels}
        for a in ADAPTERS
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="supported models (--model HUB_ID or a local checkpoint of these classes)", title_justify="left")
    for column in ("family", "model_type", "class", "example checkpoints"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["family"], ", ".join(row["model_types"]), row["class"], "\n".join(row["checkpoints"]))
    Console().print(table)


from . import cli_batch  # noqa: E402,F401  (registers batch/summarize)
from . import cli_chat  # noqa: E402,F401  (registers chat)
