"""`vidqa serve` (the model behind an OpenAI-compatible HTTP API, vidqa/serve/) and `vidqa ask
--server` (the same question sent to such a server, printed exactly as a local `vidqa ask`).

Nothing heavy at import: `vidqa ask --server` imports neither torch nor FastAPI; `vidqa serve`
loads them when it runs.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer

from vidqa.cli.common import (
    DEFAULT_MODEL,
    Attention,
    AttnOpt,
    Device,
    DeviceMapOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    MaxPixelsOpt,
    ModelOpt,
    SystemOpt,
    err_console,
    fail,
    file_error,
    interactive,
    nothing,
    read_question,
    stdout_writer,
    write_answer,
)
from vidqa.errors import BadInput, RuntimeFailure, VidqaError
from vidqa.serve.config import API_KEY_ENV, MIB

# Settings.load_options() keys -> the `vidqa ask` flag that sets them: fixed by the server
LOAD_FLAGS = {"device": "--device", "dtype": "--dtype", "attn": "--attn", "max_pixels": "--max-pixels",
              "device_map": "--device-map", "system_prompt": "--system"}


def serve(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Beyond localhost an API key is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port, printed at start).")] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", envvar=API_KEY_ENV, help="Require 'Authorization: Bearer KEY' on /v1 routes. Required to listen beyond localhost.", show_default=False)
    ] = None,
    allow_dir: Annotated[
        Optional[list[Path]], typer.Option("--allow-dir", help="A directory whose videos (and its subdirectories') clients may name by path or file:// URL (repeatable). Default: the current directory.", show_default=False)
    ] = None,
    allow_urls: Annotated[bool, typer.Option("--allow-urls", help="Also fetch http(s) video URLs (the server then reaches whatever URL a client names).")] = False,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body, MiB (base64 uploads included).")] = 64,
    max_video_mb: Annotated[float, typer.Option("--max-video-mb", help="Largest uploaded (data:) or fetched video, MiB.")] = 256,
    max_video_seconds: Annotated[float, typer.Option("--max-video-seconds", help="Longest uploaded or fetched video, seconds.")] = 3600,
    queue_limit: Annotated[int, typer.Option("--queue-limit", help="Requests that may wait behind the running one; more get HTTP 429.")] = 16,
    cache_mb: Annotated[float, typer.Option("--cache-mb", help="Memory for prepared videos (frames, encoder output, video KV prefix), MiB; least recently used evicted first.")] = 2048,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (uvicorn's access log) on stderr.")] = False,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attention.sdpa,
    max_pixels: MaxPixelsOpt = None,
    device_map: DeviceMapOpt = None,
    system: SystemOpt = None,
) -> None:
    """Serve a model over an OpenAI-compatible API: load once, answer many (docs/serve.md).

    POST /v1/chat/completions takes the video as a video_url content part and vidqa's options
    (prune, keep, flops, frames, fps, params) in an extra "vidqa" field; GET /v1/models; GET /health.
    One request runs at a time; a video's prefix is reused across requests (LRU, --cache-mb).

    Example: vidqa serve --model micro --port 8000
    """
    from vidqa import api
    from vidqa.serve.config import ServeConfig, allowed_dirs, check_listen

    settings = api.Settings(model=model, device=device.value, dtype=dtype.value, attn=attn.value,
                            max_pixels=max_pixels, device_map=device_map.value if device_map else None, system=system)
    try:
        check_listen(host, api_key)
        for flag, value in (("--max-body-mb", max_body_mb), ("--max-video-mb", max_video_mb),
                            ("--max-video-seconds", max_video_seconds), ("--cache-mb", cache_mb)):
            if not value > 0:
                raise BadInput(f"{flag} must be more than 0, got {value:g}")
        if queue_limit < 1:
            raise BadInput(f"--queue-limit must be at least 1, got {queue_limit}")
        config = ServeConfig(model_name=model, api_key=api_key, allow_dirs=allowed_dirs(allow_dir),
                             allow_urls=allow_urls, max_body_bytes=int(max_body_mb * MIB),
                             max_video_bytes=int(max_video_mb * MIB), max_video_seconds=max_video_seconds,
                             queue_limit=queue_limit, cache_bytes=int(cache_mb * MIB))
        check_serve_extra()
        sock = listen(host, port)  # before the model loads: a busy port is reported at once
        with err_console.status("loading model…", spinner="dots") if interactive() else nothing():
            loaded = api.open_model(settings)
        from vidqa.serve.app import create_app, serve_forever

        app = create_app(loaded, config)
        for note in loaded.notes:
            err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
        bound = sock.getsockname()
        where = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        err_console.print(f"serving {model} on http://{where}:{bound[1]} (OpenAI API under /v1, GET /health); "
                          f"local videos under {', '.join(map(str, config.allow_dirs))}"
                          f"{'; API key required' if api_key else ''}; Ctrl-C stops", soft_wrap=True, markup=False)
        serve_forever(app, sock, access_log=access_log)
    except VidqaError as error:
        fail(error)
    except KeyboardInterrupt:
        raise typer.Exit(130)


def check_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise BadInput("vidqa serve needs FastAPI and uvicorn, which are not installed: "
                       'pip install "vidqa[serve]"') from None


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (uvicorn serves on it)."""
    if not 0 <= port <= 65535:
        raise BadInput(f"--port must be 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog from here, while the model loads and uvicorn starts
    except socket.gaierror as error:
        raise BadInput(f"--host {host}: {error.strerror or error}") from None
    except OSError as error:
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


# --- vidqa ask --server ----------------------------------------------------------------------


def ask_remote(server: str, video: Path, question: str | None, settings, *, stream: bool, stats: bool | None,
               as_json: bool, quiet: bool, show_kept: Path | None) -> None:
    """`vidqa ask --server URL`: the request goes to a running `vidqa serve`; stdout and stderr
    are what a local `vidqa ask` prints (answer, notes, stats table, or the --json record)."""
    from vidqa import api
    from vidqa.serve import client

    try:
        text = read_question(question)
        if not text:
            raise BadInput("the question is empty; pass it as an argument or pipe it on stdin")
        if show_kept is not None:
            raise BadInput("--show-kept draws the frames here, with the model: it cannot be used with --server")
        defaults = api.Settings().load_options()
        for key, value in settings.load_options().items():
            if value != defaults[key]:
                raise BadInput(f"{LOAD_FLAGS[key]} is fixed when the server starts (vidqa serve {LOAD_FLAGS[key]}); "
                               "leave it out with --server")
        streaming = stream and not as_json
        model = None if settings.model == DEFAULT_MODEL else settings.model  # the default: whatever is served
        body = client.request_body(video, text, settings, stream=streaming, model=model)
        record = client.ask(server, body, on_text=stdout_writer() if streaming else None)
    except VidqaError as error:
        fail(error)
        return
    except OSError as error:
        fail(file_error(error))
        return
    except KeyboardInterrupt:
        raise typer.Exit(130)

    write_answer(record["answer"], record if as_json else None, streaming)
    if as_json or quiet:
        return
    for note in record["notes"]:
        err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    if stats if stats is not None else sys.stderr.isatty():
        from vidqa.render.report import print_stats

        print_stats(stats_view(record["stats"]), record["preset"], err_console)


def stats_view(stats: dict) -> SimpleNamespace:
    """A `--json` record's stats with attribute access, as the stats table reads an engine Stats."""
    view = SimpleNamespace(**stats)
    for part in ("tokens", "time", "flops"):
        setattr(view, part, SimpleNamespace(**stats[part]))
    return view
