"""Where a request's video comes from, and what the server allows.

- a local path or a file:// URL: read in place, only inside the --allow-dir directories (checked
  on the resolved path, symlinks followed, before the file's existence is revealed);
- data:video/...;base64,...: an upload, at most --max-video-mb and --max-video-seconds long;
- http(s)://: fetched only with --allow-urls, under the same limits.

An upload or a fetch is written to the server's work directory under a name of its own (deleted
after the request); its identity for the session cache is its content's SHA-256, so the same
bytes sent twice reuse the prepared video. Blocking (file system, network): call it in a thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vidqa.serve.config import MIB, ServeConfig
from vidqa.serve.protocol import HTTPProblem

SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/quicktime": ".mov",
            "video/x-msvideo": ".avi", "video/avi": ".avi"}
CHUNK = MIB


@dataclass(frozen=True)
class Video:
    """A request's video, ready to decode."""

    path: Path
    identity: tuple  # the session cache's key for its content: (path, mtime, size) or ("sha256", digest)
    temporary: bool = False  # written by the server for this request: delete after it

    def discard(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


def is_remote(url: str) -> bool:
    """An upload or a URL to fetch (slow: resolve it in a thread), not a local file."""
    return url[:8].lower().startswith(("data:", "http://", "https://"))


def resolve(url: str, config: ServeConfig, workdir: Path) -> Video:
    """The video a video_url names (HTTPProblem when it may not or cannot be used)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise HTTPProblem(f"file URL {url}: only local files (file:///path), not host '{parts.netloc}'")
        return local(urllib.parse.unquote(parts.path), config)
    if scheme == "data":
        return upload(url, config, workdir)
    if scheme in ("http", "https"):
        if not config.allow_urls:
            raise HTTPProblem("http(s) video URLs are off on this server (start it with --allow-urls)", 403)
        return fetch(url, config, workdir)
    if scheme:
        raise HTTPProblem(f"video URL scheme '{scheme}' is not supported; use file://, a path, data: or http(s)://")
    return local(url, config)


def local(given: str, config: ServeConfig) -> Video:
    """A file on the server, inside an allowed directory (relative paths: the server's working directory)."""
    from vidqa.video.decode import check_video_path

    path = Path(given).expanduser()
    resolved = path.resolve()
    if not any(resolved.is_relative_to(folder) for folder in config.allow_dirs):
        raise HTTPProblem(f"{given}: outside the directories this server may read (vidqa serve --allow-dir)", 403)
    check_video_path(path)  # the CLI's lines: video not found / is a directory
    stat = resolved.stat()
    return Video(resolved, ("file", str(resolved), stat.st_mtime_ns, stat.st_size))


def upload(url: str, config: ServeConfig, workdir: Path) -> Video:
    """A data: URL (base64) -> a file in the work directory."""
    header, comma, payload = url.partition(",")
    mime = header[5:].split(";")[0].strip().lower()
    if not comma or ";base64" not in header.lower():
        raise HTTPProblem("a data: video must be base64: data:video/mp4;base64,...")
    if len(payload) // 4 * 3 > config.max_video_bytes:
        raise _too_large("the uploaded video", config)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPProblem("the data: video is not valid base64") from None
    return _store(data, SUFFIXES.get(mime, ".mp4"), "the uploaded video", config, workdir)


def fetch(url: str, config: ServeConfig, workdir: Path) -> Video:
    """An http(s) URL, read up to the size limit."""
    request = urllib.request.Request(url, headers={"User-Agent": "vidqa-serve"})
    try:
        with urllib.request.urlopen(request, timeout=config.fetch_timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > config.max_video_bytes:
                raise _too_large(url, config)
            chunks, size = [], 0
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > config.max_video_bytes:
                    raise _too_large(url, config)
                chunks.append(chunk)
            mime = (response.headers.get_content_type() or "").lower()
    except urllib.error.HTTPError as error:
        raise HTTPProblem(f"cannot fetch {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise HTTPProblem(f"cannot fetch {url}: {reason}") from None
    suffix = SUFFIXES.get(mime) or Path(urllib.parse.urlsplit(url).path).suffix or ".mp4"
    return _store(b"".join(chunks), suffix, url, config, workdir)


def _store(data: bytes, suffix: str, what: str, config: ServeConfig, workdir: Path) -> Video:
    if len(data) > config.max_video_bytes:
        raise _too_large(what, config)
    digest = hashlib.sha256(data).hexdigest()
    path = workdir / f"{digest[:16]}-{secrets.token_hex(4)}{suffix}"  # its own name: requests overlap
    path.write_bytes(data)
    video = Video(path, ("sha256", digest), temporary=True)
    seconds = duration(path)
    if seconds is not None and seconds > config.max_video_seconds:
        video.discard()
        raise HTTPProblem(f"{what} lasts {seconds:.0f} s; this server takes at most "
                          f"{config.max_video_seconds:g} s (vidqa serve --max-video-seconds)", 413)
    return video


def duration(path: Path) -> float | None:
    """The video's length from its container (None when it does not say)."""
    import cv2

    capture = cv2.VideoCapture(os.fspath(path))
    try:
        frames, fps = capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()
    return frames / fps if frames > 0 and fps > 0 else None


def _too_large(what: str, config: ServeConfig) -> HTTPProblem:
    return HTTPProblem(f"{what} is larger than {config.max_video_bytes / MIB:g} MiB, this server's limit "
                       f"(vidqa serve --max-video-mb)", 413)
