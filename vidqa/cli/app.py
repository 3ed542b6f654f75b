"""The `vidqa` command line. Thin: parse, call the engine, render. No model logic here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from vidqa.cli import batch as cli_batch
from vidqa.cli import chat as cli_chat
from vidqa.cli import serve as cli_serve
from vidqa.cli.common import (
    DEFAULT_MODEL,
    EXIT_CODES,
    Attention,
    AttnOpt,
    ChunkFramesOpt,
    Decode,
    DecodeOpt,
    Device,
    DeviceMapOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    EndOpt,
    FlopsOpt,
    FpsOpt,
    FramesOpt,
    KeepOpt,
    MaxNewOpt,
    MaxPixelsOpt,
    MaxVisualTokensOpt,
    ModelOpt,
    ParamOpt,
    ProgressBar,
    PruneOpt,
    SeedOpt,
    ShowKeptOpt,
    StartOpt,
    SystemOpt,
    TemperatureOpt,
    click_module,
    err_console,
    fail,
    file_error,
    interactive,
    nothing,
    read_question,
    request_settings,
    stdout_writer,
    write_answer,
)
from vidqa.errors import BadInput, VidqaError


class VidqaGroup(typer.core.TyperGroup):
    """The root command: Click's own usage errors (a bad option value, a missing argument) become
    one `error:` line and exit 2, like every other vidqa error, instead of a boxed usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        click = click_module()
        no_args_is_help = getattr(click.exceptions, "NoArgsIsHelpError", ())  # Click >= 8.2
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except no_args_is_help as error:  # bare `vidqa`: the help, as Click does
            typer.echo(error.ctx.get_help())
            sys.exit(0)
        except click.exceptions.UsageError as error:
            where = error.ctx.command_path if error.ctx is not None else "vidqa"
            message = " ".join(error.format_message().split()).rstrip(".")
            value = _raw_value(error, sys.argv[1:] if args is None else list(args))
            if value is not None and value not in message:
                message += f" (got '{value}')"
            err_console.print(f"[bold red]error:[/] {escape(message)}; see '{escape(where)} --help'", soft_wrap=True)
            sys.exit(2)
        except typer.Abort:  # end of input at a prompt (Click's own Ctrl-D / Ctrl-C path)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


def _raw_value(error, args: list[str]) -> str | None:
    """The value given on the command line for the option a BadParameter is about, if any."""
    opts = getattr(getattr(error, "param", None), "opts", None) or []
    for index, arg in enumerate(args):
        for opt in opts:
            if arg == opt and index + 1 < len(args):
                return args[index + 1]
            if opt.startswith("--") and arg.startswith(opt + "="):
                return arg[len(opt) + 1:]
    return None


app = typer.Typer(
    name="vidqa",
    cls=VidqaGroup,
    help="Ask a local video LLM about your videos, fast: training-free visual-token pruning with honest stats.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain Click help: no "<bool>" column on flags, ids never cut mid-word
)


def _print_version(value: bool) -> None:
    if value:
        from vidqa import __version__

        typer.echo(f"vidqa {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = None,
) -> None:
    """Ask a local video LLM about your videos, fast: training-free visual-token pruning with honest stats."""


@app.command(epilog=EXIT_CODES)
def ask(
    video: Annotated[Path, typer.Argument(help="Video file (mp4, mkv, webm, avi...).", show_default=False)],
    question: Annotated[Optional[str], typer.Argument(help="The question; without it (or with -) it is read from stdin.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attention.sdpa,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    decode: DecodeOpt = Decode.auto,
    prune: PruneOpt = "none",
    keep: KeepOpt = None,
    flops: FlopsOpt = None,
    param: ParamOpt = None,
    chunk_frames: ChunkFramesOpt = None,
    max_visual_tokens: MaxVisualTokensOpt = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the answer token by token.")] = True,
    stats: Annotated[
        Optional[bool], typer.Option("--stats/--no-stats", help="Stats table on stderr [default: on when stderr is a terminal].", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (answer + stats) on stdout; no streaming.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print the answer only.")] = False,
    max_pixels: MaxPixelsOpt = None,
    device_map: DeviceMapOpt = None,
    system: SystemOpt = None,
    show_kept: ShowKeptOpt = None,
    server: Annotated[
        Optional[str], typer.Option("--server", envvar="VIDQA_SERVER", help="Ask a running `vidqa serve` at this URL (e.g. http://127.0.0.1:8000) instead of loading the model here; prints the same.", show_default=False)
    ] = None,
) -> None:
    """Answer a question about a video: sample frames, (prune), stream the answer, show stats.

    The question is the argument; without one (or with -), it is read from stdin.

    Example: vidqa ask clip.mp4 "What happens in this video?"
    """
    from vidqa import api

    settings = request_settings(
        model=model, device=device, dtype=dtype, attn=attn, max_pixels=max_pixels, device_map=device_map,
        system=system, frames=frames, fps=fps, start=start, end=end, prune=prune, keep=keep, flops=flops,
        param=param, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, decode=decode,
        chunk_frames=chunk_frames, max_visual_tokens=max_visual_tokens,
    )
    if server:  # vidqa/cli/serve.py: no torch here, the server has the model
        cli_serve.ask_remote(server, video, question, settings, stream=stream, stats=stats, as_json=as_json,
                             quiet=quiet, show_kept=show_kept)
        return
    try:
        text = read_question(question)
        if not text:
            raise BadInput("the question is empty; pass it as an argument or pipe it on stdin")
        api.check_options(settings, video)  # before torch loads: a typo is reported at once
        if show_kept is not None:
            from vidqa.render.show_kept import check_image_path, check_matplotlib

            check_matplotlib()
            check_image_path(show_kept)
        api.check_settings(settings)
        from vidqa.engine.stats import Stats

        run_stats = Stats()
        clip = api.decode_video(video, settings, run_stats)
        with err_console.status("loading model…", spinner="dots") if interactive() else nothing():
            loaded = api.open_model(settings)
        if not quiet and not as_json:
            for note in loaded.notes:
                err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
        streaming = stream and not as_json
        with ProgressBar(wanted=not quiet and not as_json) as progress:
            result = loaded.ask(clip, text, on_text=stdout_writer() if streaming else None, stats=run_stats,
                                progress=progress)
    except VidqaError as error:
        fail(error)
        return
    except OSError as error:
        fail(file_error(error))
        return
    except KeyboardInterrupt:
        raise typer.Exit(130)

    write_answer(result.text, result.record(loaded.notes) if as_json else None, streaming)
    if show_kept is not None:
        draw_kept(result, show_kept, text)
    if as_json or quiet:
        return
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    if stats if stats is not None else sys.stderr.isatty():
        from vidqa.render.report import print_stats

        print_stats(result.stats, result.preset.name, err_console)


def draw_kept(result, path: Path, question: str) -> None:
    """`--show-kept`: the request's token fates drawn over its frames (vidqa/render/show_kept.py)."""
    try:
        result.draw_kept(path, question)
    except VidqaError as error:
        fail(error)
    except OSError as error:
        fail(file_error(error))


def main() -> None:
    """Run the app: one line per error, never a traceback (VIDQA_DEBUG=1 shows it). The console
    entry point is vidqa.entry.main, which also turns Ctrl-C during these imports into exit 130."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except Exception as error:  # a bug: still one line, with a way to see more
        if os.environ.get("VIDQA_DEBUG"):
            raise
        err_console.print(
            f"[bold red]internal error:[/] {escape(type(error).__name__)}: {escape(str(error))} "
            "(set VIDQA_DEBUG=1 for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)


# `vidqa presets` ---------------------------------------------------------------------------
presets_app = typer.Typer(help="List pruning presets, or show one's resolved parameters.", invoke_without_command=True,
                          rich_markup_mode=None)
app.add_typer(presets_app, name="presets")


@presets_app.callback()
def presets_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the presets (name, where they act, default keep, description), then the frame selectors."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from vidqa.pruning.core.presets import available_presets, default_retention, frame_selectors, load_preset

    rows = []
    try:
        for name in available_presets():
            preset = load_preset(name)
            rows.append({
                "name": preset.name, "where": preset.where, "default_keep": default_retention(preset),
                "description": preset.description, "reference": preset.reference, "selector": False,
            })
        for name in frame_selectors():  # composed in front of a preset: --prune NAME+PRESET
            preset = load_preset(name)
            rows.append({"name": preset.name, "where": preset.where, "default_keep": None,
                         "description": preset.description, "reference": preset.reference, "selector": True})
    except VidqaError as error:
        fail(error)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="pruning presets (--prune NAME)", title_justify="left")
    for column in ("name", "acts", "default keep", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if row["selector"]:
            continue
        keep = "1.00" if row["name"] == "none" else (f"{row['default_keep']:.2f}" if row["default_keep"] is not None else "clip-dependent")
        table.add_row(row["name"], row["where"], keep, row["description"])
    Console().print(table)
    Console().print("default keep: layer-averaged retention with the paper's settings on LLaVA-OneVision-7B, 32 frames (≈ for data-dependent methods).")
    selectors = Table(title="frame selectors (--prune NAME, or NAME+PRESET in front of a preset)", title_justify="left")
    for column in ("name", "acts", "description"):
        selectors.add_column(column, overflow="fold")
    for row in rows:
        if row["selector"]:
            selectors.add_row(row["name"], row["where"], row["description"])
    Console().print(selectors)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name or .yaml path.")],
    param: ParamOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a preset's resolved parameters (after any -P overrides) and how --keep maps onto it."""
    from vidqa.pruning.core.presets import load_preset

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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a list.")] = False,
) -> None:
    """List the supported model families (model_type, class, example checkpoints) and the bundled models."""
    from vidqa.hub import bundled_models
    from vidqa.models import ADAPTERS

    shipped = bundled_models()
    rows = [
        {"family": a.family, "model_types": list(a.model_types), "class": a.model_class,
         "checkpoints": list(a.checkpoints), "max_pixels": a.supports_max_pixels,
         "bundled": [name for name, b in shipped.items() if b.family == a.family]}
        for a in ADAPTERS
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    # A plain list, one checkpoint id per line: ids are never cut mid-word on a narrow terminal.
    typer.echo("Supported families (--model HUB_ID, or a local checkpoint directory of these classes):")
    for row in rows:
        typer.echo(f"\n{row['family']}  (model_type {', '.join(row['model_types'])}; {row['class']})")
        for checkpoint in row["checkpoints"]:
            default = "  (default)" if checkpoint == DEFAULT_MODEL else ""
            typer.echo(f"  {checkpoint}{default}")
    typer.echo("\nBundled (no download, works offline):")
    for name, item in shipped.items():
        typer.echo(f"  --model {name}  {item.description} ({item.family}, {item.frames} frames)")


# `vidqa batch`, `vidqa summarize` (vidqa/cli/batch.py) ---------------------------------------
app.command(epilog=cli_batch.BATCH_EXIT_CODES)(cli_batch.batch)
app.command(epilog=cli_batch.SUMMARIZE_EXIT_CODES)(cli_batch.summarize)

# `vidqa chat` (vidqa/cli/chat.py) ----------------------------------------------------------
app.command(epilog=EXIT_CODES)(cli_chat.chat)

# `vidqa serve` (vidqa/cli/serve.py) --------------------------------------------------------
app.command(epilog=EXIT_CODES)(cli_serve.serve)
