"""WS /v1/identities/{id}/live on a real uvicorn: embedded mode (in-process broker and workers) and real Redis
(API here, workers in threads with their own Redis connections). Frames in, JPEG frames out with their sequence
numbers and timings; bad messages get errors without disturbing other streams; latest-wins backpressure drops and
counts stale frames; the stream limit, the idle timeout and unknown identities close with a code and a reason;
frames of several streams share forward passes; a stream whose worker stops moves to another worker and goes on."""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from server_helpers import REDIS_URL, LiveServer, Media, make_settings, settle, upload, wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

LIVE = dict(live_max_streams=4, live_idle_timeout_s=3.0, live_batch_delay_ms=20.0, live_reroute_after_s=0.3,
            live_max_frame_bytes=200_000)


# ---------------------------------------------------------------------------------------------------- helpers


def ws_url(server: LiveServer, identity_id: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v1/identities/{identity_id}/live"


def parse(message: str | bytes) -> dict[str, Any]:
    """A server message as a dict; a binary frame gets its JPEG under "jpeg"."""
    if isinstance(message, str):
        return dict(json.loads(message))
    (n,) = struct.unpack_from(">I", message)
    header = dict(json.loads(message[4 : 4 + n]))
    header["jpeg"] = message[4 + n :]
    return header


def frame(seq: int, landmarks: Any) -> str:
    return json.dumps({"seq": seq, "landmarks": landmarks})


def image_frame(seq: int, rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return struct.pack(">I", seq) + buf.tobytes()


def drain(ws: ClientConnection, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every message until the server closes the socket."""
    out = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            out.append(parse(ws.recv(timeout=deadline - time.monotonic())))
    except ConnectionClosed:
        return out
    raise AssertionError("the server did not close the stream in time")


def run_stream(url: str, frames: list[str | bytes], pace_s: float = 0.0) -> tuple[list[dict[str, Any]], Any]:
    """Send ``frames`` then "end"; every message back and the close frame."""
    with connect(url, max_size=None) as ws:
        ready = parse(ws.recv(timeout=30))
        assert ready["type"] == "ready", ready
        for f in frames:
            ws.send(f)
            if pace_s:
                time.sleep(pace_s)
        ws.send(json.dumps({"type": "end"}))
        return drain(ws), closed(ws)


@dataclass(frozen=True)
class Close:
    code: int | None
    reason: str | None


def closed(ws: ClientConnection) -> Close:
    return Close(ws.close_code, ws.close_reason)


def decode_jpeg(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory, media: Media) -> Iterator[tuple[LiveServer, str]]:
    settings = make_settings(tmp_path_factory.mktemp("live") / "data", **LIVE)
    with LiveServer(settings) as server, server.client() as c:
        ident = settle(c, upload(c, media.reference).json()["status_url"])
        assert ident["status"] == "ready", ident
        yield server, ident["id"]


# ------------------------------------------------------------------------------------------------ embedded


def test_landmark_frames_come_back_in_order_with_timings(live_server: tuple[LiveServer, str], media: Media) -> None:
    server, identity_id = live_server
    n = 8
    # Paced slower than the worker serves, so nothing is dropped.
    messages, close = run_stream(ws_url(server, identity_id), [frame(i, media.landmarks[i % 5]) for i in range(n)],
                                 pace_s=0.15)
    frames = [m for m in messages if m["type"] == "frame"]
    assert [f["seq"] for f in frames] == list(range(n))
    for f in frames:
        assert decode_jpeg(f["jpeg"]).shape == (64, 64, 3)
        assert {"queue_s", "model_s", "encode_s", "prepare_s", "latency_s", "batch"} <= set(f["timings"])
        assert 0 < f["timings"]["model_s"] < f["timings"]["latency_s"]
    end = messages[-1]
    assert end["type"] == "end" and end["stats"]["served"] == n and end["stats"]["dropped"] == 0
    assert close.code == 1000


def test_image_frames_run_through_mediapipe(live_server: tuple[LiveServer, str]) -> None:
    from engine.synthetic import random_identity, sequence

    server, identity_id = live_server
    images = sequence(random_identity(3), 4, seed=3, size=128).images
    messages, close = run_stream(ws_url(server, identity_id), [image_frame(10 + i, im) for i, im in enumerate(images)],
                                 pace_s=0.2)
    assert [m["seq"] for m in messages if m["type"] == "frame"] == [10, 11, 12, 13]
    assert close.code == 1000


def test_bad_messages_get_errors_and_other_streams_go_on(live_server: tuple[LiveServer, str], media: Media) -> None:
    server, identity_id = live_server
    url = ws_url(server, identity_id)
    nan = np.array(media.landmarks[0])
    nan[3, 1] = np.nan
    bad = [
        frame(1, [[0.5, 0.5, 0.0]] * 10),  # wrong shape
        json.dumps({"seq": 2, "landmarks": nan.tolist()}, allow_nan=True),  # NaN
        struct.pack(">I", 3) + b"this is not an image at all",  # garbage bytes
        struct.pack(">I", 4) + b"\xff\xd8\xff\xe0" + b"\x00" * 64,  # JPEG magic, corrupt body
        "{not json",
        struct.pack(">I", 5) + b"\xff\xd8\xff" + b"\x00" * 300_000,  # oversized (limit 200 kB)
        frame(6, media.landmarks[1]),  # a good frame after all that
    ]
    other: dict[str, Any] = {}

    def good_stream() -> None:
        other["messages"], other["close"] = run_stream(url, [frame(i, media.landmarks[i % 5]) for i in range(6)],
                                                       pace_s=0.1)

    t = threading.Thread(target=good_stream)
    t.start()
    messages, close = run_stream(url, bad, pace_s=0.1)
    t.join(timeout=60)
    errors = {m["seq"]: m["error"]["code"] for m in messages if m["type"] == "error"}
    assert errors.get(1) == "invalid_landmarks" and errors.get(2) == "invalid_landmarks"
    assert errors.get(3) == "invalid_frame" and errors.get(4) == "invalid_frame"
    assert errors.get(None) in ("invalid_request", "payload_too_large")
    codes = [m["error"]["code"] for m in messages if m["type"] == "error"]
    assert "payload_too_large" in codes and "invalid_request" in codes
    assert [m["seq"] for m in messages if m["type"] == "frame"] == [6]
    assert close.code == 1000
    assert [m["seq"] for m in other["messages"] if m["type"] == "frame"] == list(range(6))
    assert other["close"].code == 1000


def test_backpressure_drops_stale_frames_and_counts_them(live_server: tuple[LiveServer, str], media: Media) -> None:
    server, identity_id = live_server
    n = 60
    messages, close = run_stream(ws_url(server, identity_id), [frame(i, media.landmarks[i % 5]) for i in range(n)])
    frames = [m for m in messages if m["type"] == "frame"]
    stats = messages[-1]["stats"]
    assert stats["received"] == n
    assert stats["dropped"] > 0 and stats["served"] == len(frames) == n - stats["dropped"]
    # Latest wins: the last frame sent is always served, seqs only go up, and no frame waited behind the backlog.
    seqs = [f["seq"] for f in frames]
    assert seqs[-1] == n - 1 and seqs == sorted(seqs)
    assert max(f["timings"]["latency_s"] for f in frames) < 5.0
    assert close.code == 1000


def test_frames_of_concurrent_streams_share_forward_passes(live_server: tuple[LiveServer, str], media: Media) -> None:
    server, identity_id = live_server
    results: list[list[dict[str, Any]]] = []
    barrier = threading.Barrier(4)

    def one() -> None:
        with connect(ws_url(server, identity_id), max_size=None) as ws:
            parse(ws.recv(timeout=30))
            barrier.wait(timeout=30)
            for i in range(10):
                ws.send(frame(i, media.landmarks[i % 5]))
                time.sleep(0.05)
            ws.send(json.dumps({"type": "end"}))
            results.append(drain(ws))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    batches = [f["timings"]["batch"] for r in results for f in r if f["type"] == "frame"]
    assert len(results) == 4 and max(batches) >= 2, batches


def test_stream_limit_unknown_identity_and_idle_close_with_reasons(live_server: tuple[LiveServer, str]) -> None:
    server, identity_id = live_server
    url = ws_url(server, identity_id)
    with connect(ws_url(server, "idn_nope")) as ws:
        assert parse(ws.recv(timeout=10))["error"]["code"] == "identity_not_found"
        drain(ws)
        assert ws.close_code == 4404 and "identity_not_found" in ws.close_reason

    stack = contextlib.ExitStack()
    held = [stack.enter_context(connect(url)) for _ in range(LIVE["live_max_streams"])]
    with stack:
        for ws in held:
            assert parse(ws.recv(timeout=10))["type"] == "ready"
        with connect(url) as refused:
            assert parse(refused.recv(timeout=10))["error"]["code"] == "too_many_streams"
            drain(refused)
            assert refused.close_code == 1013 and "too_many_streams" in refused.close_reason
        # Silent for live_idle_timeout_s: closed by the server.
        t0 = time.monotonic()
        drain(held[0], timeout=20)
        assert held[0].close_code == 4408 and 2.0 < time.monotonic() - t0 < 10
    # The closed streams free their places.
    wait_for(lambda: _opens(url), timeout=10, interval=0.2)


def _opens(url: str) -> bool:
    with connect(url) as ws:
        return parse(ws.recv(timeout=10))["type"] == "ready"


# ----------------------------------------------------------------------------------------------- failover


class WorkerThreads:
    """Workers in threads of this process, each with its own stop flag (and, with Redis, its own broker)."""

    def __init__(self, make_broker: Any, settings: Any) -> None:
        self.make_broker, self.settings = make_broker, settings
        self.stops: dict[str, threading.Event] = {}
        self.threads: list[threading.Thread] = []

    def start(self, worker_id: str) -> None:
        from server.worker import Worker

        stop = threading.Event()
        w = Worker(self.settings, self.make_broker(), worker_id=worker_id)
        t = threading.Thread(target=w.run, args=(stop,), daemon=True)
        t.start()
        self.stops[worker_id], self.threads = stop, [*self.threads, t]

    def stop(self, worker_id: str) -> None:
        self.stops[worker_id].set()

    def stop_all(self) -> None:
        for s in self.stops.values():
            s.set()
        for t in self.threads:
            t.join(timeout=15)


def _failover(server: LiveServer, workers: WorkerThreads, media: Media) -> None:
    workers.start("worker-a")
    workers.start("worker-b")
    with server.client() as c:
        wait_for(lambda: c.get("/readyz").json()["workers"] == 2, timeout=60)
        identity_id = settle(c, upload(c, media.reference).json()["status_url"])["id"]
    with connect(ws_url(server, identity_id), max_size=None) as ws:
        first = parse(ws.recv(timeout=30))["worker"]
        served: list[dict[str, Any]] = []
        for i in range(16):
            if i == 5:
                workers.stop(first)  # its heartbeat goes: the stream must move
            ws.send(frame(i, media.landmarks[i % 5]))
            time.sleep(0.1)
        ws.send(json.dumps({"type": "end"}))
        served = [m for m in drain(ws) if m["type"] in ("frame", "end")]
    frames, end = served[:-1], served[-1]
    assert {f["worker"] for f in frames[:3]} == {first}
    assert frames[-1]["worker"] != first and frames[-1]["moves"] >= 1
    assert end["stats"]["errors"] == 0 and end["stats"]["served"] + end["stats"]["dropped"] == 16


def test_stream_moves_to_another_worker_when_its_worker_stops(tmp_path: Path, media: Media) -> None:
    settings = make_settings(tmp_path / "data", workers=0, **LIVE)
    with LiveServer(settings) as server:
        broker = server.app.state.aca.broker
        workers = WorkerThreads(lambda: broker, settings)
        try:
            _failover(server, workers, media)
        finally:
            workers.stop_all()


@pytest.mark.redis
def test_live_and_failover_on_redis(tmp_path: Path, media: Media, redis_prefix: str) -> None:
    from server.broker.base import make_broker

    settings = make_settings(tmp_path / "data", redis_url=REDIS_URL, redis_prefix=redis_prefix, **LIVE)
    with LiveServer(settings) as server:
        workers = WorkerThreads(lambda: make_broker(settings), settings)
        try:
            _failover(server, workers, media)
        finally:
            workers.stop_all()
