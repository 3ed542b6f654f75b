"""The --keep/--flops options' own limits. Torch-free, so the command line checks them before
the heavy imports (a typo is reported at once)."""

from __future__ import annotations

from vidqa.errors import BadInput


def check_budget(keep: float | None, flops: float | None) -> None:
    """Each is a fraction in (0, 1]; at most one of them."""
    for option, value in (("--keep", keep), ("--flops", flops)):
        if value is not None and not 0 < value <= 1:
            raise BadInput(f"{option} must be in (0, 1], got {value}")
    if keep is not None and flops is not None:
        raise BadInput("give --keep or --flops, not both")
