"""Measure `vidqa serve` against its goals (issue #32), offline, with the bundled micro model:

1. time to first token (streamed, seen by the client) of a second question on an already
   served video vs the first question's (goal: <= 1/5);
2. N requests in a row (mixed presets, the 3 sample videos, streaming and not) through the
   official openai client: errors, answers identical to the local API (what `vidqa ask` runs;
   a few are also checked against the `vidqa ask` command itself), the server's RSS after
   warm-up vs at the end;
3. bad requests (malformed JSON, unknown preset, missing file, outside --allow-dir, huge body,
   wrong API key): each a 4xx with one line, the server still serving;
4. the server killed mid-stream under `vidqa ask --server` (a tiny random model, whose answers
   are long): the client's exit code and its one line; a restart serves again.

    python benchmarks/serve.py [--requests 100] [--json out.json]

Needs the serve extra and openai (pip install -e ".[serve,test]"). Prints a summary; the
figures in docs/serve.md come from it. Timings depend on the machine's load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
VIDEOS = ("square.mp4", "left.mp4", "background.mp4")
PRESETS = ({}, {"prune": "evs", "keep": 0.3}, {"prune": "vidcom2", "keep": 0.5}, {"prune": "visionzip", "keep": 0.5},
           {"prune": "fastv", "keep": 0.5})
KEY = "bench-key"
THREADS = 0  # --server-threads: OMP_NUM_THREADS for the server (0: torch's default)


@contextmanager
def server(model: str, *extra: str):
    """`python -m vidqa serve` on a free port -> (process, url)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", VIDQA_API_KEY=KEY)
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)  # torch's intra-op threads in the server
    process = subprocess.Popen([sys.executable, "-m", "vidqa", "serve", "--model", model, "--port", "0", *extra],
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines, started = [], threading.Event()

    def read():
        for line in process.stderr:
            lines.append(line)
            if line.startswith("serving "):
                started.set()
        started.set()

    threading.Thread(target=read, daemon=True).start()
    started.wait(120)
    if process.poll() is not None:
        raise SystemExit("the server did not start:\n" + "".join(lines))
    try:
        yield process, re.search(r"http://[\d.]+:\d+", lines[-1]).group(), lines
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(30)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def get(url: str, path: str) -> dict:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def content(video: str, question: str) -> list[dict]:
    """A user message: the video (a sample's name or a path) and the question."""
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{SAMPLES / video}"}},
                                         {"type": "text", "text": question}]}]


def first_token_s(client, video: str, question: str, options: dict) -> tuple[float, str, dict]:
    """Seconds from the request to the first streamed piece of the answer; the answer; the record."""
    start = time.perf_counter()
    first, pieces, record = None, [], None
    for chunk in client.chat.completions.create(model="micro", messages=content(video, question), stream=True,
                                                extra_body={"vidqa": options}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
        record = (chunk.model_extra or {}).get("vidqa", record)
    return first, "".join(pieces).strip(), record


def questions() -> dict[str, list[str]]:
    import csv

    rows: dict[str, list[str]] = {}
    with open(SAMPLES / "questions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(row["video"], []).append(row["question"])
    return rows


def phases(record: dict) -> dict:
    """Where a request's time went on the server (the record's stats.time), in ms; `first_token`:
    the phases up to the first logits (the engine's time to first token)."""
    time_ = record["stats"]["time"]
    keys = ("video_decode_s", "preprocess_s", "vision_encoder_s", "pruning_s", "video_prefill_s", "prefill_s",
            "decode_s", "total_s")
    out = {key.removesuffix("_s"): round(time_[key] * 1000, 1) for key in keys}
    out["first_token"] = round(sum(time_[key] for key in keys[:6]) * 1000, 1)
    return out


def long_clip(folder: Path, frames: int) -> Path:
    """A longer clip of micro's world (a square moving right, red to blue; 112 px, 8 fps)."""
    from vidqa.testing.videos import moving_square_frames, write_video

    return write_video(folder / f"long-{frames}.mp4",
                       moving_square_frames(num_frames=frames, size=(112, 112), end_color=(0, 0, 255)), fps=8.0)


def measure_first_token(client, copies: Path, sources: dict[str, Path], frames: int | None = None) -> dict:
    """Time to first token of the first question on a video the server has not seen (decode,
    encode, prune, prefill the video, then the question) vs the median of 3 more questions on it
    (the question's rows only): as the client sees it (the first streamed text) and inside the
    engine (`phases`). Each (video, preset) is a fresh copy: a new file is a new video to the
    server's cache (its key is the path, mtime and size). frames: None = micro's own 8."""
    import shutil

    asked = questions()
    rows = []
    for copy in range(2):
        for name, source in sources.items():
            for options in ({}, {"prune": "evs", "keep": 0.3}):
                options = options | ({"frames": frames} if frames else {})
                fresh = copies / f"{source.stem}-{copy}-{options.get('prune', 'none')}-{frames}.mp4"
                shutil.copyfile(source, fresh)
                cold, _, record = first_token_s(client, str(fresh), asked[name][0], options)
                assert record["stats"]["time"]["video_decode_s"] > 0 and not record["stats"]["prefix_reused"]
                warm = [first_token_s(client, str(fresh), question, options) for question in asked[name][1:4]]
                assert all(r["stats"]["prefix_reused"] for _, _, r in warm)
                second = statistics.median(t for t, _, _ in warm)
                first_phases = phases(record)
                second_first_token = statistics.median(phases(r)["first_token"] for _, _, r in warm)
                rows.append({"video": source.name, "preset": options.get("prune", "none"),
                             "visual_tokens": record["stats"]["tokens"]["visual_tokens_before"],
                             "first_s": round(cold, 4), "second_s": round(second, 4), "ratio": round(second / cold, 3),
                             "engine_ratio": round(second_first_token / first_phases["first_token"], 3),
                             "first_phases": first_phases,
                             "second_phases": phases(min(warm, key=lambda w: abs(w[0] - second))[2])})
    return {"median_first_s": statistics.median(r["first_s"] for r in rows),
            "median_second_s": statistics.median(r["second_s"] for r in rows),
            "median_ratio": statistics.median(r["ratio"] for r in rows),
            "worst_ratio": max(r["ratio"] for r in rows),
            "median_engine_ratio": statistics.median(r["engine_ratio"] for r in rows), "rows": rows}


def run_requests(client, url: str, pid: int, count: int) -> dict:
    """`count` requests in a row; each answer compared with the local API's for the same settings."""
    from vidqa import api

    local_model = api.open_model(api.Settings(model="micro"))
    asked, local, rss, errors, mismatches = questions(), {}, [], [], []
    for number in range(count):
        video = VIDEOS[number % 3]
        question = asked[video][(number // 3) % len(asked[video])]
        options = PRESETS[(number // 2) % len(PRESETS)]
        key = (video, question, options.get("prune", "none"), options.get("keep"))
        if key not in local:
            local[key] = local_model.ask(SAMPLES / video, question, prune=key[2], keep=key[3]).text
        try:
            if number % 2:
                _, answer, _ = first_token_s(client, video, question, options)
            else:
                reply = client.chat.completions.create(model="micro", messages=content(video, question),
                                                       extra_body={"vidqa": options})
                answer = reply.choices[0].message.content
            if answer != local[key]:
                mismatches.append({"request": number, "server": answer, "local": local[key], "settings": key})
        except Exception as error:  # noqa: BLE001  (counted: the goal is none)
            errors.append(f"{number}: {type(error).__name__}: {error}")
        if number % 10 == 9:
            rss.append(round(rss_mib(pid), 1))
    cli = []
    for video, question, options in (("square.mp4", asked["square.mp4"][2], {}),
                                     ("left.mp4", asked["left.mp4"][0], {"prune": "evs", "keep": 0.3}),
                                     ("background.mp4", asked["background.mp4"][5], {"prune": "fastv", "keep": 0.5})):
        flags = ["--prune", options["prune"], "--keep", str(options["keep"])] if options else []
        command = [sys.executable, "-m", "vidqa", "ask", str(SAMPLES / video), question, "--model", "micro", *flags]
        here = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False).stdout
        there = subprocess.run(command + ["--server", url], capture_output=True, text=True, cwd=ROOT,
                               env=dict(os.environ, VIDQA_API_KEY=KEY), check=False).stdout
        cli.append({"video": video, "question": question, "local": here, "server": there, "same": here == there})
    return {"requests": count, "errors": errors, "mismatches": mismatches, "rss_mib_every_10": rss,
            "cache": get(url, "/health")["cache"], "cli": cli}


def bad_requests(url: str) -> list[dict]:
    import httpx

    good = {"model": "micro", "messages": content("square.mp4", "which way does the square move ?")}
    cases = {
        "malformed JSON": (b'{"model": "micro", "messages": [', KEY),
        "unknown preset": (json.dumps(good | {"vidqa": {"prune": "evz"}}).encode(), KEY),
        "missing file": (json.dumps(good | {"messages": content("missing.mp4", "?")}).encode(), KEY),
        "outside --allow-dir": (json.dumps(good | {"messages": content("/etc/hostname", "?")}).encode(), KEY),
        "huge body": (b"{" + b" " * (65 * 2**20) + b"}", KEY),
        "wrong API key": (json.dumps(good).encode(), "wrong"),
    }
    rows = []
    for name, (data, key) in cases.items():
        reply = httpx.post(url + "/v1/chat/completions", content=data, timeout=60,
                           headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        message = reply.json()["error"]["message"]
        rows.append({"case": name, "status": reply.status_code, "message": message,
                     "one_line": "\n" not in message and "Traceback" not in reply.text})
    still = httpx.post(url + "/v1/chat/completions", json=good, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    rows.append({"case": "then a good request", "status": still.status_code,
                 "message": still.json()["choices"][0]["message"]["content"], "one_line": True})
    return rows


def kill_mid_stream() -> dict:
    """`vidqa ask --server` streaming a long answer from a tiny random model; the server killed."""
    from vidqa.testing.builders import build_tiny_llava_onevision

    folder = Path(tempfile.mkdtemp(prefix="vidqa-bench-serve-"))
    model = str(build_tiny_llava_onevision(folder / "tiny"))
    video = str(SAMPLES / "square.mp4")
    ask = [sys.executable, "-m", "vidqa", "ask", video, "what happens ?", "--model", model]
    env = dict(os.environ, VIDQA_API_KEY=KEY)
    with server(model) as (process, url, _):
        client = subprocess.Popen(ask + ["--server", url, "--max-new-tokens", "3000"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, cwd=ROOT)
        streamed = client.stdout.read(20)  # the answer is streaming
        process.kill()
        _, stderr = client.communicate(timeout=60)
    result = {"streamed_before_kill": len(streamed), "client_exit": client.returncode,
              "client_stderr": stderr.decode().strip()}
    with server(model) as (process, url, _):
        again = subprocess.run(ask + ["--server", url, "--max-new-tokens", "3"], capture_output=True, env=env, cwd=ROOT,
                               check=False)
    result.update(restart_exit=again.returncode, restart_answer=again.stdout.decode().strip()[:40])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--server-threads", type=int, default=0,
                        help="OMP_NUM_THREADS for the server (default: torch's own choice)")
    args = parser.parse_args()
    import openai

    global THREADS
    THREADS = args.server_threads
    report = {"cpus": os.cpu_count(), "server_threads": THREADS or None, "load_before": os.getloadavg()}
    copies = Path(tempfile.mkdtemp(prefix="vidqa-bench-videos-"))
    with server("micro", "--allow-dir", str(SAMPLES), "--allow-dir", str(copies)) as (process, url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        report["rss_mib_started"] = round(rss_mib(process.pid), 1)
        asked = questions()
        for number in range(3):  # warm-up: torch's first calls, the allocator
            first_token_s(client, "background.mp4", asked["background.mp4"][number], {"prune": "fastv", "keep": 0.5})
        report["first_token"] = measure_first_token(client, copies, {video: SAMPLES / video for video in VIDEOS})
        # the same on a 64-frame clip of micro's world (1024 visual tokens, 8x the samples'): the
        # video's share of a first request grows with its length, a question's does not
        report["first_token_64_frames"] = measure_first_token(client, copies, {"square.mp4": long_clip(copies, 64)},
                                                              frames=64)
        report["in_a_row"] = run_requests(client, url, process.pid, args.requests)
        report["bad_requests"] = bad_requests(url)
    report["kill"] = kill_mid_stream()
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
