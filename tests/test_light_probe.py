"""benchmarks/micro/light_probe.py: the linear probe that showed the 14 px light was hard to see.
Its fit is checked on planted data (a readable feature, then none); its options refuse bad values."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("benchmarks/micro/light_probe.py")


def test_the_probe_reads_a_planted_feature_and_nothing_else(probe):
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.2
    noise = rng.normal(size=(400, 16))
    planted = noise.copy()
    planted[:, 3] += 5.0 * labels  # one dimension carries the state
    assert probe.probe_accuracy(planted, labels) >= 0.95
    held_out_off = 1 - labels[200:].mean()
    assert probe.probe_accuracy(noise, labels) <= held_out_off + 0.05  # nothing to read: no better than "off"


def test_bad_options_are_refused_in_one_line(probe, tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    for argv, said in ((["--weights", str(weights)], "no such file"),):
        with pytest.raises(SystemExit) as exit_:
            probe.main(argv)
        assert exit_.value.code == 2 and said in capsys.readouterr().err
    weights.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        probe.main(["--weights", str(weights), "--light-side", "40"])
    assert exit_.value.code == 2 and "--light-side 40: give 2..28 px" in capsys.readouterr().err
