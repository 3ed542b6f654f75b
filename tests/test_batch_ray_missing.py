"""Without the optional ray package, `vidqa batch --ray` is one clear line (exit 2)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import assert_one_line_error

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed here")


def test_ray_missing_is_one_line(run_cli, tiny_llava, square_video, tmp_path):
    (tmp_path / "square.mp4").write_bytes(square_video.read_bytes())
    (tmp_path / "q.csv").write_text("video,question\nsquare.mp4,what ?\n", encoding="utf-8")
    result = run_cli(["batch", tmp_path / "q.csv", "-o", tmp_path / "out.jsonl", "--model", tiny_llava,
                      "--frames", "4", "--ray", "local"])
    assert_one_line_error(result, "--ray needs the ray package", "pip install")
