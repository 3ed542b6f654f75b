"""benchmarks/e2e.py: the whole request per preset beside `none` (structure only, never timings)."""

from __future__ import annotations

import json


def test_every_phase_of_the_request_is_reported_beside_none(load_script, tiny_llava, square_video, tmp_path):
    e2e = load_script("benchmarks/e2e.py")
    out = tmp_path / "out"
    rows = e2e.main(["--model", str(tiny_llava), "--video", str(square_video), "--presets", "none,evs",
                     "--frames", "4", "--tokens", "2,3", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                     "--threads", "1", "--out", str(out), "--quiet"])
    assert [(row["preset"], row["tokens"]) for row in rows] == [("none", 2), ("evs", 2), ("none", 3), ("evs", 3)]
    for row in rows:
        for phase in e2e.PHASES + ("ttft_s",):
            assert row[phase] >= 0, (phase, row)
        assert row["total_s"] >= row["ttft_s"] >= row["prefill_s"]
        assert row["generated_tokens"] <= row["tokens"]
    none, evs = rows[0], rows[1]
    assert none["speedup_total"] == 1.0 and evs["speedup_total"] > 0
    kept = [int(row["visual_tokens"].split(" -> ")[1]) for row in (none, evs)]
    assert kept[1] < kept[0]
    table = (out / "table.md").read_text()
    assert "| evs @ 0.25 |" in table and "speedup end to end" in table
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
