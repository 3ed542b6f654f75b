"""`vidqa batch` on a local Ray cluster (CPU, 2 replicas of the tiny model): the same records as
a plain run, and a killed replica loses and duplicates nothing. Skipped without ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install -e \".[ray]\")")

from vidqa.batch import runner as batching  # noqa: E402
from vidqa.batch.ray_runner import run_batch_ray  # noqa: E402
from vidqa.engine import request as engine  # noqa: E402
from vidqa.testing.videos import three_scene_frames, write_video  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DETERMINISTIC = ("id", "video", "question", "answer", "preset", "keep", "error")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tasks_and_settings(tmp_path_factory, square_video, tiny_llava):
    folder = tmp_path_factory.mktemp("ray")
    (folder / "square.mp4").write_bytes(square_video.read_bytes())
    write_video(folder / "scenes.mp4", three_scene_frames(frames_per_scene=(4, 4, 4), size=(112, 112)))
    csv = folder / "q.csv"
    csv.write_text("id,video,question\n"
                   "a,square.mp4,what colour is the square ?\n"
                   "b,scenes.mp4,what happens in this video ?\n"
                   "c,square.mp4,which way does it move ?\n"
                   "d,scenes.mp4,what colour comes first ?\n", encoding="utf-8")
    tasks = batching.plan(batching.read_questions(csv), ["none", "evs"], [0.5])
    settings = batching.Settings(model=str(tiny_llava), frame_options=engine.FrameOptions(frames=4),
                                 generation=engine.GenerationOptions(max_new_tokens=3), overrides=[], attn="sdpa")
    return tasks, settings


def plain_records(tasks, settings):
    from vidqa import api

    runner = batching.Runner(api.open_model(api.Settings(model=settings.model, device="cpu", dtype="float32")), settings,
                             batching.ClipCache(2**30))
    return batching.run_batch(tasks, runner, lambda record: None)


def by_key(records):
    return {(r["id"], r["preset"], r["keep"]): {k: r[k] for k in DETERMINISTIC} for r in records}


def test_ray_records_equal_a_plain_run(cluster, tasks_and_settings):
    tasks, settings = tasks_and_settings
    written = []
    records = run_batch_ray(tasks, settings, written.append, load={"device": "cpu", "dtype": "float32"}, replicas=2)
    assert written == records and len(records) == len(tasks)
    assert by_key(records) == by_key(plain_records(tasks, settings))
    assert not any(r["error"] for r in records)


def test_a_killed_replica_loses_and_duplicates_nothing(cluster, tasks_and_settings):
    tasks, settings = tasks_and_settings
    killed = []

    def kill_first(actors):
        if not killed:
            killed.append(actors[0])
            ray.kill(actors[0], no_restart=True)  # dies before/while running its first video

    written = []
    records = run_batch_ray(tasks, settings, written.append, load={"device": "cpu", "dtype": "float32"},
                            replicas=2, on_replicas=kill_first)
    keys = [(r["id"], r["preset"], r["keep"]) for r in written]
    assert len(keys) == len(set(keys)) == len(tasks)  # 0 lost, 0 duplicated
    assert not any(r["error"] for r in records)
    assert by_key(records) == by_key(plain_records(tasks, settings))


def test_replicas_killed_while_running_lose_nothing(cluster, tasks_and_settings):
    """When the first video's records arrive, kill every replica: the one still working on the
    other video dies mid-row (unless it already finished); its video is redone on a new replica."""
    tasks, settings = tasks_and_settings
    live, written = [], []

    def kill_once(task, record):
        if len(written) == 1:
            for actor in list(live):
                ray.kill(actor, no_restart=True)

    records = run_batch_ray(tasks, settings, written.append, load={"device": "cpu", "dtype": "float32"},
                            replicas=2, on_done=kill_once, on_replicas=lambda actors: live.__setitem__(slice(None), actors))
    keys = [(r["id"], r["preset"], r["keep"]) for r in written]
    assert len(keys) == len(set(keys)) == len(tasks)
    assert by_key(records) == by_key(plain_records(tasks, settings))


def test_a_group_that_dies_on_every_try_is_error_records(cluster, tasks_and_settings):
    tasks, settings = tasks_and_settings

    def kill_all(actors):
        for actor in actors:
            ray.kill(actor, no_restart=True)

    written = []
    records = run_batch_ray(tasks[:2], settings, written.append, load={"device": "cpu", "dtype": "float32"},
                            replicas=1, attempts=2, on_replicas=kill_all)
    assert len(records) == 2 and all("replica lost on each of 2 tries" in r["error"] for r in records)
    assert os.getpid()  # the driver survived


def test_cli_batch_with_ray_writes_the_plain_records(cluster, run_cli, tasks_and_settings, tmp_path):
    import json

    tasks, settings = tasks_and_settings
    csv = tasks[0].row.video_path.parent / "q.csv"
    output = tmp_path / "ray.jsonl"
    result = run_cli(["batch", csv, "-o", output, "--model", settings.model, "--frames", "4", "--max-new-tokens", "3",
                      "--prune", "none,evs", "--keep", "0.5", "--device", "cpu", "--dtype", "float32", "--ray", "local"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert by_key(records) == by_key(plain_records(tasks, settings))


def test_cli_batch_with_ray_draws_what_each_record_kept(cluster, run_cli, tasks_and_settings, tmp_path):
    """--show-kept with --ray: the replicas draw each record's image into the folder (a local
    cluster shares the filesystem), one PNG per record, named as a plain run names them."""
    import json

    from vidqa.render.show_kept import image_name

    tasks, settings = tasks_and_settings
    csv = tasks[0].row.video_path.parent / "q.csv"
    output, images = tmp_path / "ray.jsonl", tmp_path / "kept"
    result = run_cli(["batch", csv, "-o", output, "--model", settings.model, "--frames", "4", "--max-new-tokens", "3",
                      "--prune", "evs", "--keep", "0.5", "--device", "cpu", "--dtype", "float32", "--ray", "local",
                      "--show-kept", images])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 4 and not any(r.get("notes") for r in records)
    expected = {image_name(r["id"], r["preset"], r["keep"]) for r in records}
    drawn = {path.name for path in images.iterdir()}
    assert drawn == expected
    assert all((images / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in drawn)
