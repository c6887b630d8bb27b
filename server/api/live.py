"""WS /v1/identities/{id}/live: drive an identity live.

Protocol (JSON text messages and binary messages on one websocket):

client -> server
    ``{"seq": 7, "landmarks": [[x, y, z] * 478], "image_size": [w, h]}``  a landmark frame, mediapipe-normalised
                                                                            (image_size optional, default [1, 1])
    binary: 4-byte big-endian seq + JPEG or PNG bytes                       an image of a driving face (the server
                                                                            runs mediapipe on it)
    ``{"type": "end"}``                                                     no more frames: the server answers
                                                                            what it holds, sends "end", closes 1000
server -> client
    ``{"type": "ready", "stream_id", "image_size", "worker", ...}``         once, first
    binary: 4-byte big-endian header length + header JSON + JPEG            a synthesized frame; the header holds
                                                                            type "frame", seq, timings (seconds:
                                                                            prepare, queue, model, encode,
                                                                            latency) and the stream's fps,
                                                                            received, served, dropped
    ``{"type": "error", "seq": 7, "error": {code, message, details}}``      a frame that could not be served; the
                                                                            stream goes on
    ``{"type": "end", "stats": {...}}``                                     after "end", before the close

Backpressure is latest-wins (server/live.py): at most ``live_max_inflight`` frames of a stream are at a worker,
the newest of the others waits in a one-frame slot, older ones are dropped and counted. Close codes: 1000 the
client ended, 1011 server error, 1013 too many streams or no worker (try again later), 4401 unauthorized,
4404 identity not found, 4408 idle for ``live_idle_timeout_s``, 4409 identity not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from engine.errors import AcaError, UserError
from server.api.deps import AppState, live_hub, ws_owner
from server.errors import InvalidFrame, InvalidRequest, PayloadTooLarge
from server.live import FramePreparer, LatestSlot, LiveSession, StreamStats, is_image
from server.schemas import ErrorDetail

log = logging.getLogger("aca.live")

router = APIRouter(tags=["live"])

CLOSE_CODES = {"unauthorized": 4401, "identity_not_found": 4404, "identity_not_ready": 4409,
               "too_many_streams": 1013, "no_worker": 1013}
CLOSE_IDLE = 4408
# A frame result whose error means the stream cannot go on.
_FATAL = frozenset({"identity_not_found", "identity_not_ready"})


@router.websocket("/v1/identities/{identity_id}/live")
async def live(websocket: WebSocket, identity_id: str) -> None:
    st: AppState = websocket.app.state.aca
    await websocket.accept()
    try:
        who = ws_owner(websocket)
        identity = await st.service.ready_identity(identity_id, who)
        assert identity.image_size is not None
        session = LiveSession(live_hub(st), identity.id, identity.image_size)
        await session.open()
    except AcaError as e:
        await refuse(websocket, e)
        return
    preparer = FramePreparer(identity.image_size, st.settings)
    try:
        await LiveConnection(websocket, session, preparer, st).run()
    finally:
        await session.close()
        await run_in_threadpool(preparer.close)


def _reason(code: str, message: str) -> str:
    # A close reason is at most 123 bytes of UTF-8.
    return f"{code}: {message}".encode()[:120].decode(errors="ignore")


async def refuse(websocket: WebSocket, e: AcaError) -> None:
    """Tell the client why (an error message, then a close code and reason) and close."""
    with contextlib.suppress(Exception):
        await websocket.send_json({"type": "error", "seq": None, "error": ErrorDetail(
            code=e.code, message=e.message, details={k: v for k, v in e.details.items()
                                                     if isinstance(v, str | int | float)}).model_dump()})
        await websocket.close(CLOSE_CODES.get(e.code, 1011), _reason(e.code, e.message))


def frame_message(header: dict[str, Any], data: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + data


class LiveConnection:
    """One websocket's three tasks: receive (into the latest-wins slot), pump (prepare and submit), send."""

    def __init__(self, websocket: WebSocket, session: LiveSession, preparer: FramePreparer, st: AppState) -> None:
        self.ws = websocket
        self.session = session
        self.preparer = preparer
        self.settings = st.settings
        self.metrics = st.metrics
        self.slot = LatestSlot()
        self.stats = StreamStats()
        self._send_lock = asyncio.Lock()
        self._next_seq = 0

    async def run(self) -> None:
        await self._send_json({"type": "ready", "stream_id": self.session.stream_id,
                               "identity_id": self.session.identity_id, "image_size": self.session.size,
                               "worker": self.session.worker, "max_inflight": self.session.window})
        pump = asyncio.create_task(self._pump())
        sender = asyncio.create_task(self._send_results())
        try:
            how = await self._receive()
            if how == "end":
                self.slot.close()
                await pump
                await self._drained(sender)
                await self._send_json({"type": "end", "stats": self._public_stats()})
                await self.session.close()  # its place is free before the client sees the close
                await self._close(1000, "end of stream")
            elif how == "idle":
                await self.session.close()
                idle = self.settings.live_idle_timeout_s
                await self._close(CLOSE_IDLE, _reason("idle", f"no message for {idle:g} s"))
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away while we were answering
        finally:
            for task in (pump, sender):
                task.cancel()
            for task in (pump, sender):
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                    await task
            self.stats.dropped = self.slot.dropped
            self.metrics.inc("aca_live_frames_dropped_total", n=self.stats.dropped)

    async def _drained(self, sender: asyncio.Task[None]) -> None:
        while self.session.pending and not sender.done():
            await asyncio.sleep(0.005)

    # --- receive ----------------------------------------------------------------------------------------------

    async def _receive(self) -> str:
        """Until the client ends ("end"), goes away ("disconnect") or falls silent ("idle")."""
        limit = self.settings.live_max_frame_bytes
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=self.settings.live_idle_timeout_s)
            except TimeoutError:
                return "idle"
            if message["type"] == "websocket.disconnect":
                return "disconnect"
            t = time.monotonic()
            data: bytes | None = message.get("bytes")
            text: str | None = message.get("text")
            size = len(data) if data is not None else len((text or "").encode())
            if size > limit:
                await self._error(None, PayloadTooLarge(f"a frame of {size} bytes is larger than {limit}",
                                                        size=size, limit=limit))
                continue
            try:
                item = self._binary(data, t) if data is not None else self._text(text or "", t)
            except UserError as e:
                await self._error(getattr(e, "seq", None), e)
                continue
            if item == "end":
                return "end"
            self.stats.received += 1
            self.slot.put(item)

    def _seq(self, value: Any) -> int:
        seq = self._next_seq if value is None else value
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidRequest("seq must be a non-negative integer")
        self._next_seq = seq + 1
        return seq

    def _binary(self, data: bytes, t: float) -> tuple[Any, ...]:
        if len(data) < 4:
            raise InvalidFrame("a binary frame is a 4-byte sequence number followed by a JPEG or PNG")
        seq = self._seq(struct.unpack_from(">I", data)[0])
        if not is_image(data[4:]):
            e = InvalidFrame("a binary frame must be a 4-byte sequence number then a JPEG or PNG image")
            e.seq = seq  # type: ignore[attr-defined]
            raise e
        return ("image", seq, data[4:], None, t)

    def _text(self, text: str, t: float) -> tuple[Any, ...] | str:
        from engine.faces import validate_landmarks

        try:
            obj = json.loads(text)
        except ValueError:
            raise InvalidRequest("a text message must be JSON: {\"seq\": n, \"landmarks\": [...]}") from None
        if not isinstance(obj, dict):
            raise InvalidRequest("a text message must be a JSON object")
        if obj.get("type") in ("end", "close"):
            return "end"
        seq = self._seq(obj.get("seq"))
        try:
            # Checked here, not when the frame is taken: every bad frame gets its error, even one that a newer
            # frame would have replaced.
            landmarks = validate_landmarks(obj.get("landmarks"))
            if landmarks.shape != (478, 3):
                raise InvalidFrame(f"a landmark frame must be (478, 3), got {tuple(landmarks.shape)}")
        except UserError as e:
            e.seq = seq  # type: ignore[attr-defined]
            raise
        return ("landmarks", seq, landmarks, obj.get("image_size"), t)

    # --- pump -------------------------------------------------------------------------------------------------

    async def _pump(self) -> None:
        while True:
            await self.session.wait_room()  # frames that arrive meanwhile replace each other in the slot
            item = await self.slot.take()
            if item is None:
                return
            kind, seq, payload, image_size, received = item
            t0 = time.monotonic()
            try:
                if kind == "image":
                    landmarks = await run_in_threadpool(self.preparer.from_image, payload)
                else:
                    landmarks = await run_in_threadpool(self.preparer.from_landmarks, payload, image_size)
            except UserError as e:
                self.stats.errors += 1
                await self._error(seq, e)
                continue
            await self.session.submit(seq, landmarks, received, prepare_s=time.monotonic() - t0)

    # --- send -------------------------------------------------------------------------------------------------

    async def _send_results(self) -> None:
        while True:
            try:
                result = await self.session.next_result()
            except AcaError as e:
                await self._error(None, e)
                await self._close(CLOSE_CODES.get(e.code, 1011), _reason(e.code, e.message))
                return
            if result.error is not None:
                self.stats.errors += 1
                await self._send_json({"type": "error", "seq": result.seq, "error": result.error.model_dump()})
                if result.error.code in _FATAL:
                    await self._close(CLOSE_CODES[result.error.code],
                                      _reason(result.error.code, result.error.message))
                    return
                continue
            self.stats.served_now()
            self.stats.dropped = self.slot.dropped
            timings = {k: round(v, 6) for k, v in result.timings.items()}
            self.metrics.observe("aca_live_latency_seconds", result.timings.get("latency_s", 0.0))
            header = {"type": "frame", "seq": result.seq, "size": result.size, "worker": result.worker,
                      "timings": timings, **self._public_stats()}
            async with self._send_lock:
                await self.ws.send_bytes(frame_message(header, result.data))

    def _public_stats(self) -> dict[str, Any]:
        self.stats.dropped = self.slot.dropped
        return {**self.stats.public(), "moves": self.session.moves}

    async def _send_json(self, obj: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(obj, separators=(",", ":")))

    async def _error(self, seq: int | None, e: AcaError) -> None:
        details = {k: v for k, v in e.details.items() if isinstance(v, str | int | float | list)}
        await self._send_json({"type": "error", "seq": seq,
                               "error": {"code": e.code, "message": e.message, "details": details}})

    async def _close(self, code: int, reason: str) -> None:
        async with self._send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await self.ws.close(code, reason)
