"""Shared fixtures: tiny random checkpoints saved to disk and generated video files.

Nothing here touches the network: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vidqa.testing.builders import build_tiny_llava_onevision  # noqa: E402
from vidqa.testing.families import build_tiny_qwen2_5_vl, build_tiny_smolvlm  # noqa: E402
from vidqa.testing.videos import moving_square_frames, write_video  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
    """`load("benchmarks/prefill.py")` -> that script (not in a package) imported as a module,
    once per session, registered in sys.modules while the session runs (dataclasses and pickling
    look a module up by name)."""
    loaded: dict[str, object] = {}

    def load(relative: str):
        if relative not in loaded:
            name = "vidqa_script_" + "_".join(Path(relative).with_suffix("").parts)
            spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[relative] = module
        return loaded[relative]

    yield load
    for module in loaded.values():
        sys.modules.pop(module.__name__, None)


# the three families a preset's end-to-end tests run on, by their test-id names
FAMILY_BUILDERS = {"llava": build_tiny_llava_onevision, "qwen": build_tiny_qwen2_5_vl, "smol": build_tiny_smolvlm}


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A random LLaVA-OneVision checkpoint: 16 pooled tokens per 112 px frame, 4 LLM layers."""
    return build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny-llava-ov"))


@pytest.fixture(scope="session")
def square_video(tmp_path_factory):
    """A 24-frame mp4 (8 fps, 3 s) of a square moving right and turning from red to blue."""
    frames = moving_square_frames(num_frames=24, size=(112, 112), end_color=(0, 0, 255))
    return write_video(tmp_path_factory.mktemp("videos") / "square.mp4", frames, fps=8.0)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli():
    """Run the real Typer app in-process: run_cli(["ask", ...], input="piped stdin")."""
    from vidqa.cli.app import app

    def run(args, input: str | None = None) -> CliResult:
        result = CliRunner().invoke(app, [str(a) for a in args], input=input)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def assert_one_line_error(result: CliResult, *fragments: str, exit_code: int = 2) -> None:
    """Bad input: the given exit code, one 'error:' line on stderr naming the value, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stderr + result.stdout


def split_layers(adapter, first, second) -> dict:
    """An accelerate device map: everything on `first` except the second half of the decoder
    layers and the final norm, which go to `second` ("cpu", "disk" or a GPU index; accelerate's
    hooks move the activations, or load offloaded weights on the fly)."""
    language_model = adapter.language_model
    prefix = next(name for name, module in adapter.model.named_modules() if module is language_model)
    mapping = {name: first for name, _ in adapter.model.named_children() if name != "model"}
    for name, module in adapter.model.model.named_children():
        if module is not language_model:
            mapping[f"model.{name}"] = first
    layers = len(adapter.decoder_layers)
    for name, _ in language_model.named_children():
        if name != "layers":
            mapping[f"{prefix}.{name}"] = second if name == "norm" else first
    for index in range(layers):
        mapping[f"{prefix}.layers.{index}"] = first if index < layers // 2 else second
    for name, _ in adapter.model.model.named_parameters(recurse=False):  # LLaVA-OV's image_newline
        mapping[f"model.{name}"] = first
    return mapping


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory):
    """One tiny checkpoint per FAMILY_BUILDERS entry, built once for the whole run."""
    return {name: build(tmp_path_factory.mktemp(f"family-{name}")) for name, build in FAMILY_BUILDERS.items()}


# frames per family giving 128, 64 (4 two-frame temporal patches) and 64 video tokens
FAMILY_FRAMES = {"llava": 8, "qwen": 8, "smol": 4}


@pytest.fixture(scope="module")
def family_adapters(family_checkpoints):
    """The family checkpoints loaded (CPU, float32, SDPA); per module, so no test sees another module's hooks."""
    from vidqa.models import load_model

    return {name: load_model(str(path), device="cpu", dtype="float32") for name, path in family_checkpoints.items()}


@pytest.fixture(scope="module")
def family_clips(square_video):
    """square_video decoded at FAMILY_FRAMES frames, per family."""
    from vidqa.video.decode import load_clip

    return {name: load_clip(square_video, num_frames=count) for name, count in FAMILY_FRAMES.items()}


def ask_json(run_cli, model, video, *extra, question: str = "what happens in this video ?",
             max_new_tokens: int = 6) -> dict:
    """`vidqa ask --json` on 8 frames (6 new tokens by default); the record, after asserting exit 0."""
    import json

    result = run_cli(["ask", video, question, "--model", model, "--frames", "8", "--max-new-tokens",
                      str(max_new_tokens), "--json", *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)
