"""Without the optional ray package, `vidqa batch --ray` is one clear line (exit 2). Where ray is
installed (CI installs the extra), its absence is simulated: a None entry in sys.modules makes
`import ray` raise ImportError, as a missing package does."""

from __future__ import annotations

import sys

from conftest import assert_one_line_error


def test_ray_missing_is_one_line(run_cli, tiny_llava, square_video, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "square.mp4").write_bytes(square_video.read_bytes())
    (tmp_path / "q.csv").write_text("video,question\nsquare.mp4,what ?\n", encoding="utf-8")
    result = run_cli(["batch", tmp_path / "q.csv", "-o", tmp_path / "out.jsonl", "--model", tiny_llava,
                      "--frames", "4", "--ray", "local"])
    assert_one_line_error(result, "--ray needs the ray package", "pip install")
