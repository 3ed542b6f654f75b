"""vidqa.video.decode.load_clip and vidqa.testing.videos.write_video on small generated videos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vidqa.errors import BadInput
from vidqa.testing.videos import (
    moving_square_frames,
    static_left_half_frames,
    three_scene_frames,
    write_video,
)
from vidqa.video import decode as video_module
from vidqa.video.decode import load_clip

FPS = 8.0
T = 40  # 5 seconds at 8 fps


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """(path, frames): a 40-frame 96x128 moving-square video at 8 fps."""
    frames = moving_square_frames(T, size=(96, 128), end_color=(40, 60, 220))
    path = write_video(tmp_path_factory.mktemp("videos") / "square.mp4", frames, fps=FPS)
    return path, frames


def test_uniform_sampling(square):
    path, _ = square
    clip = load_clip(path, num_frames=8)
    expected = np.linspace(0, T - 1, 8).round().astype(int)
    assert clip.decoder == "decord"
    assert clip.num_frames == 8
    assert clip.frames.shape == (8, 96, 128, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_array_equal(clip.indices, expected)
    np.testing.assert_allclose(clip.timestamps, expected / FPS)
    assert clip.fps == pytest.approx(FPS)
    assert clip.total_frames == T and clip.duration == pytest.approx(T / FPS)
    assert clip.notes == []


def test_fps_sampling(square):
    clip = load_clip(square[0], num_frames=3, fps=2.0)  # fps wins over num_frames
    np.testing.assert_array_equal(clip.indices, np.arange(0, T, 4))  # times 0, 0.5, ... 4.5
    np.testing.assert_allclose(clip.timestamps, np.arange(0, 5, 0.5))


def test_fps_above_source_uses_every_frame_once(square):
    clip = load_clip(square[0], fps=30.0, start=4.0)
    np.testing.assert_array_equal(clip.indices, np.arange(32, T))
    assert any("--fps 30" in note for note in clip.notes)


def test_window_uniform_and_fps(square):
    clip = load_clip(square[0], num_frames=4, start=1.0, end=3.0)  # frames 8..23
    np.testing.assert_array_equal(clip.indices, [8, 13, 18, 23])
    assert np.all((clip.timestamps >= 1.0) & (clip.timestamps < 3.0))

    clip = load_clip(square[0], fps=1.0, start=0.5, end=4.0)
    np.testing.assert_array_equal(clip.indices, [4, 12, 20, 28])


def test_clamp_to_available_frames(square):
    clip = load_clip(square[0], num_frames=100)
    assert clip.num_frames == T
    np.testing.assert_array_equal(clip.indices, np.arange(T))
    assert any("100" in note and "40" in note for note in clip.notes)

    clip = load_clip(square[0], num_frames=64, start=4.0, end=99.0)  # end clamped to 5.0 s
    np.testing.assert_array_equal(clip.indices, np.arange(32, T))
    assert len(clip.notes) == 2


def test_decoded_frames_match_written_rgb(square, tmp_path):
    path, written = square
    clip = load_clip(path, num_frames=8)
    diff = np.abs(clip.frames.astype(int) - written[clip.indices].astype(int)).mean()
    assert diff < 6, diff

    red = np.zeros((4, 64, 64, 3), np.uint8)
    red[..., 0] = 255
    clip = load_clip(write_video(tmp_path / "red.mp4", red), num_frames=2)
    r, g, b = clip.frames.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 40 and b < 40


def test_decord_reads_what_write_video_writes(square):
    import decord

    reader = decord.VideoReader(str(square[0]), ctx=decord.cpu(0), num_threads=1)
    assert len(reader) == T and reader.get_avg_fps() == pytest.approx(FPS)
    assert reader[0].asnumpy().shape == (96, 128, 3)


def test_generators_are_deterministic_and_shaped():
    square = moving_square_frames(16, size=(96, 128))
    assert square.shape == (16, 96, 128, 3) and square.dtype == np.uint8
    columns = [np.flatnonzero(frame[..., 0].max(axis=0) > 100) for frame in square[[0, -1]]]
    assert columns[0].mean() < columns[1].mean()  # moves right
    static = static_left_half_frames(8, size=(64, 96), seed=3)
    np.testing.assert_array_equal(static, static_left_half_frames(8, size=(64, 96), seed=3))
    assert (static[:, :, :48] == static[0, :, :48]).all()  # left half never changes
    assert all((static[t, :, 48:] != static[t + 1, :, 48:]).any() for t in range(7))
    shapes = static_left_half_frames(8, size=(64, 96), right="shapes")
    assert all((shapes[t, :, 48:] != shapes[t + 1, :, 48:]).any() for t in range(7))
    assert three_scene_frames((2, 3, 4)).shape == (9, 96, 128, 3)


def test_three_scenes_roundtrip(tmp_path):
    frames = three_scene_frames((6, 6, 6), size=(64, 96))
    clip = load_clip(write_video(tmp_path / "scenes.mp4", frames), num_frames=18)
    means = clip.frames.reshape(3, 6, -1, 3).mean(axis=(1, 2))  # scene x RGB
    assert list(means.argmax(axis=1)) == [0, 1, 2]  # red, green, blue


def _broken_reader(*args, **kwargs):
    raise RuntimeError("simulated decord failure")


def test_opencv_fallback_when_decord_cannot_open(square, monkeypatch):
    import decord

    monkeypatch.setattr(decord, "VideoReader", _broken_reader)
    clip = load_clip(square[0], num_frames=8)
    assert clip.decoder == "opencv"
    np.testing.assert_array_equal(clip.indices, np.linspace(0, T - 1, 8).round().astype(int))
    assert np.abs(clip.frames.astype(int) - square[1][clip.indices].astype(int)).mean() < 6
    assert any("OpenCV" in note for note in clip.notes)


def test_opencv_fallback_when_decord_cannot_read(square, monkeypatch):
    import decord

    real = decord.VideoReader

    class ReadFails:
        def __init__(self, *args, **kwargs):
            self._reader = real(*args, **kwargs)

        def __len__(self):
            return len(self._reader)

        def get_avg_fps(self):
            return self._reader.get_avg_fps()

        def get_batch(self, indices):
            raise decord.DECORDError("simulated read failure")

    monkeypatch.setattr(decord, "VideoReader", ReadFails)
    clip = load_clip(square[0], num_frames=5, start=1.0)
    assert clip.decoder == "opencv"
    np.testing.assert_array_equal(clip.indices, np.linspace(8, 39, 5).round().astype(int))


def test_stream_shorter_than_reported_keeps_decoded_frames(square, monkeypatch):
    """A file that ends early (truncated data) keeps the frames that decode, with a note."""
    import decord

    real_capture = cv2.VideoCapture

    class ClaimsEightyFrames:
        def __init__(self, *args):
            self._capture = real_capture(*args)

        def get(self, prop):
            return 80.0 if prop == cv2.CAP_PROP_FRAME_COUNT else self._capture.get(prop)

        def __getattr__(self, name):
            return getattr(self._capture, name)

    monkeypatch.setattr(decord, "VideoReader", _broken_reader)
    monkeypatch.setattr(video_module.cv2, "VideoCapture", ClaimsEightyFrames)
    clip = load_clip(square[0], num_frames=8)  # wants linspace(0, 79, 8): only the first 4 exist
    np.testing.assert_array_equal(clip.indices, [0, 11, 23, 34])
    assert any("only 4 of 8" in note for note in clip.notes)


def _bad_files(tmp_path, square_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    data = square_path.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.3)])  # OpenCV writes the index (moov) last
    return {"text": text, "empty": empty, "truncated": truncated}


@pytest.mark.parametrize("kind", ["text", "empty", "truncated"])
def test_unreadable_files(kind, square, tmp_path, capfd):
    path = _bad_files(tmp_path, square[0])[kind]
    with pytest.raises(BadInput) as caught:
        load_clip(path, num_frames=4)
    message = str(caught.value)
    assert str(path) in message and "not a readable video file" in message
    assert "\n" not in message
    assert "moov atom" not in capfd.readouterr().err  # decoder chatter is silenced


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"num_frames": 0}, "--frames must be at least 1, got 0"),
        ({"fps": 0.0}, "--fps must be greater than 0, got 0"),
        ({"start": -1.0}, "--start must be 0 seconds or more, got -1.0s"),
        ({"start": 12.0}, "--start 12.0s is past the end of the video (5.0s)"),
        ({"start": 3.0, "end": 2.0}, "--end 2.0s must be after --start 3.0s"),
        ({"start": 1.01, "end": 1.1}, "contains no frames"),
    ],
)
def test_bad_options(kwargs, expected, square):
    with pytest.raises(BadInput, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_clip(square[0], **kwargs)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadInput, match="video not found: .*nope.mp4"):
        load_clip(tmp_path / "nope.mp4")
    with pytest.raises(BadInput, match="directory") as caught:
        load_clip(tmp_path)
    assert str(tmp_path) in str(caught.value)
