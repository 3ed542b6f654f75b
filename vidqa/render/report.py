"""Rendering: the stats table (rich, stderr) and the `--json` record."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from vidqa.flops import format_flops

if TYPE_CHECKING:  # the table reads attributes only: `vidqa ask --server` renders a record without torch
    from vidqa.engine.stats import Stats

SCHEMA_VERSION = 1


def ask_record(answer, *, model: str, preset: str, parameters: dict[str, Any], details=None) -> dict:
    """The `vidqa ask --json` object (documented in docs/json.md)."""
    return {
        "schema": SCHEMA_VERSION,
        "answer": answer.text,
        "model": model,
        "preset": preset,
        "parameters": parameters,
        "stats": answer.stats.to_dict(),
        "pruning": details or {},
        "kept": answer.kept.compact() if getattr(answer, "kept", None) is not None else None,
        "notes": answer.notes,
    }


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _bytes(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _summarise_layers(per_layer: list[int]) -> str:
    """'196 x2, 49 x26' — runs of equal counts, in layer order."""
    runs: list[list[int]] = []
    for count in per_layer:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return ", ".join(f"{count} x{length}" for count, length in runs)


def stats_table(stats: Stats, preset: str) -> Table:
    tokens, time, flops = stats.tokens, stats.time, stats.flops
    table = Table(title=f"vidqa · preset {preset}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("frames sampled", str(tokens.frames))
    table.add_row("visual tokens before → after", f"{tokens.visual_tokens_before} → {tokens.visual_tokens_after}")
    if len(tokens.visual_tokens_per_stage) > 1:
        stages = " → ".join(f"{n} ({name})" for name, n in tokens.visual_tokens_per_stage.items())
        table.add_row("  per stage", stages)
    table.add_row("  entering each LLM layer", _summarise_layers(tokens.visual_tokens_per_layer))
    table.add_row("  layer-averaged retention", f"{tokens.layer_avg_retention:.1%}")
    table.add_row("prompt tokens (unpruned → LLM)", f"{tokens.prompt_tokens} → {tokens.llm_prompt_tokens}")
    table.add_row("generated tokens", str(tokens.generated_tokens))
    table.add_section()
    table.add_row("video decode", _seconds(time.video_decode_s))
    table.add_row("preprocessing", _seconds(time.preprocess_s))
    table.add_row("vision encoder", _seconds(time.vision_encoder_s))
    table.add_row("pruning overhead", _seconds(time.pruning_s))
    table.add_row("LLM prefill (time to first token)", _seconds(time.prefill_s))
    warmup = getattr(time, "decode_warmup_s", 0.0)  # the static/graphs paths' one-time set-up
    path = getattr(stats, "decode_path", "eager") + (f", warm-up {_seconds(warmup)}" if warmup else "")
    table.add_row("decode", f"{time.decode_tokens_per_s:.1f} tok/s ({path})")
    table.add_row("total", _seconds(time.total_s))
    table.add_section()
    table.add_row(
        "FLOPs, paper convention (visual prefill, MACs)",
        f"{format_flops(flops.paper_visual_prefill_macs)} = {flops.paper_fraction:.1%} of "
        f"{format_flops(flops.paper_vanilla_macs)}",
    )
    table.add_row("FLOPs, full prompt prefill (MACs)", format_flops(flops.prompt_prefill_macs))
    table.add_row("FLOPs, vision encoder (MACs)", format_flops(flops.vision_encoder_macs))
    kind = "GPU memory" if stats.peak_memory_kind == "cuda" else "RSS"  # stats.RequestMemory
    table.add_row(f"peak {kind} of the request", f"{_bytes(stats.peak_memory_bytes)} above the model")
    table.add_row(f"  peak {kind} in all", _bytes(stats.peak_memory_total_bytes))
    return table


def print_stats(stats: Stats, preset: str, console: Console) -> None:
    console.print(stats_table(stats, preset))
