"""The OpenAI chat-completions format, as `vidqa serve` speaks it.

A request is parsed here into a `ChatRequest`: the video's URL, the question, earlier turns, and
the `api.Settings` it runs with (the served model's, with the request's generation values and
its `"vidqa": {...}` options). Every problem is an `HTTPProblem`: a status and one line, the
same line the CLI prints for the same mistake where there is one. The response bodies (a
completion, a stream chunk, an error) are built here too. No web framework, no torch.
"""

from __future__ import annotations

import difflib
import json
import math
import secrets
import time
from dataclasses import dataclass, field

from vidqa import api
from vidqa.errors import BadInput

# the "vidqa" field's keys: the Settings fields they set (docs/serve.md); `decode` (the decode path)
# where this vidqa's Settings has it
VIDQA_OPTIONS = ("prune", "keep", "flops", "params", "frames", "fps", "start", "end") + tuple(
    name for name in ("decode",) if name in api.Settings.__dataclass_fields__)
# OpenAI fields with a meaning vidqa does not implement: refused unless left at their neutral value
UNSUPPORTED = {"n": (None, 1), "top_p": (None, 1, 1.0), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logprobs": (None, False), "top_logprobs": (None, 0),
               "stop": (None, [], ""), "tools": (None, []), "logit_bias": (None, {})}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error"}


class HTTPProblem(BadInput):
    """Bad input with the HTTP status that says whose it is (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ChatRequest:
    """One chat-completions request, checked."""

    video: str  # the video_url's url: a path, file://, data: or http(s)
    question: str
    history: tuple[tuple[str, str], ...]  # earlier (question, answer) turns about the video
    settings: api.Settings
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat(body: bytes, served: api.Settings, served_name: str, system_prompt: str | None) -> ChatRequest:
    """Check a request body against the served model -> ChatRequest (HTTPProblem if it is wrong)."""
    data = _json_object(body)
    model = data.get("model")
    if model is not None and model != served_name:
        raise HTTPProblem(f"model '{model}' is not served here; this server serves '{served_name}' "
                          "(GET /v1/models)", 404)
    for name, neutral in UNSUPPORTED.items():
        if name in data and data[name] not in neutral:
            raise HTTPProblem(f"'{name}' is not supported by vidqa serve; leave it out")
    video, question, history = _conversation(data.get("messages"), system_prompt)
    stream = _bool(data, "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise HTTPProblem("'stream_options' must be an object, e.g. {\"include_usage\": true}")
    changes = _generation(data) | _vidqa_options(data.get("vidqa"))
    return ChatRequest(video=video, question=question, history=history, settings=served.replace(**changes),
                       stream=stream, include_usage=stream and _bool(options, "include_usage"))


def _json_object(body: bytes) -> dict:
    if not body.strip():
        raise HTTPProblem("the request body is empty; send a JSON chat-completions request")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise HTTPProblem("the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as error:
        raise HTTPProblem(f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise HTTPProblem("the request body must be a JSON object with 'model' and 'messages'")
    return data


def _conversation(messages, system_prompt: str | None) -> tuple[str, str, tuple]:
    """-> (video url, the question, earlier turns). The video comes in a user message; the last
    message is the user's question; user and assistant turns alternate before it."""
    if not isinstance(messages, list) or not messages:
        raise HTTPProblem("'messages' must be a non-empty list of {role, content} objects")
    videos: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, text) after the system message
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise HTTPProblem(f"messages[{number - 1}] must be an object with 'role' and 'content'")
        role = message.get("role")
        text = _content(message.get("content"), number - 1, videos, allow_video=role == "user")
        if role in ("system", "developer"):
            if turns:
                raise HTTPProblem("the system message must come first")
            if (text or None) != (system_prompt or None):
                raise HTTPProblem("this server's system prompt is fixed when it starts (vidqa serve --system); "
                                  "leave the system message out or send exactly that one")
        elif role in ("user", "assistant"):
            turns.append((role, text))
        else:
            raise HTTPProblem(f"messages[{number - 1}]: role '{role}' is not supported; use system, user or assistant")
    if len(videos) != 1:
        raise HTTPProblem("give exactly one video per request, as a content part "
                          "{\"type\": \"video_url\", \"video_url\": {\"url\": \"file:///path/clip.mp4\"}}"
                          if not videos else f"give exactly one video per request, got {len(videos)}")
    expected = ["user", "assistant"] * len(turns)
    if [role for role, _ in turns] != expected[:len(turns)] or turns[-1][0] != "user":
        raise HTTPProblem("the messages must alternate user and assistant, starting and ending with the user")
    question = turns[-1][1].strip()
    if not question:
        raise HTTPProblem("the question is empty; put it in the last user message as text")
    history = tuple((turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2))
    return videos[0], question, history


def _content(content, index: int, videos: list[str], allow_video: bool) -> str:
    """A message's text; its video_url parts go to `videos`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise HTTPProblem(f"messages[{index}].content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "video_url" and allow_video:
            url = part.get("video_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.strip():
                raise HTTPProblem(f"messages[{index}]: video_url needs a 'url' (a file:// URL or a path)")
            videos.append(url.strip())
        elif kind in ("image_url", "input_audio", "audio_url", "file"):
            raise HTTPProblem(f"messages[{index}]: '{kind}' content is not supported; give one video as video_url")
        elif kind == "video_url":
            raise HTTPProblem(f"messages[{index}]: only a user message may carry the video")
        else:
            raise HTTPProblem(f"messages[{index}]: unknown content part {json.dumps(part)[:80]}; "
                              "use {\"type\": \"text\"} and {\"type\": \"video_url\"}")
    return "\n".join(texts)


def _generation(data: dict) -> dict:
    """OpenAI's generation fields -> Settings changes; a missing temperature is vidqa's greedy
    default (not OpenAI's 1), so a request without one answers as `vidqa ask` does."""
    changes: dict = {}
    for name in ("max_completion_tokens", "max_tokens"):
        if data.get(name) is not None:
            changes["max_new_tokens"] = _number(data, name, int, minimum=1)
            break
    if data.get("temperature") is not None:
        changes["temperature"] = _number(data, "temperature", float, minimum=0)
    if data.get("seed") is not None:
        changes["seed"] = _number(data, "seed", int)
    return changes


def _vidqa_options(options) -> dict:
    """The request's own "vidqa": {...} field -> Settings changes."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise HTTPProblem("'vidqa' must be an object, e.g. {\"prune\": \"evs\", \"keep\": 0.3}")
    unknown = sorted(set(options) - set(VIDQA_OPTIONS))
    if unknown:
        raise HTTPProblem(f"unknown vidqa option '{unknown[0]}'; valid: {', '.join(VIDQA_OPTIONS)}")
    changes: dict = {}
    if options.get("prune") is not None:
        changes["prune"] = _preset_name(options["prune"])
    for name in ("keep", "flops", "fps", "start", "end"):
        if options.get(name) is not None:
            changes[name] = _number(options, name, float, where="vidqa.")
    if options.get("frames") is not None:
        changes["frames"] = _number(options, "frames", int, where="vidqa.")
    if options.get("params") is not None:
        changes["params"] = _params(options["params"])
    if options.get("decode") is not None:
        if not isinstance(options["decode"], str):
            raise HTTPProblem("'vidqa.decode' must be a string, e.g. \"auto\"")
        changes["decode"] = options["decode"]  # checked with the other settings (api.check_settings)
    return changes


def _preset_name(name) -> str:
    """A preset's name, or a frame selector's, or `SELECTOR+PRESET` of two names (not .yaml paths:
    the server reads no file a client names, but videos)."""
    from vidqa.pruning.core.presets import available_presets, frame_selectors

    if not isinstance(name, str) or not name.strip():
        raise HTTPProblem("vidqa.prune must be a preset name, e.g. \"evs\" (`vidqa presets` lists them)")
    name, presets, selectors = name.strip(), available_presets(), frame_selectors()
    known = {**presets, **selectors}
    parts = [part.strip() for part in name.split("+")]
    if all(part in known for part in parts):
        return "+".join(parts)  # the order and the count are checked where the preset loads
    available = f"available: {', '.join(presets)}; frame selectors: {', '.join(selectors)}"
    if name.endswith((".yaml", ".yml")) or "/" in name:
        raise HTTPProblem(f"vidqa.prune '{name}': the server takes preset names, not files; {available}")
    unknown = next(part for part in parts if part not in known)
    close = difflib.get_close_matches(unknown, list(known), n=1)
    suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    raise HTTPProblem(f"unknown preset '{unknown}'{suggestion}; {available}")


def _params(params) -> tuple[str, ...]:
    """-P overrides: ["ratio=0.3", ...] or {"ratio": 0.3, ...}."""
    if isinstance(params, dict):
        return tuple(f"{key}={json.dumps(value) if isinstance(value, bool) else value}"
                     for key, value in params.items())
    if isinstance(params, list) and all(isinstance(item, str) for item in params):
        for item in params:
            key, sep, _ = item.partition("=")
            if not sep or not key.strip():
                raise BadInput(f"-P expects key=value, got '{item}'")
        return tuple(params)
    raise HTTPProblem("vidqa.params must be a list of \"key=value\" strings or an object {\"key\": value}")


def _number(data: dict, name: str, kind: type, minimum: float | None = None, where: str = ""):
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        what = "an integer" if kind is int else "a number"
        raise HTTPProblem(f"'{where}{name}' must be {what}, got {json.dumps(value)[:40]}")
    if not math.isfinite(value):
        raise HTTPProblem(f"'{where}{name}' must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise HTTPProblem(f"'{where}{name}' must be at least {minimum:g}, got {value:g}")
    return kind(value)


def _bool(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HTTPProblem(f"'{name}' must be true or false, got {json.dumps(value)[:40]}")
    return value


# --- responses -------------------------------------------------------------------------------


def usage(record: dict, cached_tokens: int) -> dict:
    """OpenAI's usage: the prompt the LLM read (after pruning) and the tokens generated;
    cached_tokens: the video prefix's rows when they came from the session cache."""
    tokens = record["stats"]["tokens"]
    prompt, completion = tokens["llm_prompt_tokens"], tokens["generated_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(record: dict) -> str:
    generated = record["stats"]["tokens"]["generated_tokens"]
    return "length" if generated >= record["parameters"]["max_new_tokens"] else "stop"


def completion(request: ChatRequest, model: str, record: dict, cached_tokens: int) -> dict:
    """The non-streaming response; `vidqa` is the `vidqa ask --json` record."""
    return {
        "id": request.id, "object": "chat.completion", "created": request.created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": record["answer"]},
                     "finish_reason": finish_reason(record), "logprobs": None}],
        "usage": usage(record, cached_tokens), "vidqa": record,
    }


def chunk(request: ChatRequest, model: str, delta: dict, finish: str | None = None, **extra) -> dict:
    """One streamed chunk; the last one (finish set) carries `vidqa`, the `--json` record."""
    choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if delta is not None else []
    return {"id": request.id, "object": "chat.completion.chunk", "created": request.created, "model": model,
            "choices": choices, **extra}


def error_body(message: str, status: int) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
