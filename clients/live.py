"""Live driving from Python: ``AvatarClient.live(...)`` (an async iterator of synthesized frames) and ``aca live``.

Speaks the websocket protocol of ``WS /v1/identities/{id}/live`` (documented in server/api/live.py): images go
as binary messages (4-byte big-endian sequence number + JPEG; the server finds the landmarks), landmark arrays as
JSON; each synthesized frame comes back as one binary message (4-byte header length, JSON header, JPEG). Frames
are sent at ``fps`` (like a camera; None: as fast as the socket takes them), and the server drops stale ones when
it falls behind (latest wins), so the iterator yields the frames that were served, in order, with their timings.

    async for frame in client.live(identity_id, video_frames("driving.mp4")[0], fps=25):
        print(frame.seq, frame.latency_s, frame.fps, frame.dropped)
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from clients.errors import ApiConnectionError, ApiError, error_from_payload

Frames = Iterable[Any] | AsyncIterable[Any]


@dataclass
class LiveFrame:
    """One synthesized frame: the JPEG, the driving frame's ``seq`` and the timings (seconds)."""

    seq: int
    jpeg: bytes
    timings: dict[str, float]
    latency_s: float  # measured here: from sending the driving frame to receiving this one
    fps: float  # the stream's served frame rate, as the server measures it
    received: int
    dropped: int
    worker: str = ""

    def image(self) -> np.ndarray:
        """(S, S, 3) uint8 RGB."""
        from PIL import Image

        with Image.open(io.BytesIO(self.jpeg)) as img:
            return np.asarray(img.convert("RGB"))


@dataclass
class LiveSummary:
    """What the server said when the stream ended (``stats``), and any per-frame errors it sent."""

    stats: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)


def _ws_url(base_url: str, identity_id: str) -> str:
    scheme, rest = base_url.rstrip("/").split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/v1/identities/{identity_id}/live"


def _encode(seq: int, frame: Any) -> str | bytes:
    if isinstance(frame, bytes):
        return struct.pack(">I", seq) + frame  # an encoded JPEG or PNG
    arr = np.asarray(frame)
    if arr.shape == (478, 3) or arr.shape == (478, 2):
        return json.dumps({"seq": seq, "landmarks": arr.tolist()})
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        return struct.pack(">I", seq) + buf.getvalue()
    raise ValueError(f"a driving frame is an (H, W, 3) uint8 RGB image, (478, 3) landmarks or JPEG/PNG bytes; "
                     f"got {arr.dtype} {arr.shape}")


async def _aiter(frames: Frames) -> AsyncIterator[Any]:
    if isinstance(frames, AsyncIterable):
        async for f in frames:
            yield f
    else:
        for f in frames:
            yield f


async def live_stream(base_url: str, identity_id: str, frames: Frames, *, fps: float | None = 25.0,
                      headers: dict[str, str] | None = None, summary: LiveSummary | None = None,
                      open_timeout: float = 30.0) -> AsyncIterator[LiveFrame]:
    """Drive ``identity_id`` with ``frames``; yield the synthesized frames as they arrive. After the last frame
    the stream is ended cleanly; ``summary`` (if given) receives the server's final stats and frame errors.
    A refusal (unknown identity, too many streams, no worker) raises the matching ``clients.errors`` class."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    summary = summary if summary is not None else LiveSummary()
    sent_at: dict[int, float] = {}
    try:
        ws = await connect(_ws_url(base_url, identity_id), additional_headers=headers or {}, max_size=None,
                           open_timeout=open_timeout)
    except (OSError, InvalidStatus, TimeoutError) as e:
        raise ApiConnectionError(f"cannot open the live stream at {base_url}: {e}") from e
    async with ws:
        first = json.loads(await ws.recv())
        if first.get("type") == "error":
            raise error_from_payload(first.get("error") or {}, 503)

        async def send() -> None:
            start = time.monotonic()
            seq = 0
            async for frame in _aiter(frames):
                if fps:
                    await asyncio.sleep(max(0.0, start + seq / fps - time.monotonic()))
                message = _encode(seq, frame)
                sent_at[seq] = time.monotonic()
                await ws.send(message)
                seq += 1
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        try:
            while True:
                try:
                    message = await ws.recv()
                except ConnectionClosed:
                    break
                if isinstance(message, bytes):
                    (n,) = struct.unpack_from(">I", message)
                    h = json.loads(message[4 : 4 + n])
                    t0 = sent_at.pop(h["seq"], None)
                    yield LiveFrame(seq=h["seq"], jpeg=message[4 + n :], timings=h.get("timings", {}),
                                    latency_s=time.monotonic() - t0 if t0 is not None else float("nan"),
                                    fps=h.get("fps", 0.0), received=h.get("received", 0),
                                    dropped=h.get("dropped", 0), worker=h.get("worker", ""))
                    continue
                msg = json.loads(message)
                if msg.get("type") == "error":
                    summary.errors.append(msg)
                elif msg.get("type") == "end":
                    summary.stats = msg.get("stats", {})
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]
            if ws.close_code not in (1000, None):
                raise ApiError(f"the live stream closed with {ws.close_code}: {ws.close_reason}",
                               code="stream_closed", status=ws.close_code or 0)
        finally:
            sender.cancel()


def video_frames(path: str | Path) -> tuple[Iterator[np.ndarray], float]:
    """The frames of a video file as (H, W, 3) uint8 RGB, lazily, and its frame rate (PyAV)."""
    import av

    container = av.open(str(path))
    stream = container.streams.video[0]
    fps = float(stream.average_rate or 25)

    def gen() -> Iterator[np.ndarray]:
        with container:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")

    return gen(), fps


# ------------------------------------------------------------------------------------------------------ CLI


def live(
    identity_id: Annotated[str, typer.Argument(help="The identity to drive.")],
    driving: Annotated[Path, typer.Option("--driving", "-d", exists=True, dir_okay=False,
                                          help="Driving video (its frames are sent as JPEG).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the synthesized mp4.")],
    fps: Annotated[float, typer.Option("--fps", help="Send rate; 0: the video's own frame rate.")] = 0.0,
    url: Annotated[str, typer.Option("--url", envvar="ACA_URL", help="Base URL of the server.")]
        = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="ACA_API_KEY", help="Bearer API key.",
                                                show_default=False)] = None,
) -> None:
    """Drive an identity live over the websocket with a video file; write what comes back and print fps and
    latency."""
    frames, video_fps = video_frames(driving)
    rate = fps or video_fps
    try:
        out, summary, seconds = asyncio.run(_collect(url, identity_id, frames, rate, api_key))
    except (ApiError, ApiConnectionError) as e:
        typer.echo(f"error: {e.code}: {e.message}", err=True)
        raise typer.Exit(1) from e
    if not out:
        typer.echo("error: no frame came back", err=True)
        raise typer.Exit(1)
    _write_mp4([f.image() for f in out], rate, output)
    lat = np.array([f.latency_s for f in out]) * 1000
    stats = summary.stats
    typer.echo(f"{len(out)} frames in {seconds:.1f} s: {len(out) / seconds:.1f} fps served, latency p50 "
               f"{np.percentile(lat, 50):.0f} ms p99 {np.percentile(lat, 99):.0f} ms, dropped "
               f"{stats.get('dropped', 0)}/{stats.get('received', 0)} -> {output}")


async def _collect(url: str, identity_id: str, frames: Iterable[np.ndarray], fps: float,
                   api_key: str | None) -> tuple[list[LiveFrame], LiveSummary, float]:
    summary = LiveSummary()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.monotonic()
    out = [f async for f in live_stream(url, identity_id, frames, fps=fps, headers=headers, summary=summary)]
    return out, summary, time.monotonic() - t0


def _write_mp4(images: list[np.ndarray], fps: float, path: Path) -> None:
    import av

    S = images[0].shape[0]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps) or 25)
        stream.width, stream.height, stream.pix_fmt = S, S, "yuv420p"
        for img in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))


def register(app: typer.Typer) -> None:
    """Add ``aca live`` (clients/cli.py mounts it)."""
    app.command(name="live")(live)
