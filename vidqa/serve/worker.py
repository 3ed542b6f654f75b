"""One generation at a time: an asyncio queue in front of the one thread that runs the model.

The model is not thread-safe and one GPU runs one request at a time, so requests wait in a
bounded `asyncio.Queue` (`--queue-limit`; a full queue answers 429) and a dispatcher hands them,
one by one, to a single worker thread. The thread answers from the session cache
(vidqa/serve/sessions.py) and reports back through `Job.emit`, which posts each event to the
request's own asyncio queue with `call_soon_threadsafe`: ("text", piece) as the answer streams,
then ("done", Reply), ("error", exception) or ("cancelled", None).

Cancelling: a request whose client went away sets `job.cancel`. A queued job is skipped; a
running one raises `Cancelled` from the engine's on_text callback at its next piece of text,
which unwinds `generate` through the engine's context managers (pruning hooks, step clock,
checks: all removed on the way out). A cancelled request is counted, not logged as an error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vidqa import api
from vidqa.errors import RuntimeFailure, VidqaError
from vidqa.serve.media import Video
from vidqa.serve.protocol import ChatRequest, HTTPProblem
from vidqa.serve.sessions import PER_REQUEST, SessionCache

log = logging.getLogger("vidqa.serve")


class Cancelled(Exception):
    """The client went away: stop generating (raised from on_text)."""


@dataclass
class Reply:
    record: dict  # the `vidqa ask --json` record
    cached_tokens: int  # prompt rows that came from the cached video prefix


class Job:
    """One request on its way through the queue and the worker thread."""

    def __init__(self, request: ChatRequest, video: Video):
        self.request, self.video = request, video
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()

    def emit(self, kind: str, value=None) -> None:
        """Post an event to the request (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel.set()


class Worker:
    """The model, its session cache, the queue and the thread."""

    def __init__(self, model: api.Model, cache_bytes: int, queue_limit: int):
        self.model = model
        self.cache = SessionCache(model, cache_bytes)
        self.queue_limit = queue_limit
        self.counts = {"served": 0, "failed": 0, "cancelled": 0}
        self._counting = threading.Lock()  # counted from the event loop and from the thread
        self.running: Job | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue | None = None
        self._dispatcher: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidqa-generate")
        self._queue = asyncio.Queue(maxsize=self.queue_limit)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="vidqa-dispatch")

    async def stop(self) -> None:
        """Cancel what runs and what waits; the thread finishes at the running job's next token."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        if self.running is not None:
            self.running.cancel.set()
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            job.cancel.set()
            job.video.discard()
            job.emit("cancelled")
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it (429) when --queue-limit requests already wait."""
        if self._queue is None:
            raise RuntimeFailure("the server is not started (its lifespan did not run)")
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            job.video.discard()
            raise HTTPProblem(f"the server is busy: {self.queue_limit} requests are already waiting "
                              "(vidqa serve --queue-limit); retry later", 429) from None

    def _count(self, outcome: str) -> None:
        with self._counting:
            self.counts[outcome] += 1

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            if job.cancel.is_set():  # its client left while it waited
                job.video.discard()
                self._count("cancelled")
                continue
            await loop.run_in_executor(self._executor, self._run, job)

    # -- the worker thread -----------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        self.running = job
        try:
            outcome, event = "served", ("done", self._answer(job))
        except Cancelled:
            outcome, event = "cancelled", ("cancelled", None)
        except VidqaError as error:
            outcome, event = "failed", ("error", error)
        except Exception as error:  # a bug: the server log gets the traceback, the client one line
            log.exception("request %s failed", job.request.id)
            outcome, event = "failed", ("error", error)
        finally:
            self.running = None
            job.video.discard()
        self._count(outcome)  # before the client hears of it: /health is then up to date
        job.emit(*event)

    def _answer(self, job: Job) -> Reply:
        from vidqa.engine.generation import generation_settings

        request, settings = job.request, job.request.settings
        key, entry = self.cache.get(job.video, settings)
        session, stats = entry.session, entry.session.decode_stats if entry.fresh else None
        entry.fresh = False
        video = session.video  # engine.session.VideoSession: its generation and turns are per request
        video.generation = api.generation_options(settings)
        video.history, video.turns = bool(request.history), list(request.history)

        def on_text(piece: str) -> None:
            if job.cancel.is_set():
                raise Cancelled
            if request.stream:
                job.emit("text", piece)

        try:
            result = session.ask(request.question, on_text=on_text, stats=stats)
        except Cancelled:
            raise
        except BaseException:  # a session that failed midway may be half-prepared: start afresh
            self.cache.drop(key)
            raise
        finally:
            video.history, video.turns = False, []
        self.cache.settle(key)
        record = result.record(self.model.notes)
        parameters = record["parameters"]  # the session's are the defaults: these are this request's
        parameters.update({name: getattr(settings, name) for name in PER_REQUEST if name in parameters})
        parameters["generation"] = result.answer.generation or generation_settings(self.model.adapter, video.generation)
        prefix = video.prefix
        reused = result.stats.prefix_reused and prefix is not None and prefix.ids is not None
        return Reply(record, int(prefix.ids.shape[1]) if reused else 0)
