"""`vidqa ask --server URL`: one question to a running `vidqa serve`, over its OpenAI API.

Standard library only (urllib), so asking a server imports neither torch nor FastAPI. The
answer streams (SSE) to `on_text`; the result is the server's `vidqa ask --json` record. Errors
are vidqa's: the server's 4xx line as BadInput (exit 2), its 5xx line, an unreachable server or
a connection that breaks mid-answer as RuntimeFailure (exit 1).
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from vidqa.errors import BadInput, RuntimeFailure, VidqaError
from vidqa.serve.config import API_KEY_ENV

TIMEOUT_S = 3600.0  # per socket operation: a long queue or a slow first token is not an error


class _OutputFailed(Exception):
    """on_text failed (e.g. stdout is full): its own error, not the connection's."""

    def __init__(self, error: BaseException):
        self.error = error


def base_url(server: str) -> str:
    """'localhost:8000', 'http://host:8000/', 'http://host:8000/v1' -> 'http://host:8000'."""
    url = server.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url.removesuffix("/v1")


def request_body(video: str | Path, question: str, settings, *, stream: bool, model: str | None) -> dict:
    """The chat-completions body for `vidqa ask`'s settings (an api.Settings). A local path is
    sent as an absolute file:// URL: the server resolves it on its own file system."""
    options = {"prune": settings.prune, "keep": settings.keep, "flops": settings.flops,
               "params": list(settings.params), "frames": settings.frames, "fps": settings.fps,
               "start": settings.start, "end": settings.end}
    decode = getattr(settings, "decode", None)  # the decode path, where this vidqa has one
    if decode is not None and decode != type(settings)().decode:
        options["decode"] = decode
    body = {
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": Path(os.path.abspath(video)).as_uri()}},
            {"type": "text", "text": question}]}],
        "max_tokens": settings.max_new_tokens, "temperature": settings.temperature, "stream": stream,
        "vidqa": {key: value for key, value in options.items() if value not in (None, [])},
    }
    if settings.seed is not None:
        body["seed"] = settings.seed
    if stream:
        body["stream_options"] = {"include_usage": True}
    if model is not None:
        body["model"] = model
    return body


def ask(server: str, body: dict, on_text: Callable[[str], None] | None = None,
        api_key: str | None = None) -> dict:
    """POST the body; stream the answer's pieces to on_text -> the `--json` record."""
    url = base_url(server) + "/v1/chat/completions"
    accept = "text/event-stream" if body.get("stream") else "application/json"
    headers = {"Content-Type": "application/json", "Accept": accept}
    key = api_key or os.environ.get(API_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if body.get("stream"):
                return _read_stream(response, server, on_text)
            return json.load(response)["vidqa"]
    except _OutputFailed as failed:
        raise failed.error from None
    except urllib.error.HTTPError as error:
        raise _server_error(error.code, _error_message(error)) from None
    except VidqaError:
        raise
    except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
        raise _broken(server, error) from None
    except urllib.error.URLError as error:
        raise RuntimeFailure(f"cannot reach the vidqa server at {base_url(server)}: {error.reason}; "
                             "is `vidqa serve` running there?") from None
    except (OSError, ValueError, KeyError) as error:
        raise _broken(server, error) from None


def _read_stream(response, server: str, on_text) -> dict:
    """Read the SSE stream to its [DONE]; the last chunk before it carries the record."""
    record = None
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            if record is None:
                raise RuntimeFailure(f"the vidqa server at {base_url(server)} sent no answer record")
            return record
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            raise _server_error(int(error.get("code") or 500), error.get("message") or "server error")
        record = event.get("vidqa", record)
        for choice in event.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content")
            if piece and on_text is not None:
                try:
                    on_text(piece)
                except OSError as error:  # stdout, not the connection
                    raise _OutputFailed(error) from None
    raise _broken(server, "the stream ended early")


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {error.code} {error.reason}"


def _server_error(status: int, message: str) -> VidqaError:
    return BadInput(message) if 400 <= status < 500 and status != 429 else RuntimeFailure(message)


def _broken(server: str, reason) -> RuntimeFailure:
    return RuntimeFailure(f"the vidqa server at {base_url(server)} closed the connection before the answer was "
                          f"complete ({reason or 'connection lost'}); is it still running?")
