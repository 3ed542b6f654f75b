"""Load a video as a clip of sampled RGB frames.

`load_clip` picks frame indices (uniformly, LLaVA-OneVision style, at a fixed rate, or by a model
family's reference rule: `UniformFrames`, `QwenVLFrames`, `SmolVLMFrames`) inside an optional
[start, end) window and decodes them with decord, falling back to OpenCV when decord is not
installed or fails. Time and frame index are tied by `time = index / fps` everywhere (window
selection and `Clip.timestamps`), so both decoders give the same indices for the same file.

Anything wrong with the path, the options or the file raises `BadInput` with one line naming the
bad value. A file that ends early (truncated after its index) is read as far as it goes: the frames
that decode are kept and a note says how many were lost; `BadInput` only if none decodes. (A
truncated mp4 whose index comes last, as OpenCV writes them, cannot be opened at all: `BadInput`.)

Long videos (engine/streaming.py): `plan_clip` chooses the frames without decoding any (a `Clip`
whose `frames` is None) and `clip_chunks` decodes them a chunk at a time, so the decoded pixels
held at once are one chunk's, whatever the video's length.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from vidqa.errors import BadInput
from vidqa.video.frame_rules import FrameRule

_EPS = 1e-6  # slack for float times such as 0.1 * 30 = 3.0000000000000004


@dataclass(frozen=True, eq=False)
class Clip:
    """Frames sampled from one video.

    frames: uint8 [T, H, W, 3] RGB, or None for a planned clip whose frames are decoded a chunk at
    a time (`plan_clip`, `clip_chunks`). indices: int [T], increasing source frame indices.
    timestamps: float [T], seconds (index / fps). fps, duration (s), total_frames: the whole
    source. decoder: "decord" or "opencv". notes: warnings for the user (clamping, fallbacks).
    sample_fps: the sampling rate the family's reference pipeline reports for these frames (set by
    the `sampling` rule that chose them, e.g. qwen-vl-utils' nframes / total * fps), else None.
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float
    duration: float
    total_frames: int
    decoder: str
    notes: list[str] = field(default_factory=list)
    sample_fps: float | None = None
    path: Path | None = None  # the file, for a planned clip's chunks

    @property
    def num_frames(self) -> int:
        return int(len(self.indices))

    @property
    def pixel_bytes(self) -> int:
        """Bytes of decoded pixels the clip holds (0 while planned: nothing is decoded yet)."""
        return 0 if self.frames is None else int(self.frames.nbytes)

    @property
    def planned(self) -> bool:
        """True when the frames are not decoded yet (`clip_chunks` reads them)."""
        return self.frames is None


class _DecodeFailed(Exception):
    """A decoder could not open or read the file; the message is a short reason."""


def load_clip(
    path: str | os.PathLike,
    num_frames: int | None = 32,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    sampling: FrameRule | None = None,
) -> Clip:
    """Sample frames of `path` from the window [start, end) seconds (default: the whole video).

    With `fps`: the frames nearest to times start, start + 1/fps, ... < end (every frame if fps
    is at or above the video's). With `num_frames`: `linspace(first, last, num_frames).round()`
    over the window's frame indices, clamped (and a note) to the frames the window has. With
    neither, `sampling` (a model family's reference rule, `vidqa.video.frame_rules`) chooses.
    """
    return _sample(path, num_frames, fps, start, end, sampling, decode=True)


def plan_clip(
    path: str | os.PathLike,
    num_frames: int | None = 32,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    sampling: FrameRule | None = None,
) -> Clip:
    """The frames `load_clip` would sample, not decoded: a Clip with `frames` None, read a chunk at
    a time by `clip_chunks`. Opens the file (its length and rate), decodes nothing."""
    return _sample(path, num_frames, fps, start, end, sampling, decode=False)


def _sample(path, num_frames, fps, start, end, sampling, decode: bool) -> Clip:
    video = check_video_path(path)
    check_frame_options(1 if num_frames is None and sampling is not None else num_frames, fps, start, end)
    if video.stat().st_size == 0:
        raise _unreadable(video, "empty file, 0 bytes")

    notes: list[str] = []
    decord_failure = None
    try:
        opened = _decord_open(video)  # None when decord is not installed
    except _DecodeFailed as error:
        opened, decord_failure = None, str(error)
    try:
        reader, total, src_fps = opened or (None, *_opencv_probe(video))
    except _DecodeFailed as error:
        raise _unreadable(video, error) from None
    if not (math.isfinite(src_fps) and src_fps > 0):
        notes.append("the video reports no frame rate; assuming 30 fps for timestamps")
        src_fps = 30.0

    rule = sampling if num_frames is None and fps is None else None
    indices, sample_fps = _plan_indices(total, src_fps, num_frames, fps, start, end, notes, rule)
    planned = len(indices)
    decoder, frames = ("decord" if reader is not None else "opencv"), None
    if decode:
        if reader is not None:
            try:
                frames = _decord_read(reader, indices)
            except _DecodeFailed as error:
                decord_failure = str(error)
        if frames is None:
            decoder = "opencv"
            if decord_failure is not None:
                notes.append(f"decord could not read the video ({decord_failure}); used OpenCV")
            try:
                frames, indices = _opencv_read(video, indices, notes)
            except _DecodeFailed as error:
                raise _unreadable(video, error) from None
    elif decord_failure is not None:
        notes.append(f"decord could not read the video ({decord_failure}); used OpenCV")

    return Clip(frames=frames, indices=indices, timestamps=indices / src_fps, fps=float(src_fps),
                duration=total / src_fps, total_frames=int(total), decoder=decoder, notes=notes,
                sample_fps=sample_fps if len(indices) == planned else None,  # a truncated file: no longer the rule's rate
                path=video)


def load_frames(clip: Clip) -> Clip:
    """A planned clip with every frame decoded at once (as `load_clip` decodes them: a file that
    ends early keeps the frames that decode, with a note); a decoded clip as it is."""
    if clip.frames is not None:
        return clip
    notes, frames, indices, decoder = list(clip.notes), None, clip.indices, "decord"
    try:
        reader = _decord_reader(clip)
        frames = _decord_read(reader, indices) if reader is not None else None
    except _DecodeFailed as error:
        notes.append(f"decord could not read the video ({error}); used OpenCV")
    if frames is None:
        decoder = "opencv"
        try:
            frames, indices = _opencv_read(clip.path, indices, notes)
        except _DecodeFailed as error:
            raise _unreadable(clip.path, error) from None
    whole = len(indices) == clip.num_frames
    return replace(clip, frames=frames, indices=indices, timestamps=indices / clip.fps, decoder=decoder, notes=notes,
                   sample_fps=clip.sample_fps if whole else None)


def clip_chunks(clip: Clip, chunk_frames: int):
    """Decode a planned clip's frames `chunk_frames` at a time, in order: yields Clips (frames
    set) whose indices and timestamps are consecutive slices of `clip`'s. A decoded clip is
    sliced. A file that ends before the plan's last frame is a one-line BadInput (the streamed
    prompt was laid out for every planned frame)."""
    count = clip.num_frames
    if clip.frames is not None:
        for first in range(0, count, chunk_frames):
            part = slice(first, first + chunk_frames)
            yield replace(clip, frames=clip.frames[part], indices=clip.indices[part], timestamps=clip.timestamps[part])
        return
    try:
        reader = _decord_reader(clip)
    except _DecodeFailed:
        reader = None  # OpenCV reads it
    pieces = (_decord_chunks(reader, clip.indices, chunk_frames) if reader is not None
              else _opencv_chunks(clip.path, clip.indices, chunk_frames))
    first = 0
    for frames in pieces:
        part = slice(first, first + len(frames))
        yield replace(clip, frames=frames, indices=clip.indices[part], timestamps=clip.timestamps[part])
        first += len(frames)
    if first < count:
        raise BadInput(f"{clip.path}: only {first} of the {count} planned frames could be decoded (the file ends "
                       f"early); pass --end {_sec(float(clip.timestamps[max(first - 1, 0)]))} or re-encode the file")


def _decord_reader(clip: Clip):
    """decord's reader for a planned clip that decord opened, else None (OpenCV reads it)."""
    if clip.decoder != "decord":
        return None
    opened = _decord_open(clip.path)
    return None if opened is None else opened[0]


def _decord_chunks(reader, indices: np.ndarray, chunk_frames: int):
    for first in range(0, len(indices), chunk_frames):
        yield _decord_read(reader, indices[first:first + chunk_frames])


def _opencv_chunks(video: Path, indices: np.ndarray, chunk_frames: int):
    """uint8 [<= chunk_frames, H, W, 3] RGB pieces of `indices`, read in one sequential pass."""
    wanted = iter(int(i) for i in indices)
    target = next(wanted, None)
    capture = cv2.VideoCapture(str(video))
    try:
        if not capture.isOpened():
            raise BadInput(f"cannot decode video {video}: OpenCV could not open it")
        frames, index = [], 0
        while target is not None:
            if index < target:
                if not capture.grab():
                    break
            else:
                ok, frame = capture.read()
                if not ok or frame is None:
                    break
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                target = next(wanted, None)
                if len(frames) == chunk_frames:
                    yield np.stack(frames)
                    frames = []
            index += 1
        if frames:
            yield np.stack(frames)
    finally:
        capture.release()


def check_video_path(path: str | Path) -> Path:
    """The path as a Path when it names an existing file (checked before anything heavy loads)."""
    video = Path(path)
    if not video.exists():
        raise BadInput(f"video not found: {video}")
    if video.is_dir():
        raise BadInput(f"video path is a directory, not a file: {video}; give a video file")
    return video


def _unreadable(video: Path, reason) -> BadInput:
    return BadInput(f"cannot decode video {video}: not a readable video file ({reason})")


def check_frame_options(num_frames, fps, start, end) -> None:
    if fps is not None:
        if not fps > 0:
            raise BadInput(f"--fps must be greater than 0, got {fps:g}")
    elif num_frames is None:
        raise BadInput("give a number of frames (--frames N) or a sampling rate (--fps F)")
    elif num_frames < 1:
        raise BadInput(f"--frames must be at least 1, got {num_frames}")
    if start is not None and not start >= 0:
        raise BadInput(f"--start must be 0 seconds or more, got {_sec(start)}s")
    if end is not None and not end > (start or 0.0):
        raise BadInput(f"--end {_sec(end)}s must be after --start {_sec(start or 0.0)}s")


def _plan_indices(total, src_fps, num_frames, fps, start, end, notes, rule=None):
    """(frame indices to decode: int [T], increasing, unique, inside the window; the rule's
    sampling rate or None)."""
    duration = total / src_fps
    t0 = 0.0 if start is None else float(start)
    if t0 >= duration:
        raise BadInput(f"--start {_sec(t0)}s is past the end of the video ({_sec(duration)}s)")
    t1 = duration if end is None else float(end)
    if t1 > duration:
        if math.isfinite(t1):
            notes.append(f"--end {_sec(t1)}s is past the end of the video ({_sec(duration)}s)")
        t1 = duration
    first = math.ceil(t0 * src_fps - _EPS)  # frames whose time index / fps is in [t0, t1)
    last = min(total, math.ceil(t1 * src_fps - _EPS)) - 1
    if last < first:
        raise BadInput(f"the window {_sec(t0)}s-{_sec(t1)}s contains no frames (the video is "
                       f"{src_fps:g} fps); widen --start/--end")
    available = last - first + 1

    if rule is not None:
        plan = rule.plan(available, src_fps)
        if plan.note:
            notes.append(plan.note)
        return first + plan.offsets, plan.sample_fps
    return _plan_fixed(first, last, t0, t1, src_fps, num_frames, fps, notes), None


def _plan_fixed(first, last, t0, t1, src_fps, num_frames, fps, notes) -> np.ndarray:
    """--fps or --frames sampling over the window's frames first..last (times t0..t1)."""
    available = last - first + 1
    if fps is not None and fps >= src_fps:
        if fps > src_fps:
            notes.append(f"--fps {fps:g} is above the video's {src_fps:g} fps; "
                         f"using all {available} frames in the window")
        return np.arange(first, last + 1)
    if fps is not None:
        times = t0 + np.arange(max(1, math.ceil((t1 - t0) * fps - _EPS))) / fps
        return np.unique(np.clip(np.round(times * src_fps), first, last).astype(int))
    wanted = int(num_frames)
    if wanted > available:
        notes.append(f"asked for {wanted} frames but the video has {available} in the window; "
                     f"using {available}")
        wanted = available
    return np.linspace(first, last, wanted).round().astype(int)


def _decord_open(video: Path):
    """-> (decord reader, total_frames, fps), or None if decord is not installed."""
    try:
        import decord
    except ImportError:
        return None

    def open_reader():
        reader = decord.VideoReader(str(video), ctx=decord.cpu(0), num_threads=1)
        return reader, len(reader), float(reader.get_avg_fps())

    reader, total, fps = _quietly(open_reader)
    if total <= 0:
        raise _DecodeFailed("decord found no frames")
    return reader, total, fps


def _decord_read(reader, indices: np.ndarray) -> np.ndarray:
    """Decode `indices` [T] -> uint8 [T, H, W, 3] RGB."""
    frames = _quietly(lambda: reader.get_batch([int(i) for i in indices]).asnumpy())
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[3] != 3:
        raise _DecodeFailed(f"decord returned frames of shape {frames.shape}")
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _opencv_probe(video: Path) -> tuple[int, float]:
    """(total_frames, fps) from OpenCV's reading of the container."""

    def probe():
        capture = cv2.VideoCapture(str(video))
        try:
            if not capture.isOpened():
                raise _DecodeFailed("neither decord nor OpenCV could open it")
            return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), float(capture.get(cv2.CAP_PROP_FPS))
        finally:
            capture.release()

    total, fps = _quietly(probe)
    if total <= 0:
        raise _DecodeFailed("the file reports no video frames")
    return total, fps


def _opencv_read(video: Path, indices: np.ndarray, notes: list[str]):
    """Decode `indices` [T] -> (uint8 [T', H, W, 3] RGB, indices [T']), T' <= T.

    Reads sequentially up to the last wanted frame (no seeking: slower, but exact). If the stream
    ends early, keeps the wanted frames that decoded and adds a note.
    """
    wanted = set(int(i) for i in indices)

    def read():
        frames, got, index = [], [], -1
        capture = cv2.VideoCapture(str(video))
        try:
            if not capture.isOpened():
                raise _DecodeFailed("OpenCV could not open it")
            for index in range(int(indices[-1]) + 1):
                if index not in wanted:
                    if not capture.grab():
                        break
                    continue
                ok, frame = capture.read()
                if not ok or frame is None:
                    break
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                got.append(index)
            return frames, got, index
        finally:
            capture.release()

    frames, got, stopped_at = _quietly(read)
    if not frames:
        raise _DecodeFailed(f"none of the {len(indices)} wanted frames could be decoded")
    if len(got) < len(indices):
        notes.append(f"only {len(got)} of {len(indices)} wanted frames could be decoded (the file "
                     f"seems to end before frame {stopped_at}); using {len(got)}")
    return np.stack(frames), np.asarray(got, dtype=int)


def _quietly(action):
    """Run `action()` with C-level stderr captured; any exception becomes `_DecodeFailed`."""
    with _captured_stderr() as log:
        try:
            return action()
        except Exception as error:
            failure = error
    raise _DecodeFailed(_short_reason(log[0], str(failure)))


@contextlib.contextmanager
def _captured_stderr():
    """Send fd 2 (ffmpeg/decord/OpenCV logs) to a temp file; the yielded list gets its text."""
    text: list[str] = []
    if sys.stderr is not None:
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", errors="replace"))


def _short_reason(log: str, fallback: str) -> str:
    """The telling part of a decoder log, e.g. 'moov atom not found'; else `fallback`'s 1st line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):  # ffmpeg: "[mov,mp4,... @ 0x55...] moov atom not found"
        match = re.match(r"\[[^\]]* @ 0x[0-9a-f]+\]\s*(.+)", line)
        if match:
            return match.group(1)
    for line in reversed(lines):  # decord: "[time] file.cc:83: ERROR opening: PATH, <reason>"
        if "ERROR opening:" in line and ", " in line:
            return line.rsplit(", ", 1)[1]
    return (fallback.strip().splitlines() or ["unknown error"])[0]


def _sec(seconds: float) -> str:
    """12 -> '12.0', 7.125 -> '7.125', 1/3 -> '0.333'."""
    text = f"{seconds:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
