"""benchmarks/ops.py: the op and host-sync counts per pruning stage (a CPU proxy for GPU launches)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import record_function


@pytest.fixture(scope="module")
def ops(load_script):
    return load_script("benchmarks/ops.py")


def test_ops_and_syncs_are_counted_inside_their_stage(ops):
    x = torch.arange(10.0)

    def work():
        with record_function(ops.STAGE_PREFIX + "select"):
            y = (x + 1) * 2
            y.sum().item()  # _local_scalar_dense
            y.tolist()  # no op at all: marked while counting
            x[x > 3]  # bool-mask indexing: nonzero
        x + 1  # outside every stage

    counts = ops.profiled(work)
    inside = counts["select"]
    assert inside.syncs == 3
    assert inside.sync_kinds == {"_local_scalar_dense": 1, "nonzero": 1, "vidqa.sync:tolist": 1}
    assert inside.ops >= 5  # add, mul, sum, item's read, gt, index...
    assert counts[None].ops >= 1 and counts[None].syncs == 0
    assert torch.Tensor.tolist(torch.ones(2)) == [1.0, 1.0]  # restored after counting


def test_a_nested_stage_owns_its_own_ops(ops):
    x = torch.ones(4)
    one_mul = ops.profiled(lambda: x * 2)[None].ops  # an op and the events nested inside it
    one_add = ops.profiled(lambda: x + 1)[None].ops

    def work():
        with record_function(ops.STAGE_PREFIX + "outer"):
            x + 1
            with record_function(ops.STAGE_PREFIX + "inner"):
                x * 2
                x * 3

    counts = ops.profiled(work)
    assert counts["inner"].ops == 2 * one_mul and counts["outer"].ops == one_add


def test_every_pruning_stage_is_counted_through_a_real_request(ops, tmp_path, capsys):
    rows = ops.main(["--presets", "evs,fastv", "--frames", "4,8", "--workdir", str(tmp_path)])
    assert {(row["preset"], row["frames"]) for row in rows} == {("evs", 4), ("evs", 8), ("fastv", 4), ("fastv", 8)}
    for row in rows:
        assert row["stages"], row  # the pruner and the decoder hooks open a range per stage
        assert row["stage_ops"] > 0
    evs = next(row for row in rows if row["preset"] == "evs")
    assert set(evs["stages"]) == {"select"}  # presets/evs.yaml's one stage, by its name
    printed = capsys.readouterr().out
    assert "| evs |" in printed and "| fastv |" in printed
