"""The workers' dynamic batcher for live frames (after Triton Inference Server's dynamic batcher).

A thread of each Worker (server/worker.py) takes the frames addressed to it on the live bus and serves them in
batches: the first frame waits at most ``live_batch_delay_ms`` (Triton's ``max_queue_delay_microseconds``) for
others to join, up to ``live_batch_size`` frames (``max_batch_size``), and the batch goes through
``Synthesizer.render`` as one forward pass, frames of different streams and identities together. A batch holds
at most one frame per stream: frame t needs frame t-1's output (f_p, paper section 3.1), so a stream's next frame
waits for the next batch, in order.

Per stream the worker keeps a ``StreamState`` (the previous output), keyed by stream id and the API's ``epoch``: a
stream that comes back under a new epoch (it was moved here after its worker died, or away and back) starts
afresh, as does a stream this worker has never seen. States idle for twice ``live_idle_timeout_s`` are forgotten.
The model is shared with the worker's render jobs under ``Worker.synth_lock`` (a Synthesizer is not thread-safe).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from engine.errors import UserError
from server.broker.live import FrameItem, LiveBus
from server.metrics import BATCH_BUCKETS
from server.schemas import ErrorDetail, LiveFrameMsg, LiveReplyMsg

if TYPE_CHECKING:
    from engine.runtime.synthesizer import StreamState
    from server.worker import Worker

log = logging.getLogger("aca.live")

# How long an idle batcher blocks before it looks at its stop flag again.
_TAKE_TIMEOUT_S = 0.5


@dataclass
class _Stream:
    state: StreamState
    epoch: int
    last_seen: float


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """(S, S, 3) uint8 RGB -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


class LiveBatcher:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.bus: LiveBus = worker.broker.live
        self._streams: dict[str, _Stream] = {}
        self._deferred: list[FrameItem] = []
        self._last_sweep = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                batch = self._collect()
                if batch:
                    self._serve(batch)
                self._sweep()
            except Exception:  # noqa: BLE001 -- a bus hiccup must not end live service; the API reroutes if it lasts
                log.exception("live batcher of %s failed", self.worker.worker_id)
                stop.wait(0.5)

    # ----------------------------------------------------------------------------------------------- batching

    def _collect(self) -> list[FrameItem]:
        """The next batch: deferred frames first, then new ones until the batch is full or the delay is over."""
        s = self.settings
        items = self._deferred + self.bus.take(self.worker.worker_id, s.live_batch_size,
                                               0.0 if self._deferred else _TAKE_TIMEOUT_S)
        self._deferred = []
        if not items:
            return []
        deadline = time.monotonic() + s.live_batch_delay_ms / 1000
        while len(items) < s.live_batch_size and (left := deadline - time.monotonic()) > 0:
            items += self.bus.take(self.worker.worker_id, s.live_batch_size - len(items), left)
        batch: list[FrameItem] = []
        in_batch: set[str] = set()
        for item in items:
            msg = item[0]
            if msg.kind == "close":
                self._streams.pop(msg.stream_id, None)
            elif msg.stream_id in in_batch or len(batch) >= s.live_batch_size:
                self._deferred.append(item)  # its stream's earlier frame is in this batch: next batch, in order
            else:
                in_batch.add(msg.stream_id)
                batch.append(item)
        return batch

    def _state(self, msg: LiveFrameMsg) -> StreamState:
        stream = self._streams.get(msg.stream_id)
        if stream is None or stream.epoch != msg.epoch:
            stream = _Stream(state=self.worker.load_model().new_stream(), epoch=msg.epoch, last_seen=0.0)
            self._streams[msg.stream_id] = stream
        stream.last_seen = time.monotonic()
        return stream.state

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        limit = now - 2 * self.settings.live_idle_timeout_s
        for sid in [k for k, v in self._streams.items() if v.last_seen < limit]:
            del self._streams[sid]

    # ------------------------------------------------------------------------------------------------ serving

    def _serve(self, batch: list[FrameItem]) -> None:
        from engine.runtime.synthesizer import FrameRequest

        started = time.time()
        requests, served = [], []
        for msg, payload in batch:
            try:
                assets = self.worker.identity(msg.identity_id)
                landmarks = np.frombuffer(payload, dtype=np.float32).reshape(478, 3)
            except (UserError, ValueError) as exc:
                self._reply_error(msg, exc)
                continue
            requests.append(FrameRequest(identity_id=msg.identity_id, assets=assets, landmarks=landmarks,
                                         state=self._state(msg)))
            served.append(msg)
        if not requests:
            return
        try:
            with self.worker.synth_lock:
                rendered = self.worker.load_model().render(requests)
        except Exception as exc:  # noqa: BLE001 -- every frame of the batch gets the error; the streams start afresh
            log.exception("live batch of %d frames failed", len(requests))
            for msg in served:
                self._streams.pop(msg.stream_id, None)
                self._reply_error(msg, exc)
            return
        n = len(requests)
        self.worker.metrics.inc("aca_live_frames_total", {"outcome": "synthesized"}, n=n)
        self.worker.metrics.observe("aca_live_batch_size", n, buckets=BATCH_BUCKETS)
        for msg, frame in zip(served, rendered, strict=True):
            t0 = time.perf_counter()
            if msg.encoding == "raw":
                payload = np.ascontiguousarray(frame.image).tobytes()
            else:
                payload = encode_jpeg(frame.image, self.settings.live_jpeg_quality)
            timings = {
                # From the API's send to the start of this batch: bus transit, the queue and the batch delay.
                "queue_s": max(0.0, started - msg.submitted_at),
                "model_s": frame.timings.get("prepare_s", 0.0) + frame.timings.get("model_s", 0.0),
                "encode_s": time.perf_counter() - t0,
                "batch": float(n),
            }
            self.bus.reply(LiveReplyMsg(stream_id=msg.stream_id, epoch=msg.epoch, n=msg.n, seq=msg.seq,
                                        worker=self.worker.worker_id, size=int(frame.image.shape[0]),
                                        timings=timings), payload)

    def _reply_error(self, msg: LiveFrameMsg, exc: BaseException) -> None:
        if isinstance(exc, UserError):
            err = ErrorDetail(code=exc.code, message=exc.message)
        else:
            err = ErrorDetail(code="internal_error", message=f"{type(exc).__name__}: {exc}"[:300])
        self.worker.metrics.inc("aca_live_frames_total", {"outcome": "failed"})
        self.bus.reply(LiveReplyMsg(stream_id=msg.stream_id, epoch=msg.epoch, n=msg.n, seq=msg.seq,
                                    worker=self.worker.worker_id, error=err))
