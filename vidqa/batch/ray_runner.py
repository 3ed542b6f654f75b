"""`vidqa batch` on a Ray cluster: one model replica per GPU (or per N CPUs), one video's tasks
at a time per replica, the driver the only writer of the results.

Rows are grouped by video (batch.plan already orders them so), and a group goes to one replica,
which decodes, encodes and (for question-agnostic presets) prefills the video once for all its
rows, and returns the group's records together. The driver writes them, so resume,
exactly-once records and --retry-errors work as in a plain run. A replica that dies (its actor
or process killed, a node lost) loses nothing: the driver starts a new replica and gives the
group to a live one; nothing of the group was written yet. A group whose replica dies on every
try (`attempts`) becomes error records, and the other groups go on. Ray core actors do the
scheduling and fault detection; nothing here schedules by hand beyond "a free replica takes the
next group".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

RAY_MISSING = "--ray needs the ray package: pip install -e \".[ray]\" (or pip install ray)"


def import_ray():
    from vidqa.errors import BadInput

    try:
        import ray
    except ImportError:
        raise BadInput(RAY_MISSING) from None
    return ray


def group_by_video(tasks: Sequence) -> list[list]:
    """Consecutive tasks of one video (batch.plan groups them) -> one list per video."""
    groups: dict[str, list] = {}
    for task in tasks:
        groups.setdefault(str(task.row.video_path), []).append(task)
    return list(groups.values())


class _ReplicaBody:
    """What runs inside a Ray actor: a loaded model and a batch Runner for it."""

    def __init__(self, settings, load: dict, cache_bytes: int):
        from vidqa import api
        from vidqa.batch import runner as batching

        model = api.open_model(api.Settings(model=settings.model, **load))
        self.runner = batching.Runner(model, settings, batching.ClipCache(cache_bytes))

    def run(self, tasks: list) -> list[dict]:
        return [self.runner.run(task) for task in tasks]

    def pid(self) -> int:
        import os

        return os.getpid()


def run_batch_ray(
    tasks: Sequence,
    settings,
    write: Callable[[dict], None],
    *,
    load: dict,
    address: str | None = None,
    replicas: int | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    cache_bytes: int = 2**31,
    attempts: int = 3,
    on_done: Callable[[object, dict], None] | None = None,
    on_replicas: Callable[[list], None] | None = None,
) -> list[dict]:
    """Run `tasks` on Ray replicas; every record is handed to `write` here, in the driver.

    load: how each replica loads the model: `vidqa.api.Settings` fields (device, dtype, attn, max_pixels, system). replicas: how many
    (default: one per GPU when gpus_per_replica > 0, else cluster CPUs // cpus_per_replica).
    on_replicas: called with the live actor handles whenever they change (tests kill one).
    """
    from vidqa.batch import runner as batching

    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    resources = ray.cluster_resources()
    if replicas is None:
        if gpus_per_replica > 0:
            replicas = int(resources.get("GPU", 0) // gpus_per_replica)
        else:
            replicas = int(resources.get("CPU", 1) // cpus_per_replica)
    replicas = max(1, replicas)
    Replica = ray.remote(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica, max_restarts=0)(_ReplicaBody)

    def start():
        return Replica.remote(settings, load, cache_bytes)

    actors = [start() for _ in range(replicas)]
    if on_replicas is not None:
        on_replicas(actors)
    pending = list(group_by_video(tasks))
    tries = [0] * len(pending)
    queue = list(range(len(pending)))
    running: dict = {}  # ObjectRef -> (group index, actor)
    idle = list(actors)
    records: list[dict] = []

    def finish(group: list, results: list[dict]) -> None:
        for task, record in zip(group, results):
            write(record)
            records.append(record)
            if on_done is not None:
                on_done(task, record)

    while queue or running:
        while queue and idle:
            index, actor = queue.pop(0), idle.pop(0)
            tries[index] += 1
            running[actor.run.remote(pending[index])] = (index, actor)
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        index, actor = running.pop(ref)
        try:
            results = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as error:
            replacement = start()  # the dead replica's place; its group goes back in the queue
            actors[actors.index(actor)] = replacement
            idle.append(replacement)
            if on_replicas is not None:
                on_replicas(actors)
            if tries[index] < attempts:
                queue.insert(0, index)
            else:
                reason = f"replica lost on each of {attempts} tries ({type(error).__name__})"
                finish(pending[index], [dict(batching.new_record(t, settings), error=reason) for t in pending[index]])
            continue
        idle.append(actor)
        finish(pending[index], results)
    for actor in actors:
        ray.kill(actor)
    return records
