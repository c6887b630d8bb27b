"""engine.video: decode any container under limits, typed errors for bad input, H.264 mp4 / fragmented mp4 out.

Clips are tiny (64x64, at most 30 frames) and made here with PyAV, so nothing comes from outside.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidVideo, ResolutionTooHigh, UserError, VideoTooLarge, VideoTooLong
from engine.video import (
    DecodeLimits,
    FragmentedMp4Writer,
    Video,
    decode,
    encode_fmp4,
    encode_mp4,
    iter_frames,
    probe,
)

H = W = 64


def pattern(n: int, h: int = H, w: int = W) -> list[np.ndarray]:
    """Smooth colour waves that move a few pixels per frame: (h, w, 3) uint8 RGB each, every frame distinct."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        r = 128 + 100 * np.sin((x + 3 * i) / 6)
        g = 128 + 100 * np.cos((y - 2 * i) / 8)
        b = 128 + 100 * np.sin((x + y + 4 * i) / 10)
        out.append(np.stack([r, g, b], axis=-1).astype(np.uint8))
    return out


def noise(n: int, seed: int = 0) -> list[np.ndarray]:
    """Incompressible frames: the payload dwarfs the mp4 header, so a cut keeps whole frames."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)]


def pyav_encode(
    frames: list[np.ndarray], fmt: str, codec: str = "libx264", fps: int = 30,
    options: dict[str, str] | None = None, rotation: int = 0,
) -> bytes:
    """Encode with PyAV directly (not with the code under test) into any container."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def clip30() -> list[np.ndarray]:
    return pattern(30)


@pytest.fixture(scope="module")
def mp4_30(clip30: list[np.ndarray]) -> bytes:
    data = encode_mp4(clip30, 30)
    assert data is not None
    return data


@pytest.fixture(scope="module")
def raw_h264(clip30: list[np.ndarray]) -> bytes:
    """An Annex B elementary stream: no container, so no duration, frame count or timestamps in any header."""
    return pyav_encode(clip30, "h264")


class NonSeekable:
    """A pipe-like source: read() only, size unknown up front."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)


# --------------------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------------------


def test_mp4_round_trip(mp4_30: bytes, clip30: list[np.ndarray]) -> None:
    video = decode(mp4_30)
    assert isinstance(video, Video)
    assert video.frames.shape == (30, H, W, 3) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(30.0)
    assert not video.truncated
    assert video.info.codec == "h264" and "mp4" in video.info.container
    assert (video.info.width, video.info.height, video.info.n_frames) == (W, H, 30)
    assert video.info.duration_s == pytest.approx(1.0, abs=0.04)
    assert mean_abs(video.frames, np.stack(clip30)) < 6
    # Frame order survives: each decoded frame is nearest to its own source frame.
    for i in (0, 14, 29):
        errors = [mean_abs(video.frames[i], f) for f in clip30]
        assert int(np.argmin(errors)) == i


def test_sources_path_file_object_offset_and_pipe_agree(mp4_30: bytes, tmp_path) -> None:
    # The name says PNG; only the content counts.
    path = tmp_path / "looks_like.png"
    path.write_bytes(mp4_30)
    reference = decode(mp4_30).frames
    assert np.array_equal(decode(path).frames, reference)
    assert np.array_equal(decode(str(path)).frames, reference)
    with open(path, "rb") as f:
        assert np.array_equal(decode(f).frames, reference)
    shifted = io.BytesIO(b"JUNK" + mp4_30)
    shifted.seek(4)  # a file object is read from where it stands
    assert np.array_equal(decode(shifted).frames, reference)
    assert np.array_equal(decode(NonSeekable(mp4_30)).frames, reference)


def test_probe_reads_header_and_first_frame_only(mp4_30: bytes, raw_h264: bytes) -> None:
    info = probe(mp4_30)
    assert (info.width, info.height, info.n_frames, info.codec) == (W, H, 30, "h264")
    assert info.fps == pytest.approx(30.0)
    raw = probe(raw_h264)
    assert raw.container == "h264" and raw.n_frames is None and raw.duration_s is None


def test_vp9_webm_decodes(clip30: list[np.ndarray]) -> None:
    webm = pyav_encode(clip30, "webm", "libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"})
    video = decode(webm)
    assert video.info.codec == "vp9" and "webm" in video.info.container
    assert video.frames.shape == (30, H, W, 3) and not video.truncated
    assert video.fps == pytest.approx(30.0)
    assert mean_abs(video.frames, np.stack(clip30)) < 8


def test_display_rotation_is_applied() -> None:
    # A phone's portrait clip is stored landscape with a display matrix; frames come out upright.
    src = pattern(5, h=32, w=64)
    video = decode(pyav_encode(src, "mp4", rotation=90))
    assert (video.info.width, video.info.height) == (32, 64)
    assert video.frames.shape == (5, 64, 32, 3)
    assert mean_abs(video.frames[0], np.rot90(src[0], 1)) < 6  # 90 degrees counter-clockwise


def test_iter_frames_streams_the_same_frames(mp4_30: bytes) -> None:
    whole = decode(mp4_30).frames
    stream = iter_frames(mp4_30)
    assert stream.info.n_frames == 30 and stream.fps == pytest.approx(30.0)
    first = [next(stream) for _ in range(3)]
    stream.close()  # leaving early releases the input; nothing more comes
    assert list(stream) == []
    assert np.array_equal(np.stack(first), whole[:3])
    with iter_frames(mp4_30) as again:
        assert np.array_equal(np.stack(list(again)), whole)
        assert again.truncated is False


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------


def test_encode_mp4_to_path_is_faststart_and_atomic(clip30: list[np.ndarray], tmp_path) -> None:
    dest = tmp_path / "out.mp4"
    assert encode_mp4(clip30, 30, dest) is None
    data = dest.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # faststart: the index precedes the media
    assert decode(dest).frames.shape == (30, H, W, 3)
    assert os.listdir(tmp_path) == ["out.mp4"]  # no temporary left behind

    # A failure half-way leaves the previous file as it was and no temporary.
    def failing() -> Iterator[np.ndarray]:
        yield from clip30[:5]
        raise RuntimeError("renderer died")

    dest.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="renderer died"):
        encode_mp4(failing(), 30, dest)
    assert dest.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_encode_mp4_bytes_are_faststart(mp4_30: bytes) -> None:
    assert mp4_30[4:8] == b"ftyp" and mp4_30.find(b"moov") < mp4_30.find(b"mdat")


@pytest.mark.parametrize(
    "frames",
    [
        [np.zeros((63, 64, 3), np.uint8)],  # odd height: yuv420p needs even sides
        [np.zeros((64, 64, 3), np.float32)],
        [np.zeros((64, 64), np.uint8)],
        [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)],  # size changes
        [],
    ],
    ids=["odd", "float", "gray", "mixed", "empty"],
)
def test_encode_rejects_bad_frames(frames: list[np.ndarray]) -> None:
    with pytest.raises(ValueError):
        encode_mp4(frames, 30)
    with pytest.raises(ValueError):
        encode_fmp4(frames, 30)


def test_fragmented_writer_streams_before_close(clip30: list[np.ndarray]) -> None:
    writer = FragmentedMp4Writer(W, H, 30)
    chunks = [writer.write(f) for f in clip30]
    before_close = b"".join(chunks)
    tail = writer.close()
    assert writer.close() == b""
    assert chunks[0].startswith(b"\x00\x00\x00") and chunks[0][4:8] == b"ftyp"  # header with the first frame
    assert b"moof" in before_close  # a media fragment, not only the header, arrived before close
    data = before_close + tail
    assert b"mvex" in data  # a fragmented file announces its fragments
    video = decode(data)
    assert video.frames.shape == (30, H, W, 3) and not video.truncated
    assert video.fps == pytest.approx(30.0)
    assert mean_abs(video.frames, np.stack(clip30)) < 8
    with pytest.raises(ValueError):
        writer.write(clip30[0])


def test_encode_fmp4_round_trip(clip30: list[np.ndarray]) -> None:
    data = encode_fmp4(clip30, 25)
    assert b"moof" in data
    video = decode(data)
    assert video.frames.shape == (30, H, W, 3) and video.fps == pytest.approx(25.0)


# --------------------------------------------------------------------------------------------------------------
# Frame-rate resampling
# --------------------------------------------------------------------------------------------------------------


def test_resample_30_to_15_keeps_every_other_frame(mp4_30: bytes) -> None:
    source = decode(mp4_30).frames
    half = decode(mp4_30, fps=15)
    assert half.frames.shape[0] == 15 and half.fps == 15.0
    assert np.array_equal(half.frames, source[::2])


def test_resample_10_to_25_repeats_by_time(clip30: list[np.ndarray]) -> None:
    clip = encode_mp4(clip30[:10], 10)
    source = decode(clip).frames
    up = decode(clip, fps=25)
    assert up.frames.shape[0] == 25
    expected = [int(Fraction(k, 25) * 10) for k in range(25)]  # source frame on screen at t = k / 25
    assert np.array_equal(up.frames, source[expected])
    assert not np.shares_memory(up.frames[0], up.frames[1])


def test_resample_follows_timestamps_not_indices() -> None:
    # Variable frame rate: frame i shows from times_ms[i]; the 0.3 s gap holds frame 2 on screen.
    times_ms = [0, 100, 200, 500, 600]
    src = pattern(5)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for t, f in zip(times_ms, src, strict=True):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    source = decode(buf.getvalue()).frames
    assert source.shape[0] == 5
    video = decode(buf.getvalue(), fps=10)
    assert video.frames.shape[0] == 7  # 0.0 .. 0.6 s
    assert np.array_equal(video.frames, source[[0, 1, 2, 2, 2, 3, 4]])


def test_bad_fps_argument() -> None:
    with pytest.raises(ValueError):
        iter_frames(b"whatever", fps=0)
    with pytest.raises(ValueError):
        encode_mp4(pattern(2), float("nan"))


# --------------------------------------------------------------------------------------------------------------
# Bad input: each gets its typed error, never a raw PyAV exception
# --------------------------------------------------------------------------------------------------------------


def png_bytes() -> bytes:
    ok, png = cv2.imencode(".png", pattern(1)[0])
    assert ok
    return png.tobytes()


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.random.default_rng(0).bytes(4096),
        lambda: b"",
        lambda: b"This is a text file, not a video.\n" * 50,
        png_bytes,
        wav_bytes,
        lambda: b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
    ],
    ids=["garbage", "empty", "text", "png", "audio-only", "playlist"],
)
def test_not_a_video_is_invalid(make, tmp_path) -> None:
    data = make()
    with pytest.raises(InvalidVideo):
        decode(data)
    with pytest.raises(InvalidVideo):
        probe(data)
    path = tmp_path / "upload.mp4"  # a trustworthy-looking name changes nothing
    path.write_bytes(data)
    with pytest.raises(InvalidVideo):
        decode(path)


def test_missing_file_is_invalid(tmp_path) -> None:
    with pytest.raises(InvalidVideo):
        decode(tmp_path / "nope.mp4")


def test_truncated_mp4(mp4_30: bytes) -> None:
    # Cut at 30%: whatever decodes comes back flagged, or InvalidVideo if nothing does.
    try:
        video = decode(mp4_30[: int(len(mp4_30) * 0.3)])
    except InvalidVideo:
        pass
    else:
        assert video.truncated and 0 < video.frames.shape[0] < 30
    with pytest.raises(InvalidVideo):
        decode(mp4_30[: int(len(mp4_30) * 0.01)])


def test_truncated_mp4_returns_the_readable_frames() -> None:
    src = noise(30)
    data = encode_mp4(src, 30)
    assert data is not None
    video = decode(data[: int(len(data) * 0.3)])
    assert video.truncated
    n = video.frames.shape[0]
    assert 0 < n < 30
    for i in range(n):  # the frames that came back are the first ones, in order
        assert int(np.argmin([mean_abs(video.frames[i], f) for f in src])) == i


@pytest.mark.parametrize("fmt", ["matroska", "webm"])
def test_cleanly_cut_matroska_is_flagged(clip30: list[np.ndarray], fmt: str) -> None:
    # Matroska cut between packets decodes without any error; only the header's duration gives it away.
    codec = "libvpx-vp9" if fmt == "webm" else "libx264"
    options = {"deadline": "realtime", "cpu-used": "8"} if fmt == "webm" else {}
    data = pyav_encode(clip30, fmt, codec, options=options)
    assert decode(data).truncated is False
    cut = decode(data[: int(len(data) * 0.7)])
    assert cut.truncated and 0 < cut.frames.shape[0] < 30


def test_too_large(mp4_30: bytes, tmp_path) -> None:
    limits = DecodeLimits(max_bytes=len(mp4_30) - 1)
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_30)
    for src in (mp4_30, path, io.BytesIO(mp4_30)):
        with pytest.raises(VideoTooLarge):
            probe(src, limits)
    # Size unknown up front: the limit holds while reading.
    with pytest.raises(VideoTooLarge):
        decode(NonSeekable(mp4_30), limits)
    assert decode(NonSeekable(mp4_30), DecodeLimits(max_bytes=len(mp4_30))).frames.shape[0] == 30


def test_too_long_by_header(mp4_30: bytes) -> None:
    with pytest.raises(VideoTooLong):
        probe(mp4_30, DecodeLimits(max_duration_s=0.5))
    with pytest.raises(VideoTooLong):
        probe(mp4_30, DecodeLimits(max_frames=29))
    assert decode(mp4_30, DecodeLimits(max_frames=30, max_duration_s=1.0)).frames.shape[0] == 30


def test_too_long_caught_while_decoding(raw_h264: bytes, mp4_30: bytes) -> None:
    # The raw stream's header states neither duration nor frame count, so probe passes; decoding does not.
    probe(raw_h264, DecodeLimits(max_duration_s=0.5, max_frames=10))
    with pytest.raises(VideoTooLong):
        decode(raw_h264, DecodeLimits(max_duration_s=0.5))
    with pytest.raises(VideoTooLong):
        decode(raw_h264, DecodeLimits(max_frames=10))
    # A header that lies: the mp4's media and movie durations patched to a tiny value.
    lying = bytearray(mp4_30)
    for box in (b"mvhd", b"mdhd"):
        at = lying.find(box)
        assert lying[at + 4] == 0  # version 0: 32-bit timescale then duration
        lying[at + 20 : at + 24] = struct.pack(">I", 1)
    assert probe(bytes(lying), DecodeLimits(max_duration_s=0.5)).duration_s < 0.01
    with pytest.raises(VideoTooLong):
        decode(bytes(lying), DecodeLimits(max_duration_s=0.5))


def test_too_many_frames_after_upsampling(mp4_30: bytes) -> None:
    with pytest.raises(VideoTooLong):
        decode(mp4_30, DecodeLimits(max_frames=40), fps=60)


def test_resolution_too_high(mp4_30: bytes, clip30: list[np.ndarray]) -> None:
    with pytest.raises(ResolutionTooHigh):
        probe(mp4_30, DecodeLimits(max_width=32, max_height=32))
    # Portrait and landscape share one limit.
    tall = encode_mp4(pattern(2, h=64, w=32), 30)
    assert tall is not None
    assert probe(tall, DecodeLimits(max_width=64, max_height=32)).height == 64
    # The resolution grows mid-stream, after the header was read: caught while decoding.
    growing = pyav_encode(clip30[:5], "h264") + pyav_encode(pattern(5, h=128, w=128), "h264")
    probe(growing, DecodeLimits(max_width=100, max_height=100))
    with pytest.raises(ResolutionTooHigh):
        decode(growing, DecodeLimits(max_width=100, max_height=100))
    # Within the limits, frames of the new size are scaled to the first size so that they stack.
    assert decode(growing).frames.shape == (10, H, W, 3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_bytes_give_a_video_or_a_user_error(mp4_30: bytes, data) -> None:
    blob = bytearray(mp4_30)
    for _ in range(data.draw(st.integers(1, 20))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    try:
        video = decode(bytes(blob[:cut]))
    except UserError:
        return
    assert video.frames.ndim == 4 and video.frames.shape[0] >= 1 and video.frames.shape[-1] == 3


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        DecodeLimits(max_bytes=0)
    with pytest.raises(ValueError):
        DecodeLimits(max_duration_s=float("inf"))


def test_byte_limit_counts_data_not_seek_offsets() -> None:
    # A corrupt index can make the demuxer seek far past the end; that alone must not read as "too large".
    from engine.video import _LimitedReader

    reader = _LimitedReader(io.BytesIO(b"abcdef"), max_bytes=4, seekable=True)
    reader.seek(10_000)
    assert reader.read(8) == b"" and not reader.exceeded
    reader.seek(0)
    assert reader.read(3) == b"abc" and not reader.exceeded
    assert reader.read(8) == b"" and reader.exceeded  # bytes 4 and 5 exist beyond the limit
