"""POST /v1/identities/{id}/stream on a real uvicorn: NDJSON landmarks or a multipart stream of images in;
multipart/x-mixed-replace JPEG or fragmented mp4 out, every frame in order; bad frames, wrong media types and the
stream limit; the response starts before the request body has ended; the same flow over real Redis."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import cv2
import numpy as np
import pytest
from server_helpers import REDIS_URL, LiveServer, Media, make_settings, settle, upload

NDJSON = {"content-type": "application/x-ndjson"}


def ndjson(frames: list[Any]) -> bytes:
    return b"".join(json.dumps({"landmarks": f}).encode() + b"\n" for f in frames)


def parts(body: bytes, boundary: bytes = b"frame") -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/x-mixed-replace response: (headers, payload), using Content-Length."""
    out, pos = [], 0
    delim = b"--" + boundary + b"\r\n"
    while body.startswith(delim, pos):
        end = body.index(b"\r\n\r\n", pos)
        headers = dict(line.split(": ", 1) for line in body[pos + len(delim) : end].decode().split("\r\n"))
        n = int(headers["Content-Length"])
        out.append((headers, body[end + 4 : end + 4 + n]))
        pos = end + 4 + n + 2
    assert body[pos:] == b"--" + boundary + b"--\r\n", body[pos : pos + 100]
    return out


@pytest.fixture(scope="module")
def stream_server(tmp_path_factory: pytest.TempPathFactory, media: Media) -> Iterator[tuple[LiveServer, str]]:
    settings = make_settings(tmp_path_factory.mktemp("stream") / "data", live_max_streams=2,
                             live_max_frame_bytes=200_000)
    with LiveServer(settings) as server, server.client() as c:
        ident = settle(c, upload(c, media.reference).json()["status_url"])
        assert ident["status"] == "ready", ident
        yield server, ident["id"]


def _check_ndjson_flow(server: LiveServer, identity_id: str, media: Media) -> None:
    n = 14
    frames = [media.landmarks[i % 5] for i in range(n)]
    with server.client() as c:
        r = c.post(f"/v1/identities/{identity_id}/stream", content=ndjson(frames), headers=NDJSON)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("multipart/x-mixed-replace")
    got = parts(r.content)
    assert [int(h["X-Seq"]) for h, _ in got] == list(range(n))  # in order, none dropped
    for h, jpeg in got:
        assert h["Content-Type"] == "image/jpeg"
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
        assert {"queue_s", "model_s", "encode_s"} <= set(json.loads(h["X-Timings"]))


def test_ndjson_in_multipart_jpeg_out_in_order(stream_server: tuple[LiveServer, str], media: Media) -> None:
    _check_ndjson_flow(*stream_server, media)


def test_mp4_out_has_every_frame(stream_server: tuple[LiveServer, str], media: Media) -> None:
    from engine.video import decode

    server, identity_id = stream_server
    n = 12
    with server.client() as c:
        r = c.post(f"/v1/identities/{identity_id}/stream", params={"format": "mp4", "fps": 10},
                   content=ndjson([media.landmarks[i % 5] for i in range(n)]), headers=NDJSON)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    video = decode(r.content)
    assert video.frames.shape == (n, 64, 64, 3) and abs(video.fps - 10) < 0.01


def test_multipart_images_in(stream_server: tuple[LiveServer, str]) -> None:
    from engine.synthetic import random_identity, sequence

    server, identity_id = stream_server
    images = sequence(random_identity(4), 6, seed=4, size=128).images
    body = b""
    for im in images:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        body += b"--xyz\r\nContent-Type: image/png\r\n\r\n" + buf.tobytes() + b"\r\n"
    body += b"--xyz--\r\n"
    with server.client() as c:
        r = c.post(f"/v1/identities/{identity_id}/stream", content=body,
                   headers={"content-type": "multipart/mixed; boundary=xyz"})
    assert r.status_code == 200, r.text
    assert [int(h["X-Seq"]) for h, _ in parts(r.content)] == list(range(6))


def test_bad_frames_and_media_types(stream_server: tuple[LiveServer, str], media: Media) -> None:
    server, identity_id = stream_server
    url = f"/v1/identities/{identity_id}/stream"
    with server.client() as c:
        # A bad first frame: a plain error response.
        r = c.post(url, content=ndjson([[[0.1, 0.2, 0.3]] * 5]), headers=NDJSON)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_landmarks"
        r = c.post(url, content=b"\x00\x01garbage\n", headers=NDJSON)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_frame"
        r = c.post(url, content=b"--b\r\n\r\nnot an image\r\n--b--\r\n",
                   headers={"content-type": "multipart/mixed; boundary=b"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_frame"
        r = c.post(url, content=b"x" * 300_000 + b"\n", headers=NDJSON)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_frame"
        r = c.post(url, content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = c.post("/v1/identities/idn_nope/stream", content=ndjson(media.landmarks[:1]), headers=NDJSON)
        assert r.status_code == 404
        # A bad frame later: the frames before it, then a JSON error part, then the end.
        nan = np.array(media.landmarks[0])
        nan[0, 0] = np.nan
        body = ndjson(media.landmarks[:3]) + json.dumps({"landmarks": nan.tolist()}).encode() + b"\n"
        r = c.post(url, content=body + ndjson(media.landmarks[:2]), headers=NDJSON)
    assert r.status_code == 200
    got = parts(r.content)
    assert [h.get("X-Seq") for h, _ in got] == ["0", "1", "2", None]
    assert got[-1][0]["Content-Type"] == "application/json"
    assert json.loads(got[-1][1])["error"]["code"] == "invalid_landmarks"


def test_response_streams_before_the_body_ends(stream_server: tuple[LiveServer, str], media: Media) -> None:
    """A duplex client (raw socket, chunked body): the first frame arrives while the body is still open."""
    server, identity_id = stream_server
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(f"POST /v1/identities/{identity_id}/stream HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  "application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n".encode())

        def chunk(data: bytes) -> None:
            s.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        chunk(ndjson(media.landmarks[:1]))
        received = b""
        deadline = time.monotonic() + 30
        while b"X-Seq: 0" not in received and time.monotonic() < deadline:
            received += s.recv(65536)
        assert received.startswith(b"HTTP/1.1 200") and b"X-Seq: 0" in received
        chunk(ndjson(media.landmarks[1:3]))
        s.sendall(b"0\r\n\r\n")
        while b"--frame--" not in received and time.monotonic() < deadline:
            received += s.recv(65536)
    assert re.findall(rb"X-Seq: (\d+)", received) == [b"0", b"1", b"2"]


def test_stream_limit_is_429(tmp_path: Path, media: Media, stream_server: tuple[LiveServer, str]) -> None:
    import asyncio

    import httpx

    server, identity_id = stream_server
    url = f"{server.url}/v1/identities/{identity_id}/stream"

    async def slow_body() -> Any:
        yield ndjson(media.landmarks[:1])
        await asyncio.sleep(3)  # holds the stream open while the others try

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            async def one() -> int:
                return (await c.post(url, content=slow_body(), headers=NDJSON)).status_code

            held = [asyncio.create_task(one()) for _ in range(2)]
            await asyncio.sleep(1.0)
            refused = await c.post(url, content=ndjson(media.landmarks[:1]), headers=NDJSON)
            assert refused.json()["error"]["code"] == "too_many_streams"
            return [refused.status_code, *await asyncio.gather(*held)]

    assert asyncio.run(main()) == [429, 200, 200]


@pytest.mark.redis
def test_ndjson_flow_on_redis(tmp_path: Path, media: Media, redis_prefix: str) -> None:
    import threading

    from server.broker.base import make_broker
    from server.worker import Worker

    settings = make_settings(tmp_path / "data", redis_url=REDIS_URL, redis_prefix=redis_prefix)
    stop = threading.Event()
    worker = threading.Thread(target=Worker(settings, make_broker(settings), worker_id="w-stream").run, args=(stop,))
    with LiveServer(settings) as server:
        worker.start()
        try:
            with server.client() as c:
                identity_id = settle(c, upload(c, media.reference).json()["status_url"])["id"]
            _check_ndjson_flow(server, identity_id, media)
        finally:
            stop.set()
            worker.join(timeout=15)
