"""The Python API (vidqa.api): the seam the commands, `batch` and the lmms-eval model call."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vidqa import api
from vidqa.errors import BadInput

QUESTION = "what happens in this video ?"


@pytest.fixture(scope="module")
def model(tiny_llava):
    return api.open_model(api.Settings(model=str(tiny_llava), device="cpu", dtype="float32", frames=4,
                                       max_new_tokens=4))


def test_ask_answers_as_the_command_does(model, tiny_llava, square_video, run_cli):
    result = model.ask(square_video, QUESTION)
    cli = run_cli(["ask", square_video, QUESTION, "--model", tiny_llava, "--device", "cpu", "--frames", "4",
                   "--max-new-tokens", "4", "--json"])
    assert cli.exit_code == 0, cli.stderr
    record = result.record()
    expected = json.loads(cli.stdout)
    assert record["answer"] == result.text == expected["answer"]
    assert record["parameters"] | {"device": None} == expected["parameters"] | {"device": None}
    assert record["stats"]["tokens"] == expected["stats"]["tokens"]


def test_per_request_settings_prune_without_reloading(model, square_video):
    plain = model.ask(square_video, QUESTION)
    pruned = model.ask(square_video, QUESTION, prune="evs", keep=0.25)
    tokens = pruned.stats.tokens
    assert tokens.visual_tokens_before == plain.stats.tokens.visual_tokens_before
    assert tokens.visual_tokens_after < tokens.visual_tokens_before
    assert pruned.record()["preset"] == "evs" and plain.record()["preset"] == "none"
    assert model.settings.prune == "none"  # the model's own settings are untouched


def test_a_session_reuses_the_video_prefill_and_answers_as_ask(model, square_video):
    session = model.session(square_video)
    session.prepare()
    assert session.reuse
    first = session.ask(QUESTION)
    second = session.ask(QUESTION)
    assert second.stats.prefix_reused
    assert first.text == second.text == model.ask(square_video, QUESTION).text
    assert second.record()["parameters"]["reuse"] is True


def test_streamed_pieces_make_the_answer(model, square_video):
    pieces = []
    result = model.ask(square_video, QUESTION, on_text=pieces.append)
    assert "".join(pieces).strip() == result.text


def test_another_model_in_the_settings_is_refused(model, square_video):
    with pytest.raises(BadInput, match="open that one with open_model"):
        model.ask(square_video, QUESTION, model="micro")


@pytest.mark.parametrize("changes, fragment", [
    ({"keep": 1.5}, "--keep must be in (0, 1]"),
    ({"keep": 0.5, "flops": 0.5}, "not both"),
    ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
    ({"temperature": -1.0}, "--temperature"),
    ({"frames": 0}, "--frames must be at least 1"),
    ({"start": 3.0, "end": 1.0}, "--end"),
    ({"prune": "fastvv"}, "unknown preset 'fastvv'"),
    ({"prune": "evs", "params": ("ratio=2",)}, "ratio"),
])
def test_bad_settings_fail_before_any_model_loads(changes, fragment):
    with pytest.raises(BadInput) as error:
        api.check_settings(api.Settings(model="not/a-model", **changes))
    assert fragment in str(error.value)


def test_the_cheap_checks_import_no_torch(tmp_path):
    """`check_options` runs before the heavy imports, so a typo is reported at once."""
    code = (
        "import sys\n"
        "from vidqa import api\n"
        "from vidqa.errors import BadInput\n"
        f"for video, settings in (({str(tmp_path / 'missing.mp4')!r}, api.Settings()),"
        " (None, api.Settings(keep=2.0)), (None, api.Settings(fps=-1.0))):\n"
        "    try:\n"
        "        api.check_options(settings, video)\n"
        "    except BadInput as error:\n"
        "        print(error)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0].startswith("video not found") and "--keep" in lines[1] and "--fps" in lines[2]
    assert lines[-1] == "False False"


def test_a_missing_video_is_reported_before_torch_loads(tmp_path):
    code = (
        "import sys\n"
        "from vidqa.cli.app import app\n"
        f"try:\n    app(['ask', {str(tmp_path / 'missing.mp4')!r}, 'what ?'])\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "video not found" in done.stderr
