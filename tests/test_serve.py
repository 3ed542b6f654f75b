"""`vidqa serve` and `vidqa ask --server` (vidqa/serve/, vidqa/cli/serve.py; docs/serve.md).

Most tests run the app in-process (FastAPI's TestClient) on the bundled micro model and
samples/; the openai client and `vidqa ask --server` talk to a real uvicorn on 127.0.0.1 in a
thread; the disconnect and kill tests run `vidqa serve` as its own process on the tiny random
LLaVA-OneVision, whose answers are long enough to interrupt.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytest.importorskip("fastapi", reason="vidqa serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="vidqa serve needs the serve extra: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from vidqa import api  # noqa: E402
from vidqa.serve.app import create_app  # noqa: E402
from vidqa.serve.config import MIB, ServeConfig  # noqa: E402

SAMPLES = REPO_ROOT / "samples"
SQUARE, LEFT = SAMPLES / "square.mp4", SAMPLES / "left.mp4"
MOVE, COLOUR = "Which way does the square move?", "What colour is the square at the end?"


def body(video, question: str, **extra) -> dict:
    return {"model": "micro", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": str(video)}}, {"type": "text", "text": question}]}], **extra}


def config(**changes) -> ServeConfig:
    values = {"model_name": "micro", "allow_dirs": (SAMPLES.resolve(),), "max_body_bytes": 2 * MIB,
              "max_video_bytes": MIB}
    return ServeConfig(**(values | changes))


@pytest.fixture(scope="module")
def micro():
    return api.open_model(api.Settings(model="micro"))


@pytest.fixture(scope="module")
def client(micro):
    with TestClient(create_app(micro, config())) as client:
        yield client


def one_line_error(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]["message"]
    assert "\n" not in message and "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --- in-process ------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"prune": "evs", "keep": 0.5}, {"prune": "fastv", "keep": 0.5},
                                     {"prune": "vidcom2", "params": {"ratio": 0.4}},
                                     {"prune": "dedup+evs", "keep": 0.5}])
def test_answers_are_the_local_apis_and_the_prefix_is_reused(client, micro, options):
    local = micro.ask(LEFT, MOVE, prune=options.get("prune", "none"), keep=options.get("keep"),
                      params=tuple(f"{k}={v}" for k, v in options.get("params", {}).items()))
    first = client.post("/v1/chat/completions", json=body(LEFT, MOVE, vidqa=options)).json()
    second = client.post("/v1/chat/completions", json=body(LEFT, MOVE, vidqa=options)).json()
    for reply in (first, second):
        assert reply["choices"][0]["message"]["content"] == local.text
        assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] == "stop"
        record = reply["vidqa"]
        assert set(record) == set(local.record()) and set(record["stats"]) == set(local.record()["stats"])
        assert set(local.record()["parameters"]) <= set(record["parameters"])
        assert record["stats"]["tokens"]["visual_tokens_after"] == local.stats.tokens.visual_tokens_after
        usage = reply["usage"]
        assert usage["completion_tokens"] == record["stats"]["tokens"]["generated_tokens"] > 0
        assert usage["prompt_tokens"] == record["stats"]["tokens"]["llm_prompt_tokens"]
    reusable = options.get("prune") != "fastv"  # fastv prunes inside the LLM: no reusable prefix
    assert second["vidqa"]["stats"]["prefix_reused"] is reusable
    assert (second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0) is reusable
    assert second["vidqa"]["stats"]["time"]["video_decode_s"] == 0  # decoded once, by the first


def test_streaming_sends_the_pieces_the_record_and_the_usage(client, micro):
    with client.stream("POST", "/v1/chat/completions",
                       json=body(SQUARE, COLOUR, stream=True, stream_options={"include_usage": True})) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() == micro.ask(SQUARE, COLOUR).text == "blue"
    last = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert last["vidqa"]["answer"] == "blue" and last["vidqa"]["model"] == "micro"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_generation_settings_are_per_request_and_recorded(client):
    short = client.post("/v1/chat/completions", json=body(SQUARE, COLOUR, max_tokens=1, seed=3)).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 1
    parameters = short["vidqa"]["parameters"]
    assert parameters["max_new_tokens"] == parameters["generation"]["max_new_tokens"] == 1
    assert parameters["seed"] == 3 and parameters["temperature"] == 0
    full = client.post("/v1/chat/completions", json=body(SQUARE, COLOUR)).json()  # same session, 256 tokens
    assert full["vidqa"]["parameters"]["max_new_tokens"] == 256 and full["choices"][0]["message"]["content"] == "blue"


def test_the_decode_path_is_per_request(client):
    from vidqa.serve.protocol import VIDQA_OPTIONS

    if "decode" not in VIDQA_OPTIONS:
        pytest.skip("this vidqa has no --decode")
    for path in ("eager", "static"):
        reply = client.post("/v1/chat/completions", json=body(SQUARE, MOVE, vidqa={"decode": path})).json()
        assert reply["choices"][0]["message"]["content"] == "right" and reply["vidqa"]["parameters"]["decode"] == path
    one_line_error(client.post("/v1/chat/completions", json=body(SQUARE, MOVE, vidqa={"decode": "warp"})), 400,
                   "--decode must be one of")


def test_earlier_turns_are_the_history(client, micro):
    messages = body(SQUARE, MOVE)["messages"] + [{"role": "assistant", "content": "right"},
                                                 {"role": "user", "content": COLOUR}]
    reply = client.post("/v1/chat/completions", json={"model": "micro", "messages": messages}).json()
    session = micro.session(SQUARE, history=True)
    session.ask(MOVE)
    assert reply["choices"][0]["message"]["content"] == session.ask(COLOUR).text
    assert reply["vidqa"]["parameters"]["history"] is True


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "micro", "messages": [', 400, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "no messages": ({"model": "micro"}, 400, "'messages'"),
    "wrong model": (body(SQUARE, MOVE) | {"model": "gpt-4o"}, 404, "model 'gpt-4o' is not served here"),
    "unknown preset": (body(SQUARE, MOVE, vidqa={"prune": "evz"}), 400, "unknown preset 'evz' (did you mean 'evs'?)"),
    "preset file": (body(SQUARE, MOVE, vidqa={"prune": "/etc/x.yaml"}), 400, "preset names, not files"),
    "unknown half of a composition": (body(SQUARE, MOVE, vidqa={"prune": "dedup+evz"}), 400,
                                      "unknown preset 'evz' (did you mean 'evs'?)"),
    "composition in the wrong order": (body(SQUARE, MOVE, vidqa={"prune": "evs+dedup"}), 400, "dedup"),
    "bad keep": (body(SQUARE, MOVE, vidqa={"prune": "evs", "keep": 3}), 400, "--keep must be in (0, 1], got 3"),
    "bad -P": (body(SQUARE, MOVE, vidqa={"prune": "evs", "params": ["nope=1"]}), 400, "-P nope: not a parameter"),
    "unknown option": (body(SQUARE, MOVE, vidqa={"pruning": "evs"}), 400, "unknown vidqa option 'pruning'"),
    "keep not a number": (body(SQUARE, MOVE, vidqa={"keep": "lots"}), 400, "'vidqa.keep' must be a number"),
    "missing file": (body(SAMPLES / "missing.mp4", MOVE), 400, "video not found"),
    "outside --allow-dir": (body(REPO_ROOT / "README.md", MOVE), 403, "outside the directories this server may read"),
    "not a video": (body(SAMPLES / "questions.csv", MOVE), 400, "cannot decode video"),
    "no video": ({"model": "micro", "messages": [{"role": "user", "content": MOVE}]}, 400, "exactly one video"),
    "an image": ({"model": "micro", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///x.png"}}]}]}, 400, "'image_url' content is not supported"),
    "http without --allow-urls": (body("http://127.0.0.1:9/clip.mp4", MOVE), 403, "--allow-urls"),
    "another system prompt": (body(SQUARE, MOVE) | {"messages": [{"role": "system", "content": "Be brief."}]
                                                    + body(SQUARE, MOVE)["messages"]}, 400, "system prompt is fixed"),
    "empty question": (body(SQUARE, " "), 400, "the question is empty"),
    "n > 1": (body(SQUARE, MOVE, n=2), 400, "'n' is not supported"),
    "huge body": (b"{" + b" " * (2 * MIB) + b"}", 413, "the request body is larger than 2 MiB"),
    "huge upload": (body("data:video/mp4;base64," + "A" * (3 * MIB // 2), MOVE), 413,
                    "the uploaded video is larger than 1 MiB"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_one_line_4xx(client, case):
    payload, status, fragment = BAD_REQUESTS[case]
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    one_line_error(client.post("/v1/chat/completions", content=content), status, fragment)


def test_local_paths_are_checked_after_following_symlinks(tmp_path):
    import shutil

    from vidqa.errors import BadInput
    from vidqa.serve import media
    from vidqa.serve.app import status_of

    allowed = config(allow_dirs=(tmp_path.resolve(),))
    shutil.copyfile(SQUARE, tmp_path / "clip.mp4")
    (tmp_path / "escape.mp4").symlink_to(SQUARE)  # inside by name, outside once resolved
    assert media.resolve((tmp_path / "clip.mp4").as_uri(), allowed, tmp_path).path == (tmp_path / "clip.mp4").resolve()
    for url, status in ((str(tmp_path / "escape.mp4"), 403), (str(tmp_path / "missing.mp4"), 400),
                        ("file://otherhost/clip.mp4", 400), ("ftp://127.0.0.1/clip.mp4", 400)):
        with pytest.raises(BadInput) as problem:
            media.resolve(url, allowed, tmp_path)
        assert status_of(problem.value) == status, (url, problem.value)


def test_the_server_serves_on_after_errors_and_routes_fail_cleanly(client):
    one_line_error(client.get("/v1/nothing"), 404, "Not Found")
    one_line_error(client.get("/v1/chat/completions"), 405, "Method Not Allowed")
    reply = client.post("/v1/chat/completions", json=body(SQUARE, MOVE)).json()
    assert reply["choices"][0]["message"]["content"] == "right"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["running"] is False and health["failed"] >= 1


def test_an_api_key_guards_the_v1_routes(micro):
    with TestClient(create_app(micro, config(api_key="sesame"))) as guarded:
        one_line_error(guarded.get("/v1/models"), 401, "missing API key")
        one_line_error(guarded.post("/v1/chat/completions", json=body(SQUARE, MOVE),
                                    headers={"Authorization": "Bearer wrong"}), 401, "wrong API key")
        assert guarded.get("/health").status_code == 200
        models = guarded.get("/v1/models", headers={"Authorization": "Bearer sesame"}).json()
        assert [model["id"] for model in models["data"]] == ["micro"]


def test_uploads_are_reused_by_content_and_limited(micro, tmp_path):
    upload = "data:video/mp4;base64," + base64.b64encode(SQUARE.read_bytes()).decode()
    with TestClient(create_app(micro, config())) as server:
        for _ in range(2):
            reply = server.post("/v1/chat/completions", json=body(upload, MOVE)).json()
            assert reply["choices"][0]["message"]["content"] == "right"
        assert reply["vidqa"]["stats"]["prefix_reused"] is True  # the same bytes: the same session
        assert server.get("/health").json()["cache"]["hits"] == 1
    with TestClient(create_app(micro, config(max_video_seconds=1))) as short:
        one_line_error(short.post("/v1/chat/completions", json=body(upload, MOVE)), 413, "at most 1 s")
        one_line_error(short.post("/v1/chat/completions", json=body("data:video/mp4;base64,@@@", MOVE)), 400,
                       "not valid base64")


def test_the_session_cache_evicts_the_least_recently_used(micro):
    with TestClient(create_app(micro, config(cache_bytes=1))) as server:  # room for the newest only
        for video in (SQUARE, LEFT, SQUARE):
            assert server.post("/v1/chat/completions", json=body(video, MOVE)).status_code == 200
        cache = server.get("/health").json()["cache"]
        assert cache["sessions"] == 1 and cache["evictions"] == 2 and cache["misses"] == 3


def test_a_full_queue_answers_429(micro):
    from vidqa.serve.media import Video
    from vidqa.serve.protocol import HTTPProblem, parse_chat
    from vidqa.serve.worker import Job, Worker

    async def flood():
        worker = Worker(micro, cache_bytes=MIB, queue_limit=2)
        await worker.start()
        request = parse_chat(json.dumps(body(SQUARE, MOVE)).encode(), micro.settings, "micro", None)
        try:
            for _ in range(2):  # nothing runs between these lines: both wait in the queue
                worker.submit(Job(request, Video(SQUARE, ("file", "x"))))
            with pytest.raises(HTTPProblem) as refused:
                worker.submit(Job(request, Video(SQUARE, ("file", "x"))))
        finally:
            await worker.stop()
        return refused.value

    refused = asyncio.run(flood())
    assert refused.status == 429 and "2 requests are already waiting" in str(refused)


def test_http_videos_are_fetched_only_when_allowed_and_within_the_limits(micro):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(SAMPLES)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with TestClient(create_app(micro, config(allow_urls=True))) as server:
            reply = server.post("/v1/chat/completions", json=body(f"{base}/square.mp4", MOVE))
            assert reply.json()["choices"][0]["message"]["content"] == "right"
            one_line_error(server.post("/v1/chat/completions", json=body(f"{base}/nothing.mp4", MOVE)), 400,
                           "cannot fetch", "HTTP 404")
        with TestClient(create_app(micro, config(allow_urls=True, max_video_bytes=1000))) as small:
            one_line_error(small.post("/v1/chat/completions", json=body(f"{base}/square.mp4", MOVE)), 413,
                           "--max-video-mb")
    finally:
        files.shutdown()


def test_serve_refuses_unsafe_or_impossible_setups_in_one_line(run_cli, tmp_path):
    import socket

    from conftest import assert_one_line_error

    assert_one_line_error(run_cli(["serve", "--model", "micro", "--host", "0.0.0.0"]), "--api-key", "VIDQA_API_KEY")
    assert_one_line_error(run_cli(["serve", "--model", "micro", "--allow-dir", tmp_path / "nope"]), "not a directory")
    assert_one_line_error(run_cli(["serve", "--model", "micro", "--queue-limit", "0"]), "--queue-limit")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_one_line_error(run_cli(["serve", "--model", "micro", "--port", port]),
                              f"cannot listen on 127.0.0.1:{port}", exit_code=1)


# --- a real server on 127.0.0.1 --------------------------------------------------------------


@contextmanager
def uvicorn_thread(app):
    """`app` served by uvicorn on 127.0.0.1 (a free port) in a thread -> its URL."""
    import uvicorn

    from vidqa.cli.serve import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def server_url(micro):
    with uvicorn_thread(create_app(micro, config())) as url:
        yield url


def test_the_openai_client_streams_and_gets_errors(server_url, micro):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [model.id for model in client.models.list()] == ["micro"]
    messages = body(SQUARE, MOVE)["messages"]
    local = micro.ask(SQUARE, MOVE, prune="evs", keep=0.3).text
    evs = {"vidqa": {"prune": "evs", "keep": 0.3}}
    reply = client.chat.completions.create(model="micro", messages=messages, extra_body=evs)
    assert reply.choices[0].message.content == local and reply.usage.completion_tokens > 0
    assert reply.model_extra["vidqa"]["preset"] == "evs"
    stream = client.chat.completions.create(model="micro", messages=messages, stream=True,
                                            stream_options={"include_usage": True}, extra_body=evs)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == local
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the first request prefilled it
    with pytest.raises(openai.BadRequestError, match="unknown preset 'evz'"):
        client.chat.completions.create(model="micro", messages=messages, extra_body={"vidqa": {"prune": "evz"}})
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def strip_times(record: dict) -> dict:
    """A record without what varies run to run (times, memory, the prefix-reuse flags)."""
    stats = dict(record["stats"], time=None, peak_memory_bytes=None, peak_memory_total_bytes=None,
                 prefix_reused=None)
    parameters = {k: v for k, v in record["parameters"].items() if k not in ("history", "reuse")}
    return dict(record, stats=stats, parameters=parameters)


def test_ask_server_prints_what_local_ask_prints(run_cli, server_url, monkeypatch):
    question = [SQUARE, MOVE, "--model", "micro", "--prune", "evs", "--keep", "0.5"]
    local = run_cli(["ask", *question])
    remote = run_cli(["ask", *question, "--server", server_url])
    assert remote.exit_code == local.exit_code == 0 and remote.stdout == local.stdout == "right\n"
    monkeypatch.setenv("VIDQA_SERVER", server_url)  # scripts switch with one variable
    local_json = json.loads(run_cli(["ask", *question, "--json", "--server", ""]).stdout)
    remote_json = json.loads(run_cli(["ask", *question, "--json"]).stdout)
    assert strip_times(remote_json) == strip_times(local_json)
    table = run_cli(["ask", *question, "--stats"]).stderr
    assert "vidqa · preset evs" in table and "visual tokens before → after" in table
    missing = run_cli(["ask", SAMPLES / "missing.mp4", MOVE, "--model", "micro"])
    assert missing.exit_code == 2 and missing.stderr.strip() == f"error: video not found: {SAMPLES / 'missing.mp4'}"
    refused = run_cli(["ask", *question, "--device", "cpu"])
    assert refused.exit_code == 2 and "fixed when the server starts" in refused.stderr
    gone = run_cli(["ask", *question, "--server", "http://127.0.0.1:9"])
    assert gone.exit_code == 1 and gone.stderr.startswith("error: cannot reach the vidqa server")


def test_ask_server_imports_no_torch(server_url):
    script = ("import sys; sys.argv = ['vidqa', 'ask', sys.argv[1], 'Which way does the square move?', "
              "'--server', sys.argv[2]]\nfrom vidqa.cli.app import app\ntry:\n    app()\nexcept SystemExit:\n"
              "    pass\nprint('torch' in sys.modules, 'fastapi' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(SQUARE), server_url], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.stdout.splitlines() == ["right", "False False"], done.stderr


# --- `vidqa serve` as a process: disconnects, a kill, a restart ---------------------------------


@contextmanager
def serve_process(model: Path, video_dir: Path, port: int = 0):
    """`python -m vidqa serve` (on a free port by default) -> (process, URL); stopped (SIGTERM) after."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "vidqa", "serve", "--model", str(model), "--port", str(port),
                                "--allow-dir", str(video_dir)], stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if line.startswith("serving "):
                started.set()
        started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert started.wait(90) and process.poll() is None, "".join(lines)
        url = re.search(r"http://127\.0\.0\.1:\d+", lines[-1]).group()
        yield process, url, lines
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(30)


def health(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.load(response)


def idle(url: str, cancelled: int) -> dict:
    """/health once `cancelled` requests were cancelled and nothing runs."""
    deadline = time.monotonic() + 30
    while (state := health(url))["cancelled"] < cancelled or state["running"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def test_a_disconnect_cancels_and_a_killed_server_fails_cleanly_then_restarts(tiny_llava, square_video):
    import httpx

    from vidqa.errors import RuntimeFailure
    from vidqa.serve import client

    long = dict(body(square_video, "what happens in this video ?", max_tokens=3000, stream=True), model=str(tiny_llava))
    with serve_process(tiny_llava, square_video.parent) as (process, url, lines):
        # a client that leaves mid-answer: its generation stops, the server serves on
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=60) as reply:
            first = next(line for line in reply.iter_lines() if '"content"' in line and '"role"' not in line)
        assert first.startswith("data: ")
        assert idle(url, cancelled=1)["served"] == 0
        # not streaming: a client that gives up after 1 s cancels the same way; the tiny model may
        # finish its answer (it ends after ~180 tokens) within that second on an idle machine, and
        # then the answer must simply be whole
        try:
            whole = httpx.post(url + "/v1/chat/completions", json=dict(long, stream=False),
                               timeout=httpx.Timeout(60, read=1))
        except httpx.ReadTimeout:
            cancelled = 2
        else:
            assert whole.status_code == 200 and whole.json()["choices"][0]["finish_reason"] in ("stop", "length")
            cancelled = 1
        assert idle(url, cancelled=cancelled)["failed"] == 0
        short = dict(long, stream=False, max_tokens=3)
        answered = httpx.post(url + "/v1/chat/completions", json=short, timeout=60).json()
        assert answered["usage"]["completion_tokens"] == 3

        # the server killed mid-stream: the client's one line, not a hang or a traceback
        def kill(_piece: str) -> None:
            if process.poll() is None:
                process.kill()
                process.wait(10)

        with pytest.raises(RuntimeFailure, match="closed the connection before the answer was complete"):
            client.ask(url, long, on_text=kill)
    assert not any("Traceback" in line or "ERROR" in line for line in lines), "".join(lines)

    port = int(url.rsplit(":", 1)[1])
    with serve_process(tiny_llava, square_video.parent, port) as (process, again, lines):  # a restart, same port
        assert again == url
        record = client.ask(url, dict(long, max_tokens=3))
        assert record["stats"]["tokens"]["generated_tokens"] == 3
