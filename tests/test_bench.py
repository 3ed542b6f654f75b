"""benchmarks/prefill.py runs end to end on a tiny model and produces its table, JSON and plot.

Structure only: a benchmark measures, a test never asserts on timings.
"""

from __future__ import annotations

import json

import pytest

PRESETS = ("fastv", "prunevid", "sparsevlm", "adatp", "evs", "vidcom2")
KEEPS = (0.1, 0.5)


@pytest.fixture(scope="module")
def prefill_bench(load_script):
    return load_script("benchmarks/prefill.py")


@pytest.fixture(scope="module")
def bench_run(prefill_bench, tiny_llava, square_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    argv = [
        "--model", str(tiny_llava), "--video", str(square_video), "--frames", "4",
        "--presets", ",".join(PRESETS), "--keeps", ",".join(map(str, KEEPS)),
        "--repeats", "1", "--warmup", "0", "--decode-tokens", "3", "--device", "cpu",
        "--threads", "1", "--layer-curve", "8,32", "--reference-frames", "2", "--workdir", str(tmp_path_factory.mktemp("bench-work")), "--out", str(out), "--quiet",
    ]
    return prefill_bench.main(argv), out


def test_table_has_a_row_per_configuration(bench_run, capsys):
    results, out = bench_run
    table = (out / "table.md").read_text().strip().splitlines()
    header, rule, rows = table[0], table[1], table[2:]
    for column in ("LLM prefill ms", "TTFT", "pruning overhead", "decode tok/s", "peak mem",
                   "FLOPs % full prompt", "FLOPs % paper", "speedup", "realised (full)", "realised (paper)",
                   "best-of-N"):
        assert column in header
    assert rule.count("---") == header.count("|") - 1
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == ["none"] + [f"{p} @ {k:g}" for p in PRESETS for k in KEEPS] + ["none, 2 frames (reference)"]
    assert all(row.count("|") == header.count("|") for row in rows)


def test_unreachable_keep_is_a_row_not_a_crash(bench_run):
    results, _ = bench_run
    rows = {row["label"]: row for row in results["rows"]}
    # FastV acts after layer K=1 of this 4-layer model: keep >= 1/4
    assert rows["fastv @ 0.1"]["unreachable"] == "lowest keep 0.250"
    assert "unreachable" not in rows["fastv @ 0.5"]


def test_json_rows_hold_every_measure(bench_run):
    results, out = bench_run
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    assert results["machine"]["torch"] and results["machine"]["torch_threads"] == 1
    measured = [row for row in results["rows"] if "unreachable" not in row]
    assert measured[0]["label"] == "none" and len(measured) >= 5
    for row in measured:
        assert row["repetitions"] == 1
        assert row["prefill_min_s"] <= row["prefill_median_s"] <= row["prefill_max_s"]
        assert row["ttft_median_s"] > 0 and row["overhead_median_s"] >= 0
        assert row["generated_tokens"] == 3  # exactly --decode-tokens, even from a random model
        assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] > 0
        for key in ("flops_full_fraction", "flops_paper_fraction", "flops_causal_fraction"):
            assert 0 < row[key] <= 1.0 + 1e-9
        assert row["realised_full"] == pytest.approx(row["speedup"] * row["flops_full_fraction"])
    none = measured[0]
    assert none["flops_full_fraction"] == 1.0 and none["speedup"] == 1.0
    pruned = [row for row in measured if row["preset"] != "none"]
    assert all(row["flops_paper_fraction"] < 1 and row["retention"] < 1 for row in pruned)
    reference = measured[-1]  # `none` on 2 of the 4 frames: half the visual tokens, unpruned
    assert reference["reference_frames"] == 2 and reference["retention"] == pytest.approx(0.5)
    assert reference["flops_paper_fraction"] < 1
    # time of an unpruned prompt of equal FLOPs / this one: exactly 1 on the reference curve itself
    assert reference["vs_reference"] == pytest.approx(1.0) and none["vs_reference"] == pytest.approx(1.0)
    assert all(row["vs_reference"] > 0 for row in measured)


def test_layer_curve(bench_run):
    results, _ = bench_run
    assert [point["tokens"] for point in results["layer_curve"]] == [8, 32]
    assert all(point["layer_s"] > 0 for point in results["layer_curve"])


def test_plot_is_written(bench_run):
    _, out = bench_run
    png = out / "speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reuse_benchmark_runs_and_reports_identical_answers(tiny_llava, square_video, tmp_path, load_script):
    """benchmarks/reuse.py end to end on the tiny model: structure and answer identity, no timings."""
    module = load_script("benchmarks/reuse.py")
    out = tmp_path / "reuse-out"
    results = module.main(["--model", str(tiny_llava), "--video", str(square_video), "--frames", "4",
                           "--questions", "3", "--presets", "none,evs", "--keep", "0.5", "--decode-tokens", "2",
                           "--threads", "1", "--workdir", str(tmp_path / "work"), "--out", str(out), "--quiet"])
    assert [row["preset"] for row in results["rows"]] == ["none", "evs"]
    for row in results["rows"]:
        assert row["identical_answers"] and row["prefix_reused"] == [False, True, True]
        assert len(row["ttft_full_s"]) == len(row["ttft_reuse_s"]) == 3
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    assert (out / "table.md").read_text().startswith("| preset |")


def test_decode_bench_reads_the_engine_against_plain_generate(load_script, tiny_llava, square_video, tmp_path):
    decode_bench = load_script("benchmarks/decode.py")
    results = decode_bench.main(["--model", str(tiny_llava), "--video", str(square_video), "--frames", "4",
                                 "--decode-tokens", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                 "--threads", "1", "--out", str(tmp_path / "out")])
    rows = {row["config"]: row for row in results["rows"]}
    assert list(rows) == [decode_bench.PLAIN] + [label for label, *_ in decode_bench.CONFIGS]
    assert rows[decode_bench.PLAIN]["visual_tokens_in_cache"] == rows["none"]["visual_tokens_in_cache"]
    for row in rows.values():
        assert row["generated"] == 4 and row["decode_tokens_per_s"] > 0
    assert rows["dycoke decode only"]["attended_per_step"] < rows["none"]["attended_per_step"]


def test_large_bench_dims_draw_on_the_init_device_and_save_in_bf16(prefill_bench, monkeypatch, tmp_path):
    from safetensors import safe_open

    small = dict(prefill_bench.BENCH_MODEL_7B, image_size=56, vision_hidden=32, vision_layers=1, vision_heads=2,
                 vision_intermediate=64, text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2,
                 text_intermediate=128)  # the qwen2-7b path at toy size: the real one is 13 GiB
    monkeypatch.setitem(prefill_bench.BENCH_DIMS, "qwen2-7b", small)
    path = prefill_bench.bench_model_dir(tmp_path, "qwen2-7b")
    assert path.name == "llava-ov-qwen2-7b-dims-v2" and (path / ".complete").exists()
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"BF16"}
