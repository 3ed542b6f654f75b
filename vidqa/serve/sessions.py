"""The server's prepared videos: an LRU of `api.Session`s under a byte budget.

A session holds a video decoded, encoded, pruned and (for `none` and question-agnostic pre-LLM
presets) prefilled: the same prefix reuse as `vidqa chat` (vidqa/engine/session.py). It is keyed
by the video's identity (resolved path, mtime and size; or an upload's SHA-256) and everything
that shapes the prefix: the frame settings, the preset, its budget and its -P overrides.
Generation values (max tokens, temperature, seed) are per request and not part of the key.

Sessions of one clip (same video and frames, different presets) share its decoded frames and its
vision-encoder output, as `vidqa batch`'s ClipCache does. Bytes are counted per session (frames,
encoder output, pruned tokens, KV prefix; shared parts counted in each, so the count errs high);
after each request the least recently used sessions are evicted until the total fits, the one
just used always kept. Used by the one worker thread only: no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

from vidqa import api
from vidqa.serve.media import Video


@dataclass
class Entry:
    session: api.Session
    clip_key: tuple
    encoded: dict  # the vision-encoder output of its clip (engine.encoded_video's cache), shared by clip
    bytes: int = 0
    fresh: bool = True  # not asked yet: its first answer carries the decode time (session.decode_stats)


# the Settings that change only how a request generates, never its video prefix (`decode`: the
# decode path, where this vidqa has it)
PER_REQUEST = tuple(name for name in ("max_new_tokens", "temperature", "seed", "decode")
                    if name in {field.name for field in fields(api.Settings)})


def prefix_settings(settings: api.Settings) -> api.Settings:
    """The settings a session is made with: the request's, generation values at their defaults
    (they are set per request; the record's `parameters` gets the request's own)."""
    defaults = api.Settings()
    return settings.replace(**{name: getattr(defaults, name) for name in PER_REQUEST})


def clip_key(video: Video, settings: api.Settings) -> tuple:
    return (video.identity, settings.frames, settings.fps, settings.start, settings.end)


def session_key(video: Video, settings: api.Settings) -> tuple:
    return clip_key(video, settings) + (settings.prune, settings.keep, settings.flops, tuple(settings.params))


class SessionCache:
    """Prepared videos for one model, least recently used first."""

    def __init__(self, model: api.Model, max_bytes: int):
        self.model, self.max_bytes = model, max_bytes
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    @property
    def bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries.values())

    def get(self, video: Video, settings: api.Settings) -> tuple[tuple, Entry]:
        """(key, entry) for this video and settings: cached, or decoded now (nothing is prepared
        until the first question: the session prepares itself then)."""
        key = session_key(video, settings)
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            self.entries.move_to_end(key)
            return key, entry
        self.misses += 1
        same_clip = next((e for e in self.entries.values() if e.clip_key == clip_key(video, settings)), None)
        if same_clip is not None:  # another preset on the same frames: no decode, no encode
            source, encoded = same_clip.session.clip, same_clip.encoded
        else:
            source, encoded = video.path, {}
        # its own Model wrapper: the wrapper's per-settings memos then live and die with the session
        wrapper = api.Model(self.model.adapter, self.model.settings)
        session = wrapper.session(source, prefix_settings(settings), encoded_cache=encoded)
        entry = self.entries[key] = Entry(session, clip_key(video, settings), encoded)
        return key, entry

    def settle(self, key: tuple) -> None:
        """After a request: count the entry's bytes, then evict the oldest until the rest fits."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.bytes = session_bytes(entry)
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            oldest = next(iter(self.entries))
            if oldest == key:
                self.entries.move_to_end(key)
                continue
            self.drop(oldest)
            self.evictions += 1

    def drop(self, key: tuple) -> None:
        self.entries.pop(key, None)

    def clear(self) -> None:
        self.entries.clear()

    def summary(self) -> dict:
        return {"sessions": len(self.entries), "bytes": self.bytes, "budget_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def session_bytes(entry: Entry) -> int:
    """What the entry holds: frames, encoder output, the pruned tokens and the KV prefix."""
    video = entry.session.video
    total = video.clip.pixel_bytes + tensor_bytes(list(entry.encoded.values()))
    prefix = video.prefix
    if prefix is not None:
        total += tensor_bytes([prefix.tokens, prefix.ids, prefix.positions, prefix.cache])
    return total


def tensor_bytes(value, depth: int = 0, seen: set | None = None) -> int:
    """Bytes of the tensors reachable from `value` through containers and plain objects (a few
    levels deep; modules, whose weights are the model's, are skipped)."""
    import torch

    seen = set() if seen is None else seen
    if value is None or id(value) in seen or depth > 5 or isinstance(value, (str, bytes, int, float, torch.nn.Module)):
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return 0
    return sum(tensor_bytes(item, depth + 1, seen) for item in items)
