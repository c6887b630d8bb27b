"""Decode and encode video with PyAV (DESIGN.md section 4: "a worker decodes it (PyAV)").

Decoding turns whatever FFmpeg reads (any container, any codec) into RGB uint8 frames (T, H, W, 3), from a path,
bytes or a binary file object, under explicit ``DecodeLimits``:

- the cheap limits (byte size, then duration, frame count and resolution from the stream header) are checked
  before a frame is decoded, and checked again on every decoded frame, so a header that lies gets no further;
- every failure caused by the input is a typed ``engine.errors`` exception; no raw PyAV error escapes;
- a truncated file returns the frames that decode, with ``truncated=True``, instead of failing.

The content is sniffed, never the name: FFmpeg only ever sees a Python file object, so a file name's extension
cannot steer the demuxer and a "path" such as ``http://...`` or ``concat:...`` is never handed to FFmpeg's URL
layer. Demuxers that read other files (playlists) are refused nested opens, and still-image demuxers (a PNG or a
JPEG is "a video" to FFmpeg) are rejected.

Encoding writes H.264 (libx264, yuv420p): ``encode_mp4`` for whole files (faststart, written atomically) and
``FragmentedMp4Writer`` for HTTP streaming (fragments come out as the frames go in).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from itertools import chain
from typing import BinaryIO, NoReturn

import av
import av.error
import numpy as np
from av.container import InputContainer
from av.stream import Disposition
from av.video.frame import VideoFrame
from av.video.stream import VideoStream

from engine.errors import InvalidVideo, ResolutionTooHigh, VideoTooLarge, VideoTooLong

__all__ = [
    "DecodeLimits",
    "FragmentedMp4Writer",
    "FrameStream",
    "Source",
    "Video",
    "VideoInfo",
    "decode",
    "encode_fmp4",
    "encode_mp4",
    "iter_frames",
    "probe",
]

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO

_MIB = 1 << 20
# Bytes per read callback into Python; larger than PyAV's 32 KiB default to cut callback overhead on big files.
_IO_BUFFER = 256 * 1024
# Demuxers that FFmpeg picks for a single still image ("png_pipe", "jpeg_pipe", ...) end in this suffix.
_IMAGE_DEMUXER_SUFFIX = "_pipe"
# Demuxers that are not recorded video: ANSI text art, image sequences, playlists and virtual sources.
_REFUSED_DEMUXERS = frozenset({"tty", "image2", "image2pipe", "hls", "dash", "concat", "lavfi", "sdp", "rtsp"})
# Frame interval assumed when neither the frame nor the header gives one (FFmpeg's own default rate is 25).
_DEFAULT_STEP = Fraction(1, 25)
# x264's CRF scale.
_CRF_RANGE = (0, 51)


# ----------------------------------------------------------------------------------------------------------------
# Public data types
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a video stream's header (and its first decoded frame) says about it.

    ``width``/``height`` are the displayed size, after the container's rotation (a phone's portrait video stored
    landscape with a 90 degree display matrix reports its portrait size). ``fps`` is 0.0 when the header does not
    say. ``n_frames`` and ``duration_s`` are None when the header does not say.
    """

    width: int
    height: int
    fps: float
    n_frames: int | None
    duration_s: float | None
    codec: str
    container: str


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds on what a decode may consume; the server passes its settings.

    ``max_frames`` bounds both the decoded source frames and the frames returned after fps resampling. The
    resolution limit holds in either orientation (3840x2160 also admits a 2160x3840 portrait video).
    """

    max_bytes: int = 200 * _MIB
    max_duration_s: float = 120.0
    max_frames: int = 10_000
    max_width: int = 3840
    max_height: int = 2160

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_frames", "max_width", "max_height"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecodeLimits.{name} must be positive, got {getattr(self, name)}")
        if not (self.max_duration_s > 0 and math.isfinite(self.max_duration_s)):
            raise ValueError(f"DecodeLimits.max_duration_s must be positive, got {self.max_duration_s}")

    def admits_size(self, width: int, height: int) -> bool:
        """True when ``width`` x ``height`` fits the limit in landscape or portrait orientation."""
        return (width <= self.max_width and height <= self.max_height) or (
            width <= self.max_height and height <= self.max_width
        )


@dataclass
class Video:
    """A decoded video. ``frames`` is (T, H, W, 3) uint8 RGB; ``fps`` is the rate of ``frames`` (the target rate
    when resampled); ``info`` describes the source; ``truncated`` says the input ended or broke early and
    ``frames`` hold only the part that decoded."""

    frames: np.ndarray
    fps: float
    info: VideoInfo
    truncated: bool


# ----------------------------------------------------------------------------------------------------------------
# Input: sources, byte limit, container checks
# ----------------------------------------------------------------------------------------------------------------


class _LimitedReader:
    """Read-only file object over the source that FFmpeg reads through.

    It stops at ``max_bytes``: reading past it sets ``exceeded`` and answers end-of-file, so a source whose size
    was unknown up front (a pipe) or that grows while it is read cannot make FFmpeg consume more than the limit.
    (Raising from inside a PyAV read callback is not reliable: PyAV may drop the exception.) It has no ``name``,
    so FFmpeg probes the bytes alone. Offsets are relative to where the source stood when it was handed over.
    """

    def __init__(self, raw: BinaryIO, max_bytes: int, seekable: bool) -> None:
        self._raw = raw
        self._max = max_bytes
        self._seekable = seekable
        self._origin = raw.tell() if seekable else 0
        self._pos = 0
        self.exceeded = False

    def read(self, n: int = -1) -> bytes:
        room = self._max - self._pos
        # Ask for one byte more than the limit allows so that "exactly max_bytes long" is not mistaken for
        # "more"; at least one byte, so that a read after a seek past the limit still finds out whether data
        # is there (a seek alone past the end of a short file is not a reason to refuse it).
        want = room + 1 if n is None or n < 0 else min(n, room + 1)
        data = self._raw.read(max(1, want)) or b""
        if data and self._pos + len(data) > self._max:
            self.exceeded = True
            return b""
        self._pos += len(data)
        return bytes(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation("seek")
        if whence == io.SEEK_SET:
            self._raw.seek(self._origin + offset, io.SEEK_SET)
        else:
            self._raw.seek(offset, whence)
        self._pos = self._raw.tell() - self._origin
        return self._pos

    def tell(self) -> int:
        return self._pos


def _refuse_nested_open(url: str, flags: int, options: dict[str, str]) -> NoReturn:
    """PyAV ``io_open`` hook: a demuxer asked to open another file or URL (a playlist entry, an external
    reference). An upload must be self-contained, and following such links would let a crafted file read local
    files or reach the network."""
    raise InvalidVideo("the file refers to other files or URLs, which is not allowed", url=url[:200])


def _source_reader(src: Source, limits: DecodeLimits) -> tuple[_LimitedReader, BinaryIO | None]:
    """Wrap ``src`` in a ``_LimitedReader``, checking its byte size first when that is known.

    Returns the reader and the file this function opened (to close), if any.
    """
    owned: BinaryIO | None = None
    raw: BinaryIO
    size: int | None
    if isinstance(src, bytes | bytearray | memoryview):
        raw = io.BytesIO(src)
        size = len(memoryview(src).cast("B"))
    elif isinstance(src, str | os.PathLike):
        path = os.fspath(src)
        try:
            size = os.stat(path).st_size
            owned = raw = open(path, "rb")  # noqa: SIM115 -- closed by the caller, which owns the decode
        except OSError as e:
            raise InvalidVideo("the video file cannot be read", reason=type(e).__name__) from e
    else:
        raw = src
        size = None
    seekable = _is_seekable(raw)
    if size is None and seekable:
        start = raw.tell()
        raw.seek(0, io.SEEK_END)
        size = raw.tell() - start
        raw.seek(start, io.SEEK_SET)
    if size is not None and size > limits.max_bytes:
        if owned is not None:
            owned.close()
        raise VideoTooLarge(
            f"the video is {size} bytes, more than the limit of {limits.max_bytes}", size=size,
            limit=limits.max_bytes,
        )
    if size == 0:
        if owned is not None:
            owned.close()
        raise InvalidVideo("the video is empty")
    return _LimitedReader(raw, limits.max_bytes, seekable), owned


def _is_seekable(raw: BinaryIO) -> bool:
    seekable = getattr(raw, "seekable", None)
    try:
        return bool(seekable()) if seekable is not None else False
    except (OSError, ValueError):
        return False


def _check_demuxer(name: str) -> None:
    """Reject containers that are not recorded video, whatever the content sniffing chose."""
    for part in name.split(","):
        if part.endswith(_IMAGE_DEMUXER_SUFFIX):
            raise InvalidVideo("this is a still image, not a video", container=name)
        if part in _REFUSED_DEMUXERS:
            raise InvalidVideo("this kind of file is not accepted as a video", container=name)


def _pick_stream(container: InputContainer) -> VideoStream:
    """The first real video stream: cover art in an audio file is a "video" stream with ``attached_pic``."""
    for stream in container.streams.video:
        if stream.disposition & Disposition.attached_pic:
            continue
        if stream.codec_context is None:
            raise InvalidVideo("the video codec is not supported", container=container.format.name)
        return stream
    raise InvalidVideo("the file has no video stream", container=container.format.name)


def _header_info(container: InputContainer, stream: VideoStream) -> VideoInfo:
    rate = stream.guessed_rate or stream.average_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    duration_s: float | None = None
    if stream.duration is not None and stream.time_base:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration_s = container.duration / av.time_base
    return VideoInfo(
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        fps=fps if math.isfinite(fps) and fps > 0 else 0.0,
        n_frames=stream.frames or None,
        duration_s=duration_s if duration_s is not None and duration_s > 0 else None,
        codec=stream.codec_context.codec.canonical_name,
        container=container.format.name,
    )


def _check_header_limits(info: VideoInfo, limits: DecodeLimits) -> None:
    if not limits.admits_size(info.width, info.height):
        raise ResolutionTooHigh(
            f"the video is {info.width}x{info.height}, more than {limits.max_width}x{limits.max_height}",
            width=info.width, height=info.height, max_width=limits.max_width, max_height=limits.max_height,
        )
    if info.duration_s is not None and info.duration_s > limits.max_duration_s:
        raise VideoTooLong(
            f"the video lasts {info.duration_s:.1f} s, more than {limits.max_duration_s:g} s",
            duration_s=info.duration_s, limit_s=limits.max_duration_s,
        )
    if info.n_frames is not None and info.n_frames > limits.max_frames:
        raise VideoTooLong(
            f"the video has {info.n_frames} frames, more than {limits.max_frames}",
            n_frames=info.n_frames, limit=limits.max_frames,
        )


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def _seconds(value: int, time_base: Fraction | None) -> Fraction | None:
    return Fraction(value) * time_base if time_base else None


class _Decoder:
    """One open input: header checks at construction, then decoded frames with their presentation times.

    Construction decodes the first frame too: it proves that something decodes and gives the display rotation,
    which the header does not expose.
    """

    def __init__(self, src: Source, limits: DecodeLimits) -> None:
        self.limits = limits
        self.truncated = False
        self._reader, self._owned = _source_reader(src, limits)
        self._container: InputContainer | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        try:
            self._container = container = av.open(
                self._reader, "r", io_open=_refuse_nested_open, buffer_size=_IO_BUFFER,
                # Tags are free text from the uploader; undecodable bytes in them must not fail the video.
                metadata_errors="replace",
            )
        except av.error.FFmpegError as e:
            self._raise_if_too_large()
            raise InvalidVideo("the file is not a readable video", reason=str(e.strerror or e)) from e
        self._raise_if_too_large()
        _check_demuxer(container.format.name)
        self.stream = stream = _pick_stream(container)
        header = _header_info(container, stream)
        _check_header_limits(header, self.limits)
        # Decoding in threads is several times faster on multi-core workers and changes no output.
        stream.thread_type = "AUTO"
        self._expected_s = self._expected_duration(container, stream)
        self._step = Fraction(1) / Fraction(header.fps).limit_denominator(1_000_000) if header.fps else None
        self.n_source = 0
        self._max_duration = Fraction(self.limits.max_duration_s)
        self.t0: Fraction | None = None
        self._t_last: Fraction | None = None
        self.end: Fraction | None = None
        self._raw = self._demux_decode(stream)
        first = next(self._raw, None)
        if first is None:
            raise InvalidVideo("no frame of the video could be decoded", container=header.container)
        self._first: VideoFrame | None = first
        # The decoded size is authoritative (the header may omit it, or give the coded size before cropping).
        self.width, self.height = first.width, first.height
        # VideoFrame.rotation is the counter-clockwise angle the frame must turn to be displayed upright.
        self.quarter_turns = round(first.rotation / 90) % 4
        shown = (first.height, first.width) if self.quarter_turns % 2 else (first.width, first.height)
        self.info = replace(header, width=shown[0], height=shown[1])

    @staticmethod
    def _expected_duration(container: InputContainer, stream: VideoStream) -> Fraction | None:
        """The video's length that the header promises, to tell a cleanly cut file from a complete one. The
        container's duration only counts when the video is the only stream (an audio track may run longer)."""
        if stream.duration is not None and stream.time_base:
            return _seconds(stream.duration, stream.time_base)
        if container.duration is not None and len(container.streams) == 1:
            return Fraction(container.duration, av.time_base)
        return None

    def _raise_if_too_large(self) -> None:
        if self._reader.exceeded:
            raise VideoTooLarge(
                f"the video is more than {self.limits.max_bytes} bytes", limit=self.limits.max_bytes
            )

    def _demux_decode(self, stream: VideoStream) -> Iterator[VideoFrame]:
        """Decode packet by packet, so that a file cut short still yields every frame before the cut.

        A packet that fails to decode is skipped (the decoder resynchronises at the next keyframe); a demuxer
        error ends the input. Either marks the result truncated.
        """
        assert self._container is not None
        packets = self._container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                self.truncated = True
                break
            if packet.is_corrupt:
                self.truncated = True
            try:
                frames = stream.decode(packet)
            except av.error.FFmpegError:
                self.truncated = True
                continue
            yield from frames
        self._raise_if_too_large()

    def frames(self) -> Iterator[tuple[Fraction, VideoFrame]]:
        """Yield (presentation time in seconds, frame), enforcing the limits on every frame.

        Sets ``end`` (time at which the last frame stops showing) once exhausted.
        """
        assert self._first is not None
        for frame in chain([self._first], self._raw):
            self._first = None
            self._check_frame(frame)
            t = self._frame_time(frame)
            yield t, frame
            self.end = t + self._frame_duration(frame)
        self._finish()

    def _check_frame(self, frame: VideoFrame) -> None:
        limits = self.limits
        if not limits.admits_size(frame.width, frame.height):
            raise ResolutionTooHigh(
                f"a frame is {frame.width}x{frame.height}, more than {limits.max_width}x{limits.max_height}",
                width=frame.width, height=frame.height, max_width=limits.max_width,
                max_height=limits.max_height,
            )
        self.n_source += 1
        if self.n_source > limits.max_frames:
            raise VideoTooLong(f"the video has more than {limits.max_frames} frames", limit=limits.max_frames)

    def _frame_time(self, frame: VideoFrame) -> Fraction:
        """Presentation time from the frame's pts; raw streams (an .h264 file) have none, so fall back to the
        previous time plus one frame duration."""
        t = _seconds(frame.pts, frame.time_base) if frame.pts is not None else None
        if t is None:
            t = Fraction(0) if self._t_last is None else self._t_last + self._frame_duration(frame)
        if self.t0 is None:
            self.t0 = t
        if self._t_last is not None and t < self._t_last:
            # Presentation order is non-decreasing; a time that runs backwards (broken or wrapped timestamps)
            # is held at the previous one, so that resampling and the duration limit stay well defined.
            t = self._t_last
        if t - self.t0 > self._max_duration:
            raise VideoTooLong(
                f"the video lasts more than {self.limits.max_duration_s:g} s", limit_s=self.limits.max_duration_s
            )
        self._t_last = t
        return t

    def _frame_duration(self, frame: VideoFrame) -> Fraction:
        d = _seconds(frame.duration, frame.time_base) if frame.duration else None
        if d:
            return d
        return self._step if self._step is not None else _DEFAULT_STEP

    def _finish(self) -> None:
        """A file cut cleanly between packets (Matroska, WebM) decodes without an error; it shows as frames that
        stop well before the duration the header promised. Allow two frames or 5% for rounding and edit lists."""
        if self._expected_s is None or self.end is None or self.t0 is None:
            return
        step = self._step if self._step is not None else _DEFAULT_STEP
        slack = max(2 * step, self._expected_s / 20)
        if self.end - self.t0 + slack < self._expected_s:
            self.truncated = True

    def to_rgb(self, frame: VideoFrame) -> np.ndarray:
        """(H, W, 3) uint8 RGB, upright, at the first frame's size (a stream whose resolution changes midway is
        rescaled, as FFmpeg's command line does, so that all frames stack)."""
        try:
            rgb: np.ndarray = frame.to_ndarray(format="rgb24", width=self.width, height=self.height)  # (H, W, 3)
        except av.error.FFmpegError as e:
            raise InvalidVideo("a frame could not be converted to RGB", reason=str(e.strerror or e)) from e
        if self.quarter_turns:
            rgb = np.ascontiguousarray(np.rot90(rgb, self.quarter_turns))  # (H, W, 3) displayed
        return rgb

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
        if self._owned is not None:
            self._owned.close()
            self._owned = None


def _target_period(fps: float) -> Fraction:
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    return 1 / Fraction(fps).limit_denominator(1_000_000)


def _resample(
    timed: Iterable[tuple[Fraction, VideoFrame]], period: Fraction, end: Callable[[], Fraction | None]
) -> Iterator[VideoFrame]:
    """Resample by presentation time: output frame k stands at t0 + k * period and shows the source frame on
    screen at that instant (the latest one that started at or before it). Frames are dropped or repeated as
    the timestamps say, so variable-rate input comes out evenly spaced. ``end()`` is read once ``timed`` is
    exhausted: the time at which the last frame stops showing.
    """
    t0: Fraction | None = None
    k = 0
    held: VideoFrame | None = None
    for t, frame in timed:
        if t0 is None:
            t0 = t
        while held is not None and t0 + k * period < t:
            yield held
            k += 1
        held = frame
    stop = end()
    while held is not None and t0 is not None and stop is not None and t0 + k * period < stop:
        yield held
        k += 1


class FrameStream(Iterator[np.ndarray]):
    """The iterator ``iter_frames`` returns: (H, W, 3) uint8 RGB frames one at a time, plus what is known about
    them. ``truncated`` is final once the iterator is exhausted. Closing it (or exhausting it, or leaving a
    ``with`` block) releases the input."""

    def __init__(self, decoder: _Decoder, fps: float | None) -> None:
        self.info = decoder.info
        self.fps = float(fps) if fps is not None else decoder.info.fps
        self._decoder = decoder
        self._it = self._generate(decoder, fps)

    @property
    def truncated(self) -> bool:
        return self._decoder.truncated

    def _generate(self, decoder: _Decoder, fps: float | None) -> Iterator[np.ndarray]:
        try:
            if fps is None:
                for _, frame in decoder.frames():
                    yield decoder.to_rgb(frame)
                return
            last: tuple[VideoFrame, np.ndarray] | None = None
            resampled = _resample(decoder.frames(), _target_period(fps), lambda: decoder.end)
            for n_out, frame in enumerate(resampled, start=1):
                if n_out > decoder.limits.max_frames:
                    raise VideoTooLong(
                        f"resampled to {fps:g} fps the video has more than {decoder.limits.max_frames} frames",
                        limit=decoder.limits.max_frames,
                    )
                # Convert each kept source frame once (dropped frames never reach RGB); a repeat gets its own
                # copy so that a caller who edits one frame in place does not edit its neighbours.
                if last is not None and last[0] is frame:
                    yield last[1].copy()
                else:
                    last = (frame, decoder.to_rgb(frame))
                    yield last[1]
        finally:
            decoder.close()

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._decoder.close()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe(src: Source, limits: DecodeLimits = DecodeLimits()) -> VideoInfo:
    """Check ``src`` against ``limits`` and describe it, decoding only its first frame.

    Raises VideoTooLarge, VideoTooLong, ResolutionTooHigh (from the header) or InvalidVideo (nothing decodes).
    """
    decoder = _Decoder(src, limits)
    try:
        return decoder.info
    finally:
        decoder.close()


def iter_frames(src: Source, limits: DecodeLimits = DecodeLimits(), fps: float | None = None) -> FrameStream:
    """Stream (H, W, 3) uint8 RGB frames with bounded memory, resampled to ``fps`` when given.

    The header checks run now (errors surface at the call); the per-frame checks run as frames are pulled.
    """
    if fps is not None:
        _target_period(fps)
    return FrameStream(_Decoder(src, limits), fps)


def decode(src: Source, limits: DecodeLimits = DecodeLimits(), fps: float | None = None) -> Video:
    """Decode the whole video into memory, resampled to ``fps`` when given (see ``iter_frames``)."""
    with iter_frames(src, limits, fps) as stream:
        frames = list(stream)
        truncated = stream.truncated
        if not frames:
            raise InvalidVideo("no frame of the video could be decoded", container=stream.info.container)
        out_fps = stream.fps or _measured_fps(stream)
    return Video(frames=np.stack(frames), fps=out_fps, info=stream.info, truncated=truncated)  # (T, H, W, 3)


def _measured_fps(stream: FrameStream) -> float:
    """Frame rate from the timestamps when the header gave none."""
    d = stream._decoder
    if d.t0 is None or d.end is None or d.end <= d.t0:
        return 0.0
    return float(d.n_source / (d.end - d.t0))


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------


def _rate(fps: float) -> Fraction:
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    # 1001 keeps NTSC rates exact (29.97... -> 30000/1001) and plain rates plain (25.0 -> 25).
    return Fraction(fps).limit_denominator(1001)


def _check_crf(crf: int) -> None:
    if not _CRF_RANGE[0] <= crf <= _CRF_RANGE[1]:
        raise ValueError(f"crf must be in {_CRF_RANGE}, got {crf}")


def _check_size(width: int, height: int) -> None:
    # yuv420p stores chroma at half resolution in both directions, so libx264 needs even sides.
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs positive even width and height, got {width}x{height}")


def _as_frame(frame: np.ndarray, width: int, height: int, index: int) -> VideoFrame:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.shape != (height, width, 3):
        raise ValueError(
            f"frame {index} must be uint8 of shape {(height, width, 3)}, got {arr.dtype} {arr.shape}"
        )
    vf = VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")  # (H, W, 3) RGB -> AVFrame
    vf.pts = index  # in units of the codec time base, 1 / fps
    return vf


def _x264_options(crf: int, preset: str, low_latency: bool) -> dict[str, str]:
    options = {"crf": str(crf), "preset": preset}
    if low_latency:
        # No lookahead, no B-frames: each frame's packet comes out as soon as the frame goes in.
        options["tune"] = "zerolatency"
    return options


def _first_frame(frames: Iterable[np.ndarray]) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("no frames to encode")
    first = np.asarray(first)
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"frames must be (H, W, 3) RGB, got shape {first.shape}")
    return first, chain([first], it)


def _write_mp4(path: str, frames: Iterator[np.ndarray], width: int, height: int, rate: Fraction,
               crf: int, preset: str) -> None:
    # faststart: the muxer rewrites the file with the index (moov) first, so players start before the download
    # ends; it reopens the file by name, which is why this goes through a real path and not a BytesIO.
    with av.open(path, "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=rate, options=_x264_options(crf, preset, False))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i, frame in enumerate(frames):
            container.mux(stream.encode(_as_frame(frame, width, height, i)))
        container.mux(stream.encode(None))


def encode_mp4(
    frames: Iterable[np.ndarray],
    fps: float,
    path: str | os.PathLike[str] | None = None,
    crf: int = 20,
    *,
    preset: str = "veryfast",
) -> bytes | None:
    """Encode (H, W, 3) uint8 RGB frames as H.264 (libx264, yuv420p) in a faststart mp4.

    With ``path`` the file appears complete or not at all (written to a temporary sibling, then ``os.replace``)
    and None is returned; without it the mp4's bytes are returned. Width and height must be even (ValueError).
    """
    rate = _rate(fps)
    _check_crf(crf)
    first, it = _first_frame(frames)
    height, width = first.shape[:2]
    _check_size(width, height)
    if path is None:
        tmp = os.path.join(tempfile.gettempdir(), f"aca-{uuid.uuid4().hex}.mp4")
        try:
            _write_mp4(tmp, it, width, height, rate, crf, preset)
            with open(tmp, "rb") as f:
                return f.read()
        finally:
            _remove_quietly(tmp)
    # An absolute path starts with "/", so FFmpeg cannot read a protocol ("http:", "concat:") into it.
    dest = os.path.abspath(os.fspath(path))
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp")
    try:
        _write_mp4(tmp, it, width, height, rate, crf, preset)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, dest)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return None


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class _ChunkSink:
    """Write-only, non-seekable file object: the mp4 muxer's output collects here until drained. Being
    non-seekable keeps the muxer from going back to patch earlier bytes, which a stream cannot take back."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


class FragmentedMp4Writer:
    """H.264 in fragmented mp4 for HTTP streaming: push frames, get bytes as the muxer produces them.

    ``movflags=frag_keyframe+empty_moov+default_base_moof``: the header (ftyp + an empty moov) comes out with the
    first frame, then one fragment (moof + mdat) per GOP, which Media Source Extensions players accept. x264 runs
    with ``tune=zerolatency`` and a short GOP (default half a second) so fragments come out early.
    """

    def __init__(
        self, width: int, height: int, fps: float, crf: int = 23, *, gop: int | None = None,
        preset: str = "veryfast",
    ) -> None:
        _check_size(width, height)
        _check_crf(crf)
        rate = _rate(fps)
        if gop is not None and gop < 1:
            raise ValueError(f"gop must be at least 1, got {gop}")
        self.width, self.height = width, height
        self._sink = _ChunkSink()
        self._container = av.open(
            self._sink, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}
        )
        self._stream = self._container.add_stream("libx264", rate=rate, options=_x264_options(crf, preset, True))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.codec_context.gop_size = gop if gop is not None else max(1, round(fps / 2))
        self._n = 0
        self._closed = False

    def write(self, frame: np.ndarray) -> bytes:
        """Encode one (H, W, 3) uint8 RGB frame; return whatever bytes are ready (may be b"")."""
        if self._closed:
            raise ValueError("write to a closed FragmentedMp4Writer")
        vf = _as_frame(frame, self.width, self.height, self._n)
        self._container.mux(self._stream.encode(vf))
        self._n += 1
        return self._sink.drain()

    def close(self) -> bytes:
        """Flush the encoder and the muxer; return the rest of the bytes. A second close returns b""."""
        if self._closed:
            return b""
        self._closed = True
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
        return self._sink.drain()

    def __enter__(self) -> FragmentedMp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_fmp4(frames: Iterable[np.ndarray], fps: float, crf: int = 23) -> bytes:
    """All of ``FragmentedMp4Writer``'s output for ``frames`` at once."""
    first, it = _first_frame(frames)
    writer = FragmentedMp4Writer(first.shape[1], first.shape[0], fps, crf)
    chunks = [writer.write(frame) for frame in it]
    chunks.append(writer.close())
    return b"".join(chunks)
