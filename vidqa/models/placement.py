"""Where a checkpoint's weights go: one device, or sharded by accelerate when they do not fit.

`--device-map auto` hands placement to accelerate (through transformers' `device_map`): whole
decoder layers are spread over the visible GPUs in order, then CPU memory, then a disk folder as
the last resort; its hooks move activations between devices. Without the flag vidqa picks: one
device when the weights (counted on the meta device, no download of weights needed beyond the
config) fit the chosen GPU's free memory with headroom, else `auto`. The pruning hooks work on a
sharded model: they follow the device of the hidden states they are handed.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from vidqa.errors import BadInput

SHARDING_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named strategies
HEADROOM = 1.15  # weights x this + RESERVE must fit: activations, KV cache and the CUDA context
RESERVE_BYTES = 2 * 2**30


@dataclass
class Placement:
    """device_map: None = the whole model on one device (`.to(device)`), else accelerate's map."""

    device_map: str | dict | None = None
    offload_folder: str | None = None
    notes: list[str] = field(default_factory=list)


def weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in `dtype`, counted on the meta device (no memory used)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    element = torch.empty((), dtype=dtype).element_size()
    return sum(parameter.numel() for parameter in model.parameters()) * element


def fits(weights: int, free: int) -> bool:
    return weights * HEADROOM + RESERVE_BYTES <= free


def plan_placement(config, device: str, dtype: torch.dtype, device_map: str | dict | None) -> Placement:
    """The placement for `device_map` (None = decide by size, "none" = one device, a name from
    SHARDING_MAPS or a dict = accelerate)."""
    if device_map == "none":
        return Placement()
    if device_map is None:
        if not device.startswith("cuda"):
            return Placement()
        weights = weight_bytes(config, dtype)
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if fits(weights, free):
            return Placement()
        note = (f"the weights ({weights / 2**30:.1f} GiB) do not fit {device} ({free / 2**30:.1f} GiB free): "
                f"sharded over {torch.cuda.device_count()} visible GPU(s), CPU as a last resort "
                "(--device-map auto; --device-map none keeps one device)")
        return _sharded("auto", [note])
    if isinstance(device_map, dict) or device_map in SHARDING_MAPS:
        return _sharded(device_map, [])
    raise BadInput(f"--device-map {device_map!r} is not a placement; use auto or none")


def _sharded(device_map, notes: list[str]) -> Placement:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise BadInput("sharding a model (--device-map) needs the accelerate package: pip install accelerate") from None
    return Placement(device_map=device_map, offload_folder=_offload_folder(), notes=notes)


_folders: list[str] = []


def _offload_folder() -> str:
    """A temporary folder for weights accelerate offloads to disk (only used when CPU memory is
    short too); removed when the process exits."""
    if not _folders:
        _folders.append(tempfile.mkdtemp(prefix="vidqa-offload-"))
        atexit.register(shutil.rmtree, _folders[0], ignore_errors=True)
    return _folders[0]
