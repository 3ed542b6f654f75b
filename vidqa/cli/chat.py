"""`vidqa chat`: one video, many questions; the video is decoded, encoded, pruned and prefilled
once (vidqa/engine/session.py), then every question starts from its cached prefix."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vidqa.cli.common import (
    DEFAULT_MODEL,
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
    PruneOpt,
    SeedOpt,
    StartOpt,
    SystemOpt,
    TemperatureOpt,
    err_console,
    fail,
    interactive,
    nothing,
    request_settings,
    stdout_writer,
)
from vidqa.errors import VidqaError

PROMPT = "> "


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def read_questions(interactive: bool):
    """Questions, one per line. At a terminal a prompt is shown and an empty line ends the chat;
    piped, blank lines are skipped and the end of input ends it."""
    while True:
        if interactive:
            err_console.print(PROMPT, end="", markup=False, highlight=False)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            return
        question = line.strip()
        if not question:
            if interactive:
                return
            continue
        yield question


def ready_line(cost, prune: str, reused: bool, why_not: str) -> str:
    """What the one-off work cost, shown before the first question."""
    tokens, time = cost.tokens, cost.time
    pruned = f" → {tokens.visual_tokens_after} ({prune})" if tokens.visual_tokens_after != tokens.visual_tokens_before else ""
    prefill = f", prefilled once in {_seconds(time.video_prefill_s)}" if reused else f"; each question is prefilled in full ({why_not})"
    return (f"video ready: {tokens.frames} frames, {tokens.visual_tokens_before} visual tokens{pruned}; "
            f"decoded {_seconds(time.video_decode_s)}, encoded {_seconds(time.vision_encoder_s)}{prefill}")


def answer_line(stats, video_prefill_s: float) -> str:
    """Per-question stats: time to first token for the question alone and with the video's prefill."""
    time, tokens = stats.time, stats.tokens
    if stats.prefix_reused:
        first = f"first token {_seconds(time.prefill_s)} (with the video's prefill {_seconds(time.prefill_s + video_prefill_s)})"
    else:
        first = f"first token {_seconds(time.prefill_s + time.video_prefill_s)} (full prefill)"
    return (f"{first} · {tokens.generated_tokens} tokens at {time.decode_tokens_per_s:.1f} tok/s · "
            f"total {_seconds(time.total_s)}")


def _show_notes(notes, shown: set) -> set:
    """Print the notes not printed before (the clip's and the preset's come with every answer)."""
    for note in notes:
        if note not in shown:
            err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    return shown | set(notes)


def _draw_kept(result, path: Path, question: str) -> str:
    """--show-kept DIR: one question's kept-token image (vidqa/render/show_kept.py) -> its path."""
    from vidqa.cli.common import file_error

    try:
        return str(result.draw_kept(path, question))
    except OSError as error:
        raise file_error(error) from None


def chat(
    video: Annotated[Path, typer.Argument(help="Video file (mp4, mkv, webm, avi...).", show_default=False)],
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
    max_pixels: MaxPixelsOpt = None,
    device_map: DeviceMapOpt = None,
    system: SystemOpt = None,
    chunk_frames: ChunkFramesOpt = None,
    max_visual_tokens: MaxVisualTokensOpt = None,
    history: Annotated[bool, typer.Option("--history", help="Keep the conversation: each question sees the earlier questions and answers.")] = False,
    reuse: Annotated[bool, typer.Option("--reuse/--no-reuse", help="Reuse the video's prefill across questions (--no-reuse: prefill every question in full, for comparison).")] = True,
    stats: Annotated[
        Optional[bool], typer.Option("--stats/--no-stats", help="A stats line per question on stderr [default: on when stderr is a terminal].", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per question on stdout (answer + stats, as `ask --json`, plus the question); no streaming.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print the answers only.")] = False,
    show_kept: Annotated[
        Optional[Path],
        typer.Option("--show-kept", metavar="DIR", help="Also draw, per question, the frames with its visual tokens' fates (kept, merged, dropped) to DIR/q001.png, q002.png... (needs matplotlib: pip install -e \".[plot]\").",
                     show_default=False),
    ] = None,
) -> None:
    """Ask one video many questions: it is decoded, encoded, pruned and prefilled once.

    Questions are typed at the prompt (an empty line or Ctrl-D ends) or piped, one per line.
    Reuse needs a preset that acts only before the LLM (or none); in-LLM presets still encode once.

    Example: vidqa chat clip.mp4 --prune evs --keep 0.3
    """
    from vidqa import api

    settings = request_settings(
        model=model, device=device, dtype=dtype, attn=attn, max_pixels=max_pixels, device_map=device_map,
        system=system, frames=frames, fps=fps, start=start, end=end, prune=prune, keep=keep, flops=flops,
        param=param, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, decode=decode,
        chunk_frames=chunk_frames, max_visual_tokens=max_visual_tokens,
    )
    try:
        api.check_options(settings, video)  # before torch loads: a typo is reported at once
        if show_kept is not None:
            from vidqa.render.show_kept import check_image_dir, check_matplotlib

            check_matplotlib()
            check_image_dir(show_kept)
        preset = api.check_settings(settings)
        from vidqa.engine.session import prefix_reusable
        from vidqa.engine.stats import Stats

        cost = Stats()
        clip = api.decode_video(video, settings, cost)
        with err_console.status("loading model…", spinner="dots") if interactive() else nothing():
            loaded = api.open_model(settings)
        for note in loaded.notes if not quiet and not as_json else []:
            err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
        session = loaded.session(clip, reuse=reuse, history=history)
        with err_console.status("encoding and prefilling the video…", spinner="dots") if interactive() else nothing():
            session.prepare(cost)
        if not quiet and not as_json:
            why_not = "--no-reuse" if not reuse else (
                "the preset acts inside the LLM" if not prefix_reusable(session.video.pruner)
                else "this model's cache cannot be cropped")
            err_console.print(ready_line(cost, preset.name, session.reuse, why_not), soft_wrap=True)
        shown = set()
        if not quiet and not as_json:
            shown = _show_notes(list(clip.notes) + session.video.prefix.state.notes, shown)
        show_stats = not quiet and not as_json and (stats if stats is not None else sys.stderr.isatty())
        for number, question in enumerate(read_questions(sys.stdin.isatty()), start=1):
            result = session.ask(question, on_text=None if as_json else stdout_writer())
            image = None
            if show_kept is not None:
                image = _draw_kept(result, show_kept / f"q{number:03d}.png", question)
            if as_json:
                record = result.record()
                if show_kept is not None:
                    record["kept_image"] = image
                sys.stdout.write(json.dumps({"question": question, **record}) + "\n")
            else:
                sys.stdout.write("\n")
            sys.stdout.flush()
            if not quiet and not as_json:
                shown = _show_notes(result.notes, shown)
            if show_stats:
                err_console.print(answer_line(result.stats, session.video.prefix.prefill_s), style="dim",
                                  soft_wrap=True)
    except VidqaError as error:
        fail(error)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        err_console.print("interrupted")
        raise typer.Exit(130)
