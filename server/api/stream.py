"""POST /v1/identities/{id}/stream: HTTP streaming for frame-by-frame pipelines.

The request body streams driving frames: newline-delimited JSON (``application/x-ndjson``; each line
``{"landmarks": [[x, y, z] * 478], "image_size": [w, h]}`` or just the landmarks array, mediapipe-normalised), or a
multipart stream of JPEG/PNG images (``multipart/mixed`` or ``multipart/form-data``, one image per part). The
response streams the synthesized frames as they are ready: ``multipart/x-mixed-replace`` JPEG parts (with
``X-Seq`` and ``X-Timings`` headers) by default, or H.264 in fragmented mp4 with ``?format=mp4``.

Unlike the websocket, nothing is dropped and order is kept: the session keeps ``live_max_inflight`` frames at the
worker and stops reading the body while the window is full (TCP backpressure on the sender). The response starts
with the first synthesized frame, so a bad first frame is a plain 4xx error; a bad frame later ends a JPEG stream
with a ``application/json`` error part, and ends an mp4 stream by aborting the response (the chunked body is left
incomplete, which clients report as an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from engine.errors import AcaError, InvalidLandmarks, NoFaceFound, ResolutionTooHigh
from server.api.deps import AppState, live_hub, owner, state
from server.errors import (
    IdentityNotFound,
    IdentityNotReady,
    InternalError,
    InvalidFrame,
    InvalidRequest,
    NoWorker,
    TooManyStreams,
    Unauthorized,
    UnsupportedMediaType,
    error_body,
    error_responses,
)
from server.live import FramePreparer, LiveSession, Result

router = APIRouter(prefix="/v1", tags=["live"])

BOUNDARY = "frame"
_NDJSON = frozenset({"application/x-ndjson", "application/jsonl", "application/json-seq", "application/ndjson"})
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-ndjson": {"schema": {"type": "string", "description": "one landmark frame per line"}},
            "multipart/mixed": {"schema": {"type": "string", "description": "one JPEG/PNG image per part"}},
        },
    }
}

# Parsed driving frame: (kind, seq, payload, image_size).
RawFrame = tuple[str, int, Any, Any]


class DuplexStreamingResponse(StreamingResponse):
    """A StreamingResponse that leaves ``receive`` to the request body.

    Starlette's StreamingResponse listens for the client's disconnect on ``receive`` while it streams, which
    swallows the rest of a request body still being read (this route reads its body while it answers). Here the
    feeder reads the body to its end and sees a disconnect itself (ClientDisconnect); the response only sends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(OSError):  # the client went away: nothing left to send to
            await self.stream_response(send)
        if self.background is not None:
            await self.background()


@router.post(
    "/identities/{identity_id}/stream", openapi_extra=_BODY,
    summary="Stream driving frames in, synthesized frames out (multipart JPEG or fragmented mp4)",
    responses={200: {"content": {"multipart/x-mixed-replace": {}, "video/mp4": {}}},
               **error_responses(Unauthorized, IdentityNotFound, IdentityNotReady, InvalidLandmarks, InvalidFrame,
                                 NoFaceFound, ResolutionTooHigh, UnsupportedMediaType, TooManyStreams, NoWorker)},
)
async def stream(identity_id: str, request: Request,
                 format: Literal["jpeg", "mp4"] = Query("jpeg", description="jpeg: multipart/x-mixed-replace"),
                 fps: float = Query(25.0, gt=0, le=120, description="frame rate of the mp4"),
                 who: str = Depends(owner), st: AppState = Depends(state)) -> DuplexStreamingResponse:
    identity = await st.service.ready_identity(identity_id, who)
    assert identity.image_size is not None
    frames = body_frames(request, st.settings.live_max_frame_bytes)
    session = LiveSession(live_hub(st), identity.id, identity.image_size,
                          encoding="raw" if format == "mp4" else "jpeg")
    await session.open()
    pipe = StreamPipeline(session, frames, FramePreparer(identity.image_size, st.settings, fps))
    try:
        first = await pipe.start()
    except BaseException:
        await pipe.close()
        raise
    if format == "mp4":
        return DuplexStreamingResponse(pipe.mp4(first, fps), media_type="video/mp4")
    return DuplexStreamingResponse(pipe.multipart(first),
                                   media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}")


# ---------------------------------------------------------------------------------------------- request body


def body_frames(request: Request, limit: int) -> AsyncIterator[RawFrame]:
    ctype = request.headers.get("content-type", "")
    mime = ctype.split(";")[0].strip().lower()
    if mime in _NDJSON:
        return ndjson_frames(request.stream(), limit)
    if mime.startswith("multipart/"):
        boundary = _boundary(ctype)
        if not boundary:
            raise InvalidRequest("a multipart body needs a boundary parameter")
        return multipart_frames(request.stream(), boundary.encode("latin-1"), limit)
    raise UnsupportedMediaType("send application/x-ndjson landmark frames or a multipart stream of images",
                               content_type=mime)


def _boundary(ctype: str) -> str:
    for param in ctype.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip().strip('"')
    return ""


async def ndjson_frames(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[RawFrame]:
    buf = bytearray()
    seq = 0
    async for chunk in chunks:
        buf += chunk
        while (i := buf.find(b"\n")) >= 0:
            line = bytes(buf[:i])
            del buf[: i + 1]
            if line.strip():
                yield _landmark_line(line, seq)
                seq += 1
        if len(buf) > limit:
            raise InvalidFrame(f"a line of more than {limit} bytes", limit=limit)
    if buf.strip():
        yield _landmark_line(bytes(buf), seq)


def _landmark_line(line: bytes, seq: int) -> RawFrame:
    try:
        obj = json.loads(line)
    except ValueError:
        raise InvalidFrame(f"line {seq + 1} is not JSON", seq=seq) from None
    if isinstance(obj, dict):
        return ("landmarks", seq, obj.get("landmarks"), obj.get("image_size"))
    return ("landmarks", seq, obj, None)


async def multipart_frames(chunks: AsyncIterator[bytes], boundary: bytes, limit: int) -> AsyncIterator[RawFrame]:
    from python_multipart.multipart import MultipartParser

    done: list[bytes] = []
    part = bytearray()

    def on_part_begin() -> None:
        part.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part.extend(data[start:end])
        if len(part) > limit:
            raise InvalidFrame(f"a part of more than {limit} bytes", limit=limit)

    def on_part_end() -> None:
        done.append(bytes(part))

    parser = MultipartParser(boundary, callbacks={"on_part_begin": on_part_begin, "on_part_data": on_part_data,
                                                  "on_part_end": on_part_end})
    seq = 0
    async for chunk in chunks:
        try:
            parser.write(chunk)
        except InvalidFrame:
            raise
        except Exception as e:  # noqa: BLE001 -- python-multipart's parse errors have no common base we can name
            raise InvalidRequest(f"the multipart body is malformed: {e}"[:200]) from None
        for data in done:
            yield ("image", seq, data, None)
            seq += 1
        done.clear()
    parser.finalize()


# ------------------------------------------------------------------------------------------------- pipeline


class StreamPipeline:
    """A feeder task (parse, prepare, submit, in order) and the response body (results in the same order)."""

    def __init__(self, session: LiveSession, frames: AsyncIterator[RawFrame], preparer: FramePreparer) -> None:
        self.session = session
        self.frames = frames
        self.preparer = preparer
        # What the feeder submitted, in order: a frame number, an error that ended the input, or None (the end).
        self._queue: asyncio.Queue[int | AcaError | None] = asyncio.Queue()
        self._feeder: asyncio.Task[None] | None = None

    async def start(self) -> Result:
        """Start feeding; the first synthesized frame, or the first frame's error (raised)."""
        self._feeder = asyncio.create_task(self._feed())
        first = await self._queue.get()
        if first is None:
            raise InvalidRequest("the body holds no frames")
        if isinstance(first, AcaError):
            raise first
        result = await self.session.next_result()
        if result.error is not None:
            raise InvalidFrame(result.error.message, code=result.error.code)
        return result

    async def _feed(self) -> None:
        try:
            async for kind, seq, payload, image_size in self.frames:
                await self.session.wait_room()
                t = time.monotonic()
                if kind == "image":
                    landmarks = await run_in_threadpool(self.preparer.from_image, payload)
                else:
                    landmarks = await run_in_threadpool(self.preparer.from_landmarks, payload, image_size)
                n = await self.session.submit(seq, landmarks, t, prepare_s=time.monotonic() - t)
                self._queue.put_nowait(n)
            self._queue.put_nowait(None)
        except AcaError as e:
            self._queue.put_nowait(e)
        except Exception as e:  # noqa: BLE001 -- the bus broke: the response ends with an error, not a hang
            self._queue.put_nowait(InternalError(f"{type(e).__name__}: {e}"[:200]))

    async def _results(self) -> AsyncIterator[Result | AcaError]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, AcaError):
                yield item
                return
            yield await self.session.next_result()

    async def multipart(self, first: Result) -> AsyncIterator[bytes]:
        try:
            yield _jpeg_part(first)
            async for r in self._results():
                if isinstance(r, AcaError) or r.error is not None:
                    yield _error_part(r)
                    break
                yield _jpeg_part(r)
            yield f"--{BOUNDARY}--\r\n".encode()
        finally:
            await self.close()

    async def mp4(self, first: Result, fps: float) -> AsyncIterator[bytes]:
        from engine.video import FragmentedMp4Writer

        S = first.size
        writer = FragmentedMp4Writer(S, S, fps)
        try:
            yield await run_in_threadpool(writer.write, _pixels(first))
            async for r in self._results():
                if isinstance(r, AcaError) or r.error is not None:
                    # Headers are gone: abort the response so the client sees an incomplete body, not a short video.
                    raise RuntimeError(f"stream {self.session.stream_id} stopped at a bad frame: {_detail(r)}")
                chunk = await run_in_threadpool(writer.write, _pixels(r))
                if chunk:
                    yield chunk
            yield await run_in_threadpool(writer.close)
        finally:
            await run_in_threadpool(writer.close)
            await self.close()

    async def close(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._feeder
            self._feeder = None
        await self.session.close()
        await run_in_threadpool(self.preparer.close)


def _pixels(r: Result) -> np.ndarray:
    return np.frombuffer(r.data, dtype=np.uint8).reshape(r.size, r.size, 3)  # raw RGB -> (S, S, 3)


def _jpeg_part(r: Result) -> bytes:
    timings = json.dumps({k: round(v, 6) for k, v in r.timings.items()}, separators=(",", ":"))
    head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(r.data)}\r\nX-Seq: {r.seq}\r\n"
            f"X-Timings: {timings}\r\n\r\n")
    return head.encode() + r.data + b"\r\n"


def _detail(r: Result | AcaError) -> tuple[str, str, dict[str, Any]]:
    if isinstance(r, AcaError):
        return r.code, r.message, {k: v for k, v in r.details.items() if isinstance(v, str | int | float)}
    assert r.error is not None
    return r.error.code, r.error.message, {"seq": r.seq}


def _error_part(r: Result | AcaError) -> bytes:
    body = json.dumps(error_body(*_detail(r))).encode()
    head = f"--{BOUNDARY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body + b"\r\n"
