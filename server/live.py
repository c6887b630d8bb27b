"""Live and streaming sessions at the API: driving frames in, synthesized frames out, through the workers.

The routes (server/api/live.py: the websocket; server/api/stream.py: HTTP streaming) stay thin; this module holds
what they share (DESIGN.md section 4, "Live / streaming frame"):

- ``FramePreparer``: a client's driving frame -> (478, 3) landmarks in the identity's crop pixels. Landmark frames
  arrive mediapipe-normalised; image frames (JPEG/PNG) go through mediapipe's face mesh here, in the API's thread
  pool, with one tracking FaceMesh per stream. The crop follows the face with the same One Euro smoother as video
  ingest (engine/faces.py), so each stream keeps its own smoother.
- ``LiveHub`` (one per app): picks a worker for a stream by rendezvous hashing over the live workers, so a stream
  sticks to one worker (its previous frames live there) and moves only when that worker disappears.
- ``LiveSession``: one stream. It numbers frames, keeps at most ``live_max_inflight`` of them at the worker,
  hands results back in order and watches for a dead worker: a frame unanswered for ``live_reroute_after_s`` makes
  it check the worker's heartbeat; when the worker is gone (or a frame waited ``live_frame_timeout_s``) the stream
  moves to another worker under a new epoch and the unanswered frames are sent again. The new worker starts the
  stream afresh (no previous frame): in Redis mode a stream's temporal state is one frame that the next frames
  rebuild at once, so recovering it means re-routing, not persisting it.
- ``LatestSlot`` and ``StreamStats``: the websocket's latest-wins backpressure and its fps/drop counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine.errors import InvalidLandmarks, NoFaceFound, ResolutionTooHigh
from server.errors import InvalidFrame, NoWorker, TooManyStreams
from server.registry import new_id
from server.schemas import ErrorDetail, LiveFrameMsg
from server.settings import Settings

if TYPE_CHECKING:
    from engine.faces import CropSmoother, FaceMesh
    from server.broker.base import Broker
    from server.metrics import Metrics

log = logging.getLogger("aca.live")

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# How often a session's reply loop wakes to look for stalled frames when no reply comes.
_POLL_S = 0.25
# How long a cached list of live workers is trusted.
_ALIVE_TTL_S = 0.5


# ------------------------------------------------------------------------------------------ driving frames


def is_image(data: bytes) -> bool:
    return data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)


class FramePreparer:
    """One stream's driving frames -> (478, 3) float32 landmarks in crop pixels of a ``size`` square."""

    def __init__(self, size: int, settings: Settings, fps: float = 25.0) -> None:
        self.size = size
        self.settings = settings
        self.fps = fps
        self._smoother: CropSmoother | None = None
        self._mesh: FaceMesh | None = None
        self._last_face: np.ndarray | None = None

    def _to_crop(self, px: np.ndarray) -> np.ndarray:
        from engine.faces import CropSmoother, crop_box, to_crop

        if self._smoother is None:
            self._smoother = CropSmoother(fps=self.fps)
        return to_crop(px, self._smoother(crop_box(px)), self.size).astype(np.float32)

    def from_landmarks(self, landmarks: Any, image_size: Any = None) -> np.ndarray:
        """Mediapipe-normalised (478, 3) landmarks (x, y in [0, 1] of a w x h frame, z on x's scale)."""
        from engine.faces import validate_landmarks

        arr = validate_landmarks(landmarks)
        if arr.shape != (478, 3):
            raise InvalidLandmarks("a landmark frame must be (478, 3)", shape=list(arr.shape))
        w, h = 1.0, 1.0
        if image_size is not None:
            try:
                w, h = (float(v) for v in image_size)
            except (TypeError, ValueError):
                raise InvalidLandmarks("image_size must be [width, height]") from None
            if not (np.isfinite([w, h]).all() and w > 0 and h > 0):
                raise InvalidLandmarks("image_size must be two positive numbers", image_size=[w, h])
        px = arr.astype(np.float64) * np.array([w, h, w])
        return self._to_crop(px)

    def from_image(self, data: bytes) -> np.ndarray:
        """A JPEG or PNG of a driving face. A frame without a face holds the last face seen (so a stream keeps
        its timing); ``NoFaceFound`` while no face has been seen yet."""
        image = self.decode(data)
        if self._mesh is None:
            from engine.faces import FaceMesh

            self._mesh = FaceMesh(static_image_mode=False)
        found = self._mesh.detect(image)
        if found is None:
            if self._last_face is None:
                raise NoFaceFound("no face found in the driving frame")
            return self._last_face
        self._last_face = self._to_crop(found)
        return self._last_face

    def decode(self, data: bytes) -> np.ndarray:
        """JPEG/PNG bytes -> (H, W, 3) uint8 RGB, the size checked from the header before any pixel is decoded."""
        from PIL import Image, UnidentifiedImageError

        if not is_image(data):
            raise InvalidFrame("a binary frame must be a JPEG or PNG image")
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                s = self.settings
                if max(w, h) > max(s.max_video_width, s.max_video_height) or \
                        min(w, h) > min(s.max_video_width, s.max_video_height):
                    raise ResolutionTooHigh(f"a {w}x{h} frame is larger than allowed", width=w, height=h)
                return np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InvalidFrame(f"the image could not be decoded: {e}"[:200]) from None

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None


# ------------------------------------------------------------------------------------------------- routing


def rendezvous(stream_id: str, workers: list[str]) -> str:
    """Highest-random-weight hashing: the same stream picks the same worker while it lives, and only streams of
    a worker that leaves move (to the one that scores next)."""
    return max(workers, key=lambda w: hashlib.blake2b(f"{stream_id}|{w}".encode(), digest_size=8).digest())


class LiveHub:
    """What every session of one API process shares: settings, the bus, metrics and the live workers."""

    def __init__(self, settings: Settings, broker: Broker, metrics: Metrics) -> None:
        self.settings = settings
        self.broker = broker
        self.bus = broker.live
        self.metrics = metrics
        self._alive: list[str] = []
        self._alive_at = -1e9

    async def alive(self, fresh: bool = False) -> list[str]:
        if fresh or time.monotonic() - self._alive_at > _ALIVE_TTL_S:
            self._alive = sorted(w.worker_id for w in await self.broker.workers())
            self._alive_at = time.monotonic()
        return self._alive

    async def pick(self, stream_id: str, exclude: frozenset[str] = frozenset()) -> str | None:
        alive = await self.alive(fresh=bool(exclude))
        choices = [w for w in alive if w not in exclude] or alive
        return rendezvous(stream_id, choices) if choices else None


# ------------------------------------------------------------------------------------------------ sessions


@dataclass
class Result:
    """A synthesized frame (or the error that stopped it) of a session, in the order frames were submitted."""

    n: int
    seq: int
    data: bytes  # JPEG, or raw (size, size, 3) RGB when the session asked for "raw"
    size: int
    worker: str
    error: ErrorDetail | None
    timings: dict[str, float]


@dataclass
class _Sent:
    seq: int
    payload: bytes
    received_at: float  # monotonic time the API got the client's frame
    prepare_s: float
    sent_at: float  # monotonic time of the latest send (re-sent after a move)


class LiveSession:
    """One stream through the workers (see the module docstring). Use ``async with``."""

    def __init__(self, hub: LiveHub, identity_id: str, size: int, encoding: Literal["jpeg", "raw"] = "jpeg",
                 window: int | None = None) -> None:
        s = hub.settings
        self.hub = hub
        self.stream_id = new_id("str")
        self.identity_id = identity_id
        self.size = size
        self.encoding = encoding
        self.window = window or s.live_max_inflight
        self.epoch = 0
        self.worker: str | None = None
        self.moves = 0
        self._n = 0
        self._next = 0
        self._inflight: dict[int, _Sent] = {}
        self._ready: dict[int, Result] = {}
        self._cond = asyncio.Condition()
        self._failed: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._touched = time.monotonic()
        self._closing = False
        self._closed = False

    async def __aenter__(self) -> LiveSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        bus = self.hub.bus
        if await bus.open(self.stream_id) is None:
            limit = self.hub.settings.live_max_streams
            raise TooManyStreams(f"{limit} live streams are open, the most this server serves; try again later",
                                 limit=limit)
        self.worker = await self.hub.pick(self.stream_id)
        if self.worker is None:
            await bus.close(self.stream_id)
            raise NoWorker("no worker is alive to serve the stream; try again later")
        self._task = asyncio.create_task(self._replies(), name=f"live-{self.stream_id}")

    async def close(self) -> None:
        """Free the stream's place at once, then stop the reply loop and tell the worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        with contextlib.suppress(Exception):
            await self.hub.bus.close(self.stream_id)
        if self._task is not None:
            # Let the reply loop see the flag at its next poll rather than cancel it inside a blocking read (a
            # cancelled BLPOP of redis-py's asyncio client can swallow the cancellation and keep looping).
            done, _ = await asyncio.wait({self._task}, timeout=4 * _POLL_S)
            if not done:
                self._task.cancel()
            self._task = None
        with contextlib.suppress(Exception):  # best effort: the worker also forgets idle streams by itself
            if self.worker is not None:
                await self.hub.bus.send(self.worker, LiveFrameMsg(kind="close", stream_id=self.stream_id,
                                                                  epoch=self.epoch))

    # --- frames in --------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Frames submitted whose results were not handed out yet."""
        return self._n - self._next

    def _has_room(self) -> bool:
        return self._failed is not None or (len(self._inflight) < self.window
                                            and len(self._ready) < self.hub.settings.live_max_buffered)

    async def wait_room(self) -> None:
        """Until a frame may be submitted without exceeding the window (and the result buffer)."""
        async with self._cond:
            await self._cond.wait_for(self._has_room)

    async def submit(self, seq: int, landmarks: np.ndarray, received_at: float, prepare_s: float = 0.0) -> int:
        """Send a prepared frame (waits for room first); returns its number ``n``."""
        await self.wait_room()
        if self._failed is not None:
            raise self._failed
        assert self.worker is not None
        n = self._n
        self._n += 1
        payload = np.ascontiguousarray(landmarks, dtype=np.float32).tobytes()  # (478, 3) float32
        self._inflight[n] = _Sent(seq=seq, payload=payload, received_at=received_at, prepare_s=prepare_s,
                                  sent_at=time.monotonic())
        await self.hub.bus.send(self.worker, self._msg(n, seq), payload)
        return n

    def _msg(self, n: int, seq: int) -> LiveFrameMsg:
        return LiveFrameMsg(stream_id=self.stream_id, identity_id=self.identity_id, epoch=self.epoch, n=n, seq=seq,
                            encoding=self.encoding)

    # --- results out ------------------------------------------------------------------------------------------

    async def next_result(self) -> Result:
        """The result of the oldest frame not handed out yet (call only while ``pending``)."""
        async with self._cond:
            await self._cond.wait_for(lambda: self._next in self._ready or self._failed is not None)
            if self._next not in self._ready:
                assert self._failed is not None
                raise self._failed
            result = self._ready.pop(self._next)
            self._next += 1
            self._cond.notify_all()  # the result buffer has room again
            return result

    async def _replies(self) -> None:
        try:
            while not self._closing:
                items = await self.hub.bus.receive(self.stream_id, _POLL_S)
                now = time.monotonic()
                async with self._cond:
                    for msg, payload in items:
                        sent = self._inflight.get(msg.n)
                        if msg.epoch != self.epoch or sent is None:
                            continue  # from a worker this stream has left, or answered already
                        del self._inflight[msg.n]
                        timings = {**msg.timings, "prepare_s": sent.prepare_s, "latency_s": now - sent.received_at}
                        self._ready[msg.n] = Result(n=msg.n, seq=msg.seq, data=payload, size=msg.size,
                                                    worker=msg.worker, error=msg.error, timings=timings)
                    if items:
                        self._cond.notify_all()
                await self._watch(now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the bus broke: the stream ends with the error
            log.exception("live session %s lost its bus", self.stream_id)
            async with self._cond:
                self._failed = exc
                self._cond.notify_all()

    async def _watch(self, now: float) -> None:
        """Move the stream when its worker has stopped answering (see the module docstring)."""
        if now - self._touched > 1.0:
            self._touched = now
            await self.hub.bus.touch(self.stream_id)
        if not self._inflight:
            return
        age = now - min(s.sent_at for s in self._inflight.values())
        s = self.hub.settings
        if age < s.live_reroute_after_s:
            return
        alive = await self.hub.alive(fresh=True)
        if self.worker in alive and age < s.live_frame_timeout_s:
            return  # busy, not dead
        target = await self.hub.pick(self.stream_id, exclude=frozenset({self.worker or ""}))
        if target is None:
            if age >= s.live_frame_timeout_s:
                async with self._cond:
                    self._failed = NoWorker("no worker is alive to serve the stream")
                    self._cond.notify_all()
            return
        await self._move(target)

    async def _move(self, target: str) -> None:
        log.warning("live stream %s moves from worker %s to %s", self.stream_id, self.worker, target)
        self.hub.metrics.inc("aca_live_stream_moves_total")
        self.worker, self.epoch, self.moves = target, self.epoch + 1, self.moves + 1
        now = time.monotonic()
        for n in sorted(self._inflight):
            sent = self._inflight[n]
            sent.sent_at = now
            await self.hub.bus.send(target, self._msg(n, sent.seq), sent.payload)


# ----------------------------------------------------------------------------------------- backpressure


class LatestSlot:
    """A one-frame mailbox where a newer frame replaces an older one that was not taken yet (latest wins)."""

    def __init__(self) -> None:
        self._item: Any = None
        self._event = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def put(self, item: Any) -> None:
        if self._item is not None:
            self.dropped += 1
        self._item = item
        self._event.set()

    def close(self) -> None:
        self.closed = True
        self._event.set()

    async def take(self) -> Any:
        """The newest frame, or None once closed and empty."""
        while self._item is None:
            if self.closed:
                return None
            self._event.clear()
            await self._event.wait()
        item, self._item = self._item, None
        return item


@dataclass
class StreamStats:
    received: int = 0
    served: int = 0
    errors: int = 0
    dropped: int = 0
    _times: deque[float] = field(default_factory=lambda: deque(maxlen=30))

    def served_now(self) -> None:
        self.served += 1
        self._times.append(time.monotonic())

    @property
    def fps(self) -> float:
        """Frames served per second over the last (up to) 30 frames."""
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0

    def public(self) -> dict[str, float | int]:
        drop_rate = self.dropped / self.received if self.received else 0.0
        return {"received": self.received, "served": self.served, "dropped": self.dropped, "errors": self.errors,
                "fps": round(self.fps, 2), "drop_rate": round(drop_rate, 4)}
