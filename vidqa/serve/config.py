"""What a `vidqa serve` process allows: where it listens, who may call it, which videos it reads,
how much it queues and caches. Plain data and checks: no web framework, no torch."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from vidqa.errors import BadInput

API_KEY_ENV = "VIDQA_API_KEY"  # read by `vidqa serve` and by `vidqa ask --server`
MIB = 2**20


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits. Sizes in bytes, durations in seconds."""

    model_name: str  # what /v1/models lists and requests' "model" must name (the --model value)
    api_key: str | None = None  # None: no authentication (loopback only)
    allow_dirs: tuple[Path, ...] = ()  # local videos must resolve inside one of these
    allow_urls: bool = False  # fetch http(s) video URLs
    max_body_bytes: int = 64 * MIB  # a request body (base64 uploads included)
    max_video_bytes: int = 256 * MIB  # an uploaded (data:) or fetched (http) video
    max_video_seconds: float = 3600.0  # duration of an uploaded or fetched video
    fetch_timeout_s: float = 30.0  # an http(s) fetch, connection and each read
    queue_limit: int = 16  # requests waiting behind the running one; more get 429
    cache_bytes: int = 2048 * MIB  # prepared videos (frames, encoder output, KV prefix), LRU


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or 'localhost') is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_listen(host: str, api_key: str | None) -> None:
    """Beyond localhost every caller must present the key."""
    if not is_loopback(host) and not api_key:
        raise BadInput(f"--host {host} listens beyond this machine: set an API key "
                       f"(--api-key or the {API_KEY_ENV} environment variable) first")


def allowed_dirs(dirs: list[Path] | None) -> tuple[Path, ...]:
    """--allow-dir as resolved directories (default: the current directory)."""
    resolved = []
    for item in dirs or [Path.cwd()]:
        path = Path(item).expanduser()
        if not path.is_dir():
            raise BadInput(f"--allow-dir {item}: not a directory")
        resolved.append(path.resolve())
    return tuple(resolved)


def env_api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None
