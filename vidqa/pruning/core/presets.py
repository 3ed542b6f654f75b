"""Presets: YAML files that name a method's stages, their parameters and defaults.

`load_preset("fastv", ["ratio=0.3"])` or `load_preset("my.yaml")` returns a validated, frozen
`Preset`; `build_pruner(preset, adapter, keep=0.3)` makes a fresh per-model `PresetPruner`.
Every bad name, key or value raises BadInput naming it, the valid choices and the closest match.

Frame selectors (`presets/<name>.frames.yaml`, stages before the vision encoder only) are kept
apart from the token presets `available_presets` lists: they choose which frames a clip has
rather than prune its tokens, and compose in front of any preset: `load_preset("dedup+evs")` is
EVS on the frames dedup keeps; `dedup` alone (or `dedup+none`) selects frames and prunes nothing.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from vidqa.errors import BadInput
from vidqa.pruning.core.budget import check_budget
from vidqa.pruning.methods import STAGES, BeforeEncoder, BeforeLLM, InsideLLM, Stage

PRESET_KEYS = {"name", "description", "reference", "positions", "stages", "keep", "typical_keep"}
POSITIONS = ("original", "compact")
SELECTOR_SUFFIX = ".frames"  # presets/<name>.frames.yaml: a frame selector, composed with "+"


def presets_dir() -> Path:
    """presets/ of a source checkout, else the copy installed inside the package."""
    source = Path(__file__).resolve().parents[3] / "presets"
    if source.is_dir():
        return source
    return Path(__file__).resolve().parents[2] / "presets"


def available_presets() -> dict[str, Path]:
    """The token presets (`--prune NAME`): presets/*.yaml but the frame selectors."""
    paths = sorted(presets_dir().glob("*.yaml"))
    return {path.stem: path for path in paths if not path.stem.endswith(SELECTOR_SUFFIX)}


def frame_selectors() -> dict[str, Path]:
    """The frame selectors (`--prune NAME` or `--prune NAME+PRESET`): presets/*.frames.yaml."""
    paths = sorted(presets_dir().glob(f"*{SELECTOR_SUFFIX}.yaml"))
    return {path.stem.removesuffix(SELECTOR_SUFFIX): path for path in paths}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    reference: str
    positions: str
    stages: tuple[tuple[str, Stage], ...]  # (stage name, configured stage)
    keep_rule: str
    typical_keep: float | None = None
    source: str = ""

    @property
    def where(self) -> str:
        kinds = {stage.where for _, stage in self.stages}
        return " + ".join(sorted(kinds)) if kinds else "nowhere"

    @property
    def before_llm(self) -> list[tuple[str, BeforeLLM]]:
        return [(n, s) for n, s in self.stages if isinstance(s, BeforeLLM)]

    @property
    def inside_llm(self) -> list[tuple[str, InsideLLM]]:
        return [(n, s) for n, s in self.stages if isinstance(s, InsideLLM)]

    def parameters(self) -> dict[str, dict]:
        """{stage name: {parameter: value}} — what `vidqa presets show` prints."""
        return {name: {f.name: getattr(stage, f.name) for f in fields(stage)} for name, stage in self.stages}


def _suggest(value: str, choices) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _read_yaml(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise BadInput(f"preset file not found: {name_or_path}")
        source = str(path)
    else:
        presets = {**available_presets(), **frame_selectors()}
        if name_or_path not in presets:
            raise BadInput(
                f"unknown preset '{name_or_path}'{_suggest(name_or_path, presets)}; "
                f"available: {', '.join(available_presets())}; frame selectors: {', '.join(frame_selectors())} "
                f"(or a path to a .yaml file)"
            )
        path, source = presets[name_or_path], name_or_path
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise BadInput(f"preset {source} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadInput(f"preset {source} must be a YAML mapping with name, description, stages")
    return data, source


def _coerce(value, default, where: str):
    """Parse a -P string (or YAML value) to the type of the parameter's default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise BadInput(f"{where}: '{value}' is not a boolean (true/false)")
    try:
        if isinstance(default, int):
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        kind = "an integer" if isinstance(default, int) else "a number"
        raise BadInput(f"{where}: '{value}' is not {kind}") from None
    return value


def _configure(stage_class: type[Stage], values: dict, where: str) -> Stage:
    specs = stage_class.parameter_specs()
    for key in values:
        if key not in specs:
            raise BadInput(
                f"{where}: unknown parameter '{key}'{_suggest(key, specs)}; valid: {', '.join(specs)}"
            )
    configured = {}
    for key, value in values.items():
        spec = specs[key]
        value = _coerce(value, spec.default, f"{where}.{key}")
        low, high = spec.metadata.get("range", (None, None))
        if (low is not None and value < low) or (high is not None and value > high):
            raise BadInput(f"{where}.{key} = {value} is out of range [{low}, {high}]")
        configured[key] = value
    return stage_class(**configured)


def _raw_preset(name_or_path: str) -> tuple[dict, str, list[tuple[str, type[Stage], dict]]]:
    """(the YAML mapping, its source, [(stage name, stage class, raw values)]) of one preset file."""
    data, source = _read_yaml(name_or_path)
    unknown = set(data) - PRESET_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise BadInput(f"preset {source}: unknown key '{key}'{_suggest(key, PRESET_KEYS)}; valid: {', '.join(sorted(PRESET_KEYS))}")
    raw_stages = data.get("stages") or []
    stage_values: list[tuple[str, type[Stage], dict]] = []
    for position, entry in enumerate(raw_stages):
        entry = dict(entry or {})
        kind = entry.pop("type", None)
        if kind not in STAGES:
            raise BadInput(f"preset {source}: stage {position + 1} has unknown type '{kind}'{_suggest(str(kind), STAGES)}; valid: {', '.join(STAGES)}")
        name = str(entry.pop("name", kind))
        stage_values.append((name, STAGES[kind], entry))
    return data, source, stage_values


def _is_selector(stage_values) -> bool:
    return bool(stage_values) and all(issubclass(cls, BeforeEncoder) for _, cls, _ in stage_values)


def _composed(name: str) -> tuple[dict, str, list[tuple[str, type[Stage], dict]]]:
    """`selector+preset` (e.g. dedup+evs) as one preset: the selector's stages, then the preset's;
    the preset's positions, keep rule and typical keep (--keep counts the kept frames' tokens)."""
    parts = [part.strip() for part in name.split("+")]
    example = f"e.g. {next(iter(frame_selectors()), 'dedup')}+evs"
    if len(parts) != 2 or not all(parts):
        raise BadInput(f"--prune {name}: compose one frame selector with one preset, the selector first ({example})")
    (first, first_source, first_stages), (second, second_source, second_stages) = (_raw_preset(p) for p in parts)
    if not _is_selector(first_stages):
        raise BadInput(f"--prune {name}: '{parts[0]}' is not a frame selector (its stages must all act before the "
                       f"vision encoder); frame selectors: {', '.join(frame_selectors())} ({example})")
    if any(issubclass(cls, BeforeEncoder) for _, cls, _ in second_stages):
        raise BadInput(f"--prune {name}: '{parts[1]}' selects frames too; compose one frame selector with one preset")
    clash = sorted({n for n, _, _ in first_stages} & {n for n, _, _ in second_stages})
    if clash:
        raise BadInput(f"--prune {name}: both have a stage named '{clash[0]}'; rename it in a copy of one preset file")
    first_name, second_name = first.get("name", parts[0]), second.get("name", parts[1])
    second_keep = str(second.get("keep", "")).strip()
    data = {
        "name": f"{first_name}+{second_name}",
        "description": f"{str(first.get('description', '')).strip()} Then {second_name}: "
                       f"{str(second.get('description', '')).strip()}",
        "reference": "; ".join(str(d.get("reference", "")).strip() for d in (first, second) if d.get("reference")),
        "positions": second.get("positions", "original"),
        "keep": (f"{second_keep} " if second_keep else "") + f"({first_name} chooses the frames first, from "
                f"their pixels; --keep/--flops count the tokens of the frames it kept.)",
        "typical_keep": second.get("typical_keep"),
    }
    return data, f"{first_source}+{second_source}", [*first_stages, *second_stages]


def load_preset(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Preset:
    """Read and validate a preset (a name, a .yaml path, or `selector+preset`), then apply
    `key=value` overrides (`param` or `stage.param`)."""
    if "+" in name_or_path and not Path(name_or_path).is_file():
        data, source, stage_values = _composed(name_or_path)
    else:
        data, source, stage_values = _raw_preset(name_or_path)
    positions = data.get("positions", "original")
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadInput(f"-P expects key=value, got '{override}'")
        if key == "positions":
            positions = value.strip()
            continue
        stage_name, dot, param_name = key.rpartition(".")
        targets = [(n, c, v) for n, c, v in stage_values if (not dot or n == stage_name) and param_name in c.parameter_specs()]
        if not targets:
            valid = sorted({p for _, c, _ in stage_values for p in c.parameter_specs()} | {"positions"})
            raise BadInput(f"-P {key}: not a parameter of preset '{data.get('name', source)}'{_suggest(param_name, valid)}; valid: {', '.join(valid)}")
        for _, _, values in targets:  # an unqualified key sets every stage that has it
            values[param_name] = value
    if positions not in POSITIONS:
        raise BadInput(f"positions '{positions}' is not one of: {', '.join(POSITIONS)}")
    stages = tuple((name, _configure(cls, values, f"{data.get('name', source)}.{name}")) for name, cls, values in stage_values)
    return Preset(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")).strip(),
        reference=str(data.get("reference", "")).strip(),
        positions=positions,
        stages=stages,
        keep_rule=str(data.get("keep", "")).strip(),
        typical_keep=data.get("typical_keep"),
        source=source,
    )


def default_retention(preset: Preset, num_layers: int = 28, num_tokens: int = 6272) -> float | None:
    """Layer-averaged retention with the preset's defaults, for in-LLM-only presets
    (LLaVA-OneVision-7B depth and 32 frames); None when it depends on the clip."""
    if preset.before_llm:
        return preset.typical_keep
    from vidqa.pruning.core.pruner import layer_counts

    bound = [(stage.resolved_layer(num_layers), stage) for _, stage in preset.inside_llm]
    counts = layer_counts(bound, num_tokens, num_layers, {}, ratio=None)
    return sum(counts) / (num_layers * num_tokens)


def build_pruner(preset: Preset, adapter, keep: float | None = None, flops: float | None = None):
    """A fresh pruner for one model. `keep`: layer-averaged retention; `flops`: FLOPs fraction."""
    from vidqa.pruning.core.pruner import PresetPruner
    from vidqa.pruning.core.runtime import NO_PRUNING

    check_budget(keep, flops)
    if not preset.stages:
        if (keep is not None and keep < 1) or (flops is not None and flops < 1):
            raise BadInput(f"preset '{preset.name}' does not prune; --keep/--flops must be 1 or left out")
        return NO_PRUNING
    return PresetPruner(preset, adapter, keep=keep, flops=flops)


__all__ = ["Preset", "available_presets", "build_pruner", "check_budget", "default_retention", "frame_selectors",
           "load_preset", "replace"]
