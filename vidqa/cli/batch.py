"""`vidqa batch` and `vidqa summarize`: plain functions that vidqa/cli/app.py registers on the app."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from vidqa.cli.common import (
    DEFAULT_MODEL,
    Attention,
    AttnOpt,
    Decode,
    DecodeOpt,
    Device,
    DeviceMapOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    EndOpt,
    FpsOpt,
    FramesOpt,
    MaxNewOpt,
    MaxPixelsOpt,
    ModelOpt,
    ParamOpt,
    SeedOpt,
    StartOpt,
    SystemOpt,
    TemperatureOpt,
    err_console,
    fail,
    file_error,
    interactive,
    nothing,
)
from vidqa.errors import BadInput, VidqaError

BATCH_EXIT_CODES = (
    "Exit codes: 0 every record succeeded · 1 some record has an error, or a runtime failure "
    "(model load, hub unreachable, disk full) · 2 bad input (the CSV, an option) · 130 interrupted (rerun to resume)."
)
SUMMARIZE_EXIT_CODES = "Exit codes: 0 ok · 2 bad input (missing or unreadable results file, no records)."

OutputOpt = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", help="Results file: .jsonl (full records) or .csv (main stats flattened).",
                 show_default=False),
]
PruneListOpt = Annotated[str, typer.Option("--prune", "-p", help="Comma-separated presets to sweep, e.g. none,fastv,prunevid.")]
KeepListOpt = Annotated[
    Optional[str],
    typer.Option("--keep", help="Comma-separated fractions of visual tokens to keep, e.g. 0.1,0.3 "
                 "(default: each preset's own).", show_default=False),
]
PlotOpt = Annotated[
    Optional[Path],
    typer.Option("--plot", help="Also draw accuracy (or agreement with 'none') vs FLOPs % to this PNG (needs matplotlib).",
                 show_default=False),
]


def batch(
    questions: Annotated[Path, typer.Argument(help="CSV with columns video, question (optional: id, expected, options, prune, keep).",
                                              show_default=False)],
    output: OutputOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attention.sdpa,
    max_pixels: MaxPixelsOpt = None,
    device_map: DeviceMapOpt = None,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    decode: DecodeOpt = Decode.auto,
    prune: PruneListOpt = "none",
    keep: KeepListOpt = None,
    param: ParamOpt = None,
    cache_mb: Annotated[int, typer.Option("--cache-mb", help="Memory bound of the decoded-video cache (MiB of frames).")] = 2048,
    resume: Annotated[
        bool, typer.Option("--resume/--overwrite", help="Resume an existing output (skip the records it has) or start over.")
    ] = True,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="On resume, redo the records that have an error.")] = False,
    plot: PlotOpt = None,
    show_kept: Annotated[
        Optional[Path],
        typer.Option("--show-kept", metavar="DIR", help="Also draw each record's frames with its visual tokens' fates (kept, merged, dropped) to DIR/<id>__<preset>[__keep<k>].png (needs matplotlib: pip install -e \".[plot]\").",
                     show_default=False),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no summary: errors only.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="One line per record on stderr.")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", help="Run on a Ray cluster: 'local' starts one here, 'auto' or ray://HOST:10001 joins one; one model replica per GPU (needs pip install -e \".[ray]\").", show_default=False)] = None,
    cpus_per_replica: Annotated[float, typer.Option("--cpus-per-replica", help="With --ray on CPUs: CPUs per model replica.")] = 1.0,
) -> None:
    """Answer every question of a CSV, under a sweep of pruning presets; one record per
    (row, preset, keep), appended as it is done, so an interrupted run resumes where it stopped.

    Example: vidqa batch questions.csv -o results.jsonl --prune none,fastv --keep 0.1,0.3
    """
    from vidqa import api
    from vidqa.batch import runner as batching
    from vidqa.batch.store import output_format, read_records, rewrite_records
    from vidqa.batch.summary import check_matplotlib, record_key
    from vidqa.engine import request as engine
    from vidqa.video.decode import check_frame_options

    try:
        if output is None:
            raise BadInput("--output/-o is required: where to write the records, e.g. -o results.jsonl")
        output_format(output)
        api.check_generation(max_new_tokens, temperature)
        frames = api.frames_for_model(model, frames)
        # frames None and no --fps: the family's reference sampling, chosen once the inputs are checked
        check_frame_options(None if fps is not None else (frames if frames is not None else 1), fps, start, end)
        presets = batching.parse_prune_list(prune)
        keeps = batching.parse_keep_list(keep)
        overrides = batching.parse_overrides(param)
        if cache_mb < 0:
            raise BadInput(f"--cache-mb must be 0 or more, got {cache_mb}")
        if plot is not None:
            check_matplotlib()
        if show_kept is not None:
            from vidqa.render.show_kept import check_image_dir
            from vidqa.render.show_kept import check_matplotlib as check_drawing

            check_drawing()
        csv_notes: list[str] = []
        rows = batching.read_questions(questions, csv_notes)
        for note in csv_notes if not quiet else []:
            err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        batching.check_presets(rows, presets, overrides, questions)
        if output.exists() and output.resolve() == questions.resolve():
            raise BadInput(f"--output {output} is the questions file; write the results to another file")
        if output.is_dir():
            raise BadInput(f"--output {output} is a directory; give a .jsonl or .csv file name")
        if show_kept is not None:
            check_image_dir(show_kept)  # created once the other inputs are known to be good
        from vidqa.models import frame_rule_for

        rule = frame_rule_for(model) if frames is None and fps is None else None
        settings = batching.Settings(
            model=model,
            frame_options=engine.FrameOptions(frames=frames, fps=fps, start=start, end=end, sampling=rule),
            generation=engine.GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                                decode=decode.value),
            overrides=overrides,
            attn=attn.value,
            show_kept=show_kept,
        )
        tasks = batching.plan(rows, presets, keeps)

        existing: list[dict] = []
        if resume and output.exists():
            found = read_records(output, repair=True)
            for reason in found.dropped:
                err_console.print(f"[yellow]note:[/] {output}: dropped a damaged record ({reason}, from an "
                                  f"interrupted write); it will be redone", soft_wrap=True)
            existing = found.records
            batching.check_same_settings(existing, settings, output)
            if found.upgraded:  # schema-1 records: rewrite them in today's layout before appending
                rewrite_records(output, existing)
            if retry_errors and any(r.get("error") for r in existing):
                existing = [r for r in existing if not r.get("error")]
                rewrite_records(output, existing)
        existing = _first_per_key(existing, record_key)
        done = {record_key(r) for r in existing}
        todo = [task for task in tasks if task.key not in done]
        if existing and not quiet:
            err_console.print(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} records already in {output}",
                              soft_wrap=True)

        new: list[dict] = []
        if todo:
            new = _run(todo, len(tasks), settings, output, device, dtype, attn, cache_mb, overwrite=not resume,
                       quiet=quiet, verbose=verbose, max_pixels=max_pixels,
                       device_map=device_map, system=system, ray=ray, cpus_per_replica=cpus_per_replica)
    except VidqaError as error:
        fail(error)
        return
    except OSError as error:
        fail(file_error(error, resumable=True))
        return
    except KeyboardInterrupt:
        err_console.print(f"interrupted; the records done are in {output}: run the same command again to resume",
                          soft_wrap=True)
        raise typer.Exit(130)

    records = existing + new
    wanted = {task.key for task in tasks}
    mine = [r for r in records if record_key(r) in wanted]
    failed = [r for r in mine if r.get("error")]
    try:
        _report(records, plot, quiet, title=f"vidqa batch · {output}")
    except VidqaError as error:
        plot_error = error
    except OSError as error:
        plot_error = file_error(error)
    else:
        plot_error = None
    if failed:
        err_console.print(f"[bold red]{len(failed)} of {len(mine)} records failed[/] (see their error field in "
                          f"{output}; --retry-errors redoes them)", soft_wrap=True)
    if plot_error is not None:
        fail(plot_error)
    if failed:
        raise typer.Exit(1)


def _first_per_key(records: list[dict], record_key) -> list[dict]:
    seen, unique = set(), []
    for record in records:
        key = record_key(record)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def _run(todo, total, settings, output, device, dtype, attn, cache_mb, *, overwrite, quiet, verbose, max_pixels=None,
         device_map=None, system=None, ray=None, cpus_per_replica=1.0) -> list[dict]:
    from vidqa import api
    from vidqa.batch import runner as batching
    from vidqa.batch.store import RecordWriter

    if ray is not None:  # replicas on a Ray cluster; this process writes every record
        from vidqa.batch.ray_runner import run_batch_ray

        if cpus_per_replica <= 0:
            raise BadInput(f"--cpus-per-replica must be more than 0, got {cpus_per_replica}")
        gpus = 1.0 if device.value == "cuda" or (device.value == "auto" and _cluster_has_gpus(ray)) else 0.0
        load = {"device": "cuda" if gpus else "cpu", "dtype": dtype.value, "attn": attn.value, "max_pixels": max_pixels,
                "system": system}
        with RecordWriter(output, overwrite=overwrite) as writer:
            return run_batch_ray(todo, settings, writer.write, load=load, address=None if ray == "local" else ray,
                                 cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus,
                                 cache_bytes=cache_mb * 2**20)

    on_terminal = interactive()
    with err_console.status("loading model…", spinner="dots") if on_terminal and not quiet else nothing():
        model = api.open_model(api.Settings(
            model=settings.model, device=device.value, dtype=dtype.value, attn=attn.value, max_pixels=max_pixels,
            device_map=device_map.value if device_map else None, system=system))
    for note in model.notes if not quiet else []:
        err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    runner = batching.Runner(model, settings, batching.ClipCache(cache_mb * 2**20))
    already = total - len(todo)
    progress = _progress() if on_terminal and not quiet else None
    counter = {"done": already}

    def on_start(task):
        if progress is not None:
            progress.update(bar, description=Path(task.row.video).name or "-")

    def on_done(task, record):
        counter["done"] += 1
        if progress is not None:
            progress.advance(bar)
        if verbose:
            keep = "" if record["keep"] is None else f" keep {record['keep']:g}"
            if record["error"]:
                outcome = f"[red]error:[/] {escape(record['error'])}"
            else:
                outcome = f"{escape(repr(record['answer']))} ({record['stats']['time']['total_s']:.2f} s)"
            (progress.console if progress is not None else err_console).print(
                f"\\[{counter['done']}/{total}] {escape(record['id'])} · {escape(record['preset'])}{keep} · {outcome}",
                soft_wrap=True, highlight=False,
            )

    with RecordWriter(output, overwrite=overwrite) as writer:
        if progress is None:
            return batching.run_batch(todo, runner, writer.write, on_start, on_done)
        with progress:
            bar = progress.add_task("", total=total, completed=already)
            return batching.run_batch(todo, runner, writer.write, on_start, on_done)


def _cluster_has_gpus(address: str) -> bool:
    from vidqa.batch.ray_runner import import_ray

    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray.cluster_resources().get("GPU", 0) > 0


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    return Progress(
        TextColumn("{task.description}", markup=False, table_column=Column(width=24, no_wrap=True, overflow="ellipsis")),
        BarColumn(), MofNCompleteColumn(), TextColumn("records"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
    )


def _report(records: list[dict], plot: Path | None, quiet: bool, title: str, console=None) -> list[dict]:
    from vidqa.batch.summary import plot_summary, summarize, summary_table

    rows = summarize(records)
    if not quiet and rows:
        console = console or err_console
        if not console.is_terminal:  # a file or a pipe: rich would assume 80 columns and squeeze it
            from rich.console import Console

            console = Console(file=console.file, width=200, highlight=False)
        console.print(summary_table(rows, title=title))
    if plot is not None:
        quantity = plot_summary(rows, plot)
        if not quiet:
            err_console.print(f"plot ({quantity} vs FLOPs %): {plot}", soft_wrap=True)
    return rows


def summarize(
    results: Annotated[Path, typer.Argument(help="Output of vidqa batch (.jsonl or .csv).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    plot: PlotOpt = None,
) -> None:
    """Reprint a batch's summary from its results file: accuracy, tokens, FLOPs and time per (preset, keep).

    Example: vidqa summarize results.jsonl --plot accuracy.png
    """
    from rich.console import Console

    from vidqa.batch.store import output_format, read_records
    from vidqa.batch.summary import record_key

    try:
        output_format(results)
        if not results.exists():
            raise BadInput(f"{results}: file not found")
        if results.is_dir():
            raise BadInput(f"{results}: is a directory; give a results file written by vidqa batch")
        found = read_records(results, repair=False)
        for reason in found.dropped:
            err_console.print(f"[yellow]note:[/] {results}: ignoring a damaged record ({reason})", soft_wrap=True)
        records = _first_per_key(found.records, record_key)
        if not records:
            raise BadInput(f"{results}: no records")
        if plot is not None:
            from vidqa.batch.summary import check_matplotlib

            check_matplotlib()
        if as_json:
            from vidqa.batch.summary import summarize as summarize_records

            rows = summarize_records(records)
            if plot is not None:
                from vidqa.batch.summary import plot_summary

                plot_summary(rows, plot)
            summary = {
                "file": str(results),
                "records": len(records),
                "errors": sum(1 for r in records if r.get("error")),
                "groups": rows,
            }
            sys.stdout.write(json.dumps(summary) + "\n")
            return
        _report(records, plot, False, title=f"vidqa summarize · {results}", console=Console(highlight=False))
    except VidqaError as error:
        fail(error)
    except OSError as error:
        fail(file_error(error))
