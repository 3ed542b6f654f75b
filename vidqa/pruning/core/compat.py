"""The transformers range vidqa is tested with, and the error for a run that did not go as planned.

Pruning rests on transformers internals (decoder-layer hooks and their arguments, the KV cache
layout); when a release changes them, the request stops with one line naming the version.
"""

from __future__ import annotations

import inspect
from importlib.metadata import PackageNotFoundError, version

from vidqa.errors import RuntimeFailure

TESTED_TRANSFORMERS = ">=5.18,<5.26"  # pyproject.toml declares the same range (tests/test_verification.py)


def transformers_version() -> str:
    try:
        return version("transformers")
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        import transformers

        return transformers.__version__


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache under: `cache` from transformers 5.24
    (`past_key_values` is deprecated there until 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_argument(kwargs: dict):
    """The KV cache a decoder module was called with: transformers >= 5.24 names the argument
    `cache` (`past_key_values` is deprecated until 5.40), earlier releases `past_key_values`."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def returned_cache(output):
    """The KV cache a forward returned (`output.cache` from 5.24, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class DecoderMismatch(Exception):
    """Raised inside the decoder hooks when a layer is called in a way they do not know (e.g. a
    renamed keyword argument); the engine turns it into a PruningMismatch naming the preset."""


class PruningMismatch(RuntimeFailure):
    """The LLM did not run as the preset planned (exit 1): one line naming the version and preset."""

    def __init__(self, what: str, preset: str):
        current = transformers_version()
        advice = ("it is in the tested range, please report this" if is_tested(current)
                  else "install a version in that range")
        super().__init__(
            f"the LLM did not run as planned on transformers {current} (preset '{preset}'): {what}; "
            f"no answer was given. vidqa is tested with transformers {TESTED_TRANSFORMERS}: {advice}"
        )


def is_tested(transformers: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(transformers) in SpecifierSet(TESTED_TRANSFORMERS)
    except InvalidVersion:
        return False
