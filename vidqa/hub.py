"""Where a `--model` comes from: a bundled name, a local directory, or the Hugging Face hub.

`resolve_model` turns what the user typed into what `from_pretrained` should load, and fails fast
with one line when the hub is needed but cannot be used: huggingface_hub would otherwise retry for
about 23 s and log a dozen lines before transformers gives up. Without the hub, a checkpoint
already in the local cache loads from its cached snapshot directory (no request at all).

Exit codes (README): the hub unreachable or switched off is a runtime failure (1); a hub that
answers "no such repository" is bad input (2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vidqa.errors import BadInput, RuntimeFailure

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"  # the real default; needs the hub once
PROBE_TIMEOUT_S = 5.0  # one request; connection refused answers at once, a silent network takes this long


@dataclass(frozen=True)
class Bundled:
    """A model shipped inside the package. frames: the clip length it was trained on."""

    path: Path
    family: str
    frames: int
    description: str


def bundled_models() -> dict[str, Bundled]:
    from vidqa import micro

    return {
        "micro": Bundled(micro.CHECKPOINT, "LLaVA-OneVision", micro.FRAMES,
                         "1.3 M-parameter LLaVA-OneVision trained on vidqa's synthetic world (samples/); "
                         "answers its questions offline, nothing else"),
    }


def bundled(model_id: str) -> Bundled | None:
    return bundled_models().get(model_id)


OFFLINE_HINT = "or try the bundled demo model: --model micro"


def looks_local(model_id: str) -> bool:
    """A path rather than a hub id ('owner/name')."""
    local = Path(model_id).expanduser()
    return local.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1


def resolve_model(model_id: str) -> str:
    """The name or directory `from_pretrained` should load for `--model model_id`.

    Bundled names -> their directory; local paths -> unchanged; hub ids -> unchanged when the hub
    answers, else the cached snapshot directory, else RuntimeFailure (one line, fast).
    """
    if (found := bundled(model_id)) is not None:
        return str(found.path)
    if looks_local(model_id):
        return model_id
    _quiet_hub_logging()
    if _offline():
        return _cached_or_fail(model_id, "HF_HUB_OFFLINE is set",
                               "unset HF_HUB_OFFLINE to download it")
    problem = _probe(_endpoint())
    if problem is None:
        return model_id
    return _cached_or_fail(model_id, f"the Hugging Face hub ({_endpoint()}) cannot be reached: {problem}",
                           "connect and rerun")


def config_error(model_id: str, error: Exception) -> BadInput | RuntimeFailure:
    """One line for an OSError from AutoConfig.from_pretrained(model_id) once the hub answered."""
    message = _first_line(error)
    name = type(error).__name__
    if "RepositoryNotFound" in name or "not a valid model identifier" in message or "404" in message:
        return BadInput(f"model '{model_id}' was not found on the Hugging Face hub; check the id "
                        f"(`vidqa models` lists examples), pass --model /path/to/checkpoint, {OFFLINE_HINT}")
    return RuntimeFailure(f"cannot load model '{model_id}': {message.rstrip('.')}; pass --model "
                          f"/path/to/checkpoint, {OFFLINE_HINT}")


def _cached_or_fail(model_id: str, why: str, fix: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or an id the cache layout cannot hold
        raise RuntimeFailure(
            f"model '{model_id}' is not in the local Hugging Face cache and {why}; {fix}, pass a "
            f"downloaded checkpoint with --model /path/to/checkpoint, {OFFLINE_HINT}"
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _probe(endpoint: str) -> str | None:
    """None if the hub answers one HEAD request (any HTTP status), else why not, in a few words."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as error:  # connection refused, DNS, timeout, TLS, proxy: all "unreachable"
        text = _first_line(error)
        if "timed out" in text.lower() or "timeout" in type(error).__name__.lower():
            return f"no answer within {PROBE_TIMEOUT_S:g} s"
        return text or type(error).__name__
    return None


def _quiet_hub_logging() -> None:
    """huggingface_hub logs every retry as a warning; our one-line errors speak for it."""
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__
