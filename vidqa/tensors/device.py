"""Device helpers shared by every layer."""

from __future__ import annotations

import torch


def synchronize(device: torch.device | str) -> None:
    """Make GPU work finish before reading the clock (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
