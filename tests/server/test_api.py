"""The API in embedded mode (in-process broker and worker) on a real uvicorn: the whole product path, the bad
inputs and what they leave behind, ownership, the queue limit, cancellation, metrics and OpenAPI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_helpers import LiveServer, Media, make_settings, metric, settle, snapshot, upload

MAX_UPLOAD = 400_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("embedded")
    with LiveServer(make_settings(data, max_upload_bytes=MAX_UPLOAD, max_video_duration_s=2.0)) as s:
        yield s


@pytest.fixture(scope="module")
def ready_identity(server: LiveServer, media: Media) -> dict:
    with server.client() as c:
        r = upload(c, media.reference, name="synthetic one")
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] == "queued" and body["status_url"] == f"/v1/identities/{body['id']}"
        assert r.headers["location"] == body["status_url"]
        return settle(c, body["status_url"])


def test_upload_becomes_ready_with_report(server: LiveServer, ready_identity: dict) -> None:
    ident = ready_identity
    assert ident["status"] == "ready", ident
    assert ident["name"] == "synthetic one" and ident["progress"] == 1.0 and ident["error"] is None
    assert ident["frames_used"] > 0 and ident["frames_used"] + ident["frames_dropped"] == ident["frames_total"]
    assert 0 < ident["n_references"] <= ident["frames_used"]
    assert "covered_fraction" in ident["coverage"] and ident["image_size"] == 64
    with server.client() as c:
        png = c.get(ident["appearance_map_url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
        listed = c.get("/v1/identities").json()["items"]
        assert [i["id"] for i in listed] == [ident["id"]]
    files = snapshot(server.settings.data_dir)
    # The upload is gone once ingested; the assets directory was committed whole.
    assert f"identities/{ident['id']}/upload.bin" not in files
    assert f"identities/{ident['id']}/assets/appearance-map.png" in files


def _decode(data: bytes) -> np.ndarray:
    from engine.video import decode

    return decode(data).frames


def test_render_from_landmarks_gives_mp4_with_every_frame(server: LiveServer, ready_identity: dict,
                                                           media: Media) -> None:
    with server.client() as c:
        r = c.post(f"/v1/identities/{ready_identity['id']}/renders", json={"landmarks": media.landmarks, "fps": 12})
        assert r.status_code == 202, r.text
        # Before it is done the video is refused (the worker may not have started).
        early = c.get(f"/v1/renders/{r.json()['id']}/video")
        assert early.status_code in (200, 409)
        if early.status_code == 409:
            assert early.json()["error"]["code"] == "render_not_done"
        done = settle(c, r.json()["status_url"])
        assert done["state"] == "done", done
        assert done["frames_done"] == done["frames_total"] == len(media.landmarks)
        assert done["timings"]["model_s"] > 0 and done["fps"] == 12
        video = c.get(done["video_url"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    frames = _decode(video.content)
    assert frames.shape == (len(media.landmarks), 64, 64, 3)
    assert frames.std() > 1.0  # an image, not a constant


def test_render_from_driving_video(server: LiveServer, ready_identity: dict, media: Media) -> None:
    with server.client() as c:
        r = c.post(f"/v1/identities/{ready_identity['id']}/renders",
                   files={"file": ("drive.mov", media.driving, "application/octet-stream")})
        assert r.status_code == 202, r.text
        done = settle(c, r.json()["status_url"])
        assert done["state"] == "done", done
        video = c.get(done["video_url"]).content
    assert _decode(video).shape[0] == media.driving_frames


def test_cancel_then_delete_render(server: LiveServer, ready_identity: dict, media: Media) -> None:
    long_drive = (media.landmarks * 8)[:40]
    with server.client() as c:
        r = c.post(f"/v1/identities/{ready_identity['id']}/renders", json={"landmarks": long_drive})
        rid = r.json()["id"]
        cancel = c.delete(f"/v1/renders/{rid}")
        assert cancel.status_code == 200 and cancel.json()["state"] in ("cancelled", "running", "queued")
        final = settle(c, f"/v1/renders/{rid}")
        assert final["state"] == "cancelled" and final["frames_done"] < 40
        assert c.get(f"/v1/renders/{rid}/video").json()["error"]["code"] == "render_not_done"
        assert c.delete(f"/v1/renders/{rid}").status_code == 204
        assert c.get(f"/v1/renders/{rid}").json()["error"]["code"] == "render_not_found"
    assert not (server.settings.data_dir / "renders" / rid).exists()


def test_no_face_fails_with_its_code_and_keeps_no_upload(server: LiveServer, media: Media) -> None:
    with server.client() as c:
        r = upload(c, media.no_face)
        assert r.status_code == 202
        body = settle(c, r.json()["status_url"])
        assert body["status"] == "failed" and body["error"]["code"] == "no_face_found", body
        assert c.post(f"/v1/identities/{body['id']}/renders",
                      json={"landmarks": media.landmarks}).json()["error"]["code"] == "identity_not_ready"
        assert c.delete(f"/v1/identities/{body['id']}").status_code == 204
    assert not (server.settings.data_dir / "identities" / body["id"]).exists()


def _chunked(data: bytes, boundary: str) -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.mp4\"\r\n"
           "Content-Type: video/mp4\r\n\r\n").encode()
    for i in range(0, len(data), 65536):
        yield data[i:i + 65536]
    yield f"\r\n--{boundary}--\r\n".encode()


BAD_UPLOADS = {
    "not_a_video": (b"hello, this is plain text and certainly not a video\n" * 20, 422, "invalid_video"),
    "corrupt": (np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes(), 422, "invalid_video"),
    "empty": (b"", 422, "invalid_video"),
    "too_large": (b"\x00" * (MAX_UPLOAD + 10_000), 413, "video_too_large"),
}


@pytest.mark.parametrize("case", [*BAD_UPLOADS, "truncated", "too_long", "too_large_streamed", "png_image",
                                  "no_file_field", "wrong_content_type"])
def test_bad_upload_is_refused_and_changes_nothing(server: LiveServer, media: Media, ready_identity: dict,
                                                   case: str) -> None:
    data_dir: Path = server.settings.data_dir
    with server.client() as c:
        before_list, before_files = c.get("/v1/identities").json(), snapshot(data_dir)
        if case in BAD_UPLOADS:
            data, status, code = BAD_UPLOADS[case]
            r = upload(c, data)
        elif case == "truncated":
            r, status, code = upload(c, media.reference[:400]), 422, "invalid_video"
        elif case == "too_long":
            r, status, code = upload(c, media.long), 422, "video_too_long"
        elif case == "png_image":
            import cv2

            from engine.video import encode_mp4  # noqa: F401 -- PNG via OpenCV below

            ok, png = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))
            r, status, code = upload(c, png.tobytes()), 422, "invalid_video"
        elif case == "too_large_streamed":
            # No Content-Length: the limit must hold while the body streams in.
            boundary = "testboundary123"
            r = c.post("/v1/identities", content=_chunked(b"\x01" * (MAX_UPLOAD * 3), boundary),
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            status, code = 413, "video_too_large"
        elif case == "no_file_field":
            r, status, code = c.post("/v1/identities", data={"name": "x"}, files={"other": ("a", b"b")}), 422, \
                "invalid_request"
        else:
            r, status, code = c.post("/v1/identities", content=media.reference,
                                     headers={"Content-Type": "video/mp4"}), 415, "unsupported_media_type"
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"]
        assert c.get("/v1/identities").json() == before_list
    assert snapshot(data_dir) == before_files
    assert not list((data_dir / "tmp").iterdir())


def test_unknown_resources_and_bad_render_requests(server: LiveServer, ready_identity: dict, media: Media) -> None:
    iid = ready_identity["id"]
    before = snapshot(server.settings.data_dir)
    with server.client() as c:
        for method, url in [("GET", "/v1/identities/idn_00000000000000000000"), ("GET", "/v1/identities/not-an-id"),
                            ("DELETE", "/v1/identities/idn_00000000000000000000"),
                            ("POST", "/v1/identities/idn_00000000000000000000/renders")]:
            r = c.request(method, url, json={"landmarks": media.landmarks} if method == "POST" else None)
            assert r.status_code == 404 and r.json()["error"]["code"] == "identity_not_found", (url, r.text)
        assert c.get("/v1/identities/..%2f..%2fetc").status_code == 404  # never a path outside the registry
        r = c.get("/v1/renders/rnd_00000000000000000000")
        assert r.status_code == 404 and r.json()["error"]["code"] == "render_not_found"
        cases = [
            ({"landmarks": [[[0.5, 0.5, 0.0]] * 10]}, "invalid_landmarks"),
            ({"landmarks": [[[float("nan")] * 3] * 478]}, "invalid_request"),  # NaN is not JSON
            ({"landmarks": media.landmarks, "fps": -1}, "invalid_request"),
            ({"landmarks": "nope"}, "invalid_request"),
        ]
        for body, code in cases:
            r = c.post(f"/v1/identities/{iid}/renders", content=json.dumps(body).replace("NaN", "nan"),
                       headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and r.json()["error"]["code"] == code, (body if code != "invalid_landmarks"
                                                                                 else code, r.text)
        r = c.post(f"/v1/identities/{iid}/renders", files={"file": ("x.mp4", b"not a video", "video/mp4")})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_video"
    assert snapshot(server.settings.data_dir) == before


def test_health_metrics_and_openapi(server: LiveServer, ready_identity: dict) -> None:
    with server.client() as c:
        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers"] == 1
        text = c.get("/metrics").text
        spec = c.get("/openapi.json").json()
    assert 'aca_http_requests_total{method="POST",route="/v1/identities",status="202"}' in text
    assert metric(text, "aca_frames_synthesized_total") >= 5
    assert "aca_http_request_duration_seconds_bucket{" in text and "aca_queue_depth " in text
    post = spec["paths"]["/v1/identities"]["post"]
    assert {"202", "413", "415", "422", "429"} <= set(post["responses"])
    assert "multipart/form-data" in post["requestBody"]["content"]
    renders = spec["paths"]["/v1/identities/{identity_id}/renders"]["post"]
    assert {"application/json", "multipart/form-data"} <= set(renders["requestBody"]["content"])
    assert "409" in renders["responses"] and "404" in renders["responses"]


# ----------------------------------------------------------------------------------------- keys, queue limit


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """No worker (jobs stay queued), two API keys, room for two jobs."""
    data = tmp_path_factory.mktemp("keyed")
    with LiveServer(make_settings(data, workers=0, api_keys="key-a, key-b", queue_max_depth=2,
                                  metrics_public=True)) as s:
        yield s


def test_api_keys_and_ownership(keyed: LiveServer, media: Media) -> None:
    with keyed.client() as anon, keyed.client("key-a") as a, keyed.client("key-b") as b, \
            keyed.client("key-z") as z:
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/readyz").status_code == 503  # no worker: not ready
        for client in (anon, z):
            r = client.get("/v1/identities")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert upload(client, media.reference).status_code == 401
        r = upload(a, media.reference)
        assert r.status_code == 202
        iid = r.json()["id"]
        assert a.get(f"/v1/identities/{iid}").json()["status"] == "queued"
        for method, url in [("GET", f"/v1/identities/{iid}"), ("DELETE", f"/v1/identities/{iid}"),
                            ("GET", f"/v1/identities/{iid}/appearance-map.png"),
                            ("POST", f"/v1/identities/{iid}/renders")]:
            r = b.request(method, url, json={"landmarks": media.landmarks} if method == "POST" else None)
            assert r.status_code == 404 and r.json()["error"]["code"] == "identity_not_found", url
        assert b.get("/v1/identities").json()["items"] == []
        # Not ready yet for its owner.
        r = a.post(f"/v1/identities/{iid}/renders", json={"landmarks": media.landmarks})
        assert r.status_code == 409 and r.json()["error"]["code"] == "identity_not_ready"
        assert a.get(f"/v1/identities/{iid}/appearance-map.png").json()["error"]["code"] == "identity_not_ready"
        meta = (keyed.settings.data_dir / "identities" / iid / "meta.json").read_text()
        assert "key-a" not in meta and hashlib.sha256(b"key-a").hexdigest() in meta
        assert a.delete(f"/v1/identities/{iid}").status_code == 204
        assert a.get(f"/v1/identities/{iid}").status_code == 404


def test_queue_full_is_429_and_rolls_back(keyed: LiveServer, media: Media) -> None:
    with keyed.client("key-a") as a:
        ids = []
        for _ in range(2):
            r = upload(a, media.reference)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        before = (a.get("/v1/identities").json(), snapshot(keyed.settings.data_dir))
        r = upload(a, media.reference)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers.get("retry-after")
        assert (a.get("/v1/identities").json(), snapshot(keyed.settings.data_dir)) == before
        text = a.get("/metrics").text
        assert "aca_queue_depth 2" in text
        for iid in ids:  # deleting forgets the jobs: room again
            assert a.delete(f"/v1/identities/{iid}").status_code == 204
        assert upload(a, media.reference).status_code == 202
