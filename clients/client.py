"""The Python client of the ACA Avatar Server's HTTP API (DESIGN.md section 4: upload, identity, render).

``AvatarClient`` (sync) and ``AsyncAvatarClient`` (asyncio) talk HTTP only, through httpx; they never import
the server. Every error response becomes the ``clients.errors`` class of its code (``IdentityNotFound``,
``NoFaceFound``, ...), and a job that ends in ``failed`` raises its error the same way from ``wait_ready`` /
``wait_render``. The models below are the client's view of the public response schemas: they accept fields
they do not know, so a newer server does not break an older client.

    with AvatarClient("http://127.0.0.1:8000") as client:
        identity = client.wait_ready(client.upload("me.mp4").id)
        render = client.wait_render(client.render(identity.id, driving="driving.mp4").id)
        client.download_render(render.id, "out.mp4")
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from clients.errors import (
    ApiConnectionError,
    ApiError,
    IdentityFailed,
    RenderCancelled,
    WaitTimeout,
    error_class,
    error_from_payload,
    error_from_response,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncAvatarClient",
    "AvatarClient",
    "ErrorInfo",
    "Identity",
    "Render",
    "VideoInput",
]

DEFAULT_URL = "http://127.0.0.1:8000"
#: A video to send: a path, its bytes, or an open binary file (streamed, never read whole into memory).
VideoInput = str | os.PathLike[str] | bytes | IO[bytes]

# Waiting uses the server's long-poll (``GET ...?wait=S`` answers as soon as the job settles, or after S
# seconds): the end is seen at once, and progress (frames done) is refreshed every S s, one request each.
# A server that answers at once without a change (one without long-poll) is polled with a growing pause.
_LONG_POLL_S = 1.0
_POLL_FIRST_S = 0.1
_POLL_MAX_S = 1.0
_POLL_GROWTH = 1.5
_DOWNLOAD_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------------------------
# Response models
# ------------------------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ErrorInfo(_Model):
    """Why a job failed: the same ``{code, message, details}`` as an error response."""

    code: str
    message: str = ""
    details: dict[str, Any] = {}


class Identity(_Model):
    """A reference video turned into something a worker can drive (``GET /v1/identities/{id}``)."""

    id: str
    status: Literal["queued", "processing", "ready", "failed"] | str = "queued"
    name: str | None = None
    status_url: str | None = None
    progress: float | None = None
    frames_used: int | None = None
    frames_dropped: int | None = None
    coverage: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("ready", "failed")


class Render(_Model):
    """A batch render job (``GET /v1/renders/{id}``): a driving sequence turned into an mp4 of an identity."""

    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"] | str = "queued"
    identity_id: str | None = None
    status_url: str | None = None
    frames_done: int = 0
    frames_total: int | None = None
    timings: dict[str, Any] = {}
    error: ErrorInfo | None = None

    @model_validator(mode="before")
    @classmethod
    def _state_from_status(cls, data: Any) -> Any:
        # The 202 answer to a new render names its state ``status`` (like an identity's); the render's own
        # resource calls it ``state``.
        if isinstance(data, dict) and "state" not in data and "status" in data:
            return {**data, "state": data["status"]}
        return data

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    @property
    def fraction(self) -> float | None:
        """Frames done over frames total, when the total is known."""
        if not self.frames_total:
            return None
        return min(1.0, self.frames_done / self.frames_total)


M = TypeVar("M", Identity, Render)


# ------------------------------------------------------------------------------------------------------------
# Request building and response handling shared by the sync and async clients
# ------------------------------------------------------------------------------------------------------------


def _seg(value: str) -> str:
    """One path segment: an id with "/" or ".." in it cannot reach another route."""
    return quote(str(value), safe="")


@dataclass
class _Upload:
    """A multipart body whose file, when opened here from a path, must be closed after the request."""

    files: dict[str, tuple[str, Any, str]]
    data: dict[str, str] = field(default_factory=dict)
    opened: IO[bytes] | None = None

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


def _upload(video: VideoInput, data: dict[str, str]) -> _Upload:
    opened: IO[bytes] | None = None
    content: bytes | IO[bytes]
    if isinstance(video, bytes | bytearray | memoryview):
        filename, content = "video", bytes(video)
    elif isinstance(video, str | os.PathLike):
        path = Path(video)
        opened = path.open("rb")  # httpx streams the file in chunks: a large video is not read into memory
        filename, content = path.name, opened
    else:
        filename, content = Path(getattr(video, "name", "video") or "video").name, video
    # The server sniffs the content (engine.video.probe) and trusts neither the name nor the type.
    return _Upload({"file": (filename, content, "application/octet-stream")}, data, opened)


def _landmarks_body(landmarks: Any, fps: float | None) -> dict[str, Any]:
    # (T, 478, 3) mediapipe-normalised landmarks -> nested lists; float64 so that JSON round-trips the values.
    body: dict[str, Any] = {"landmarks": np.asarray(landmarks, dtype=np.float64).tolist()}
    if fps is not None:
        body["fps"] = float(fps)
    return body


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise error_from_response(response.status_code, body)


def _items(payload: Any) -> list[Any]:
    """The entries of a listing (``{"items": [...]}``)."""
    if isinstance(payload, dict) and isinstance(payload.get("items"), list):
        return list(payload["items"])
    raise ApiError(f"unexpected listing: {str(payload)[:200]}", code="bad_response", status=200)


def _raise_if_failed(obj: Identity | Render) -> None:
    if isinstance(obj, Identity) and obj.status == "failed":
        if obj.error is None:
            raise IdentityFailed(f"identity {obj.id} failed", status=200)
        err = error_from_payload(obj.error.model_dump(), _failed_status(obj.error.code))
        if err.code == "internal_error":
            raise IdentityFailed(err.message, code=err.code, status=err.status, details=err.details)
        raise err
    if isinstance(obj, Render):
        if obj.state == "cancelled":
            raise RenderCancelled(f"render {obj.id} was cancelled", status=200)
        if obj.state == "failed":
            info = obj.error or ErrorInfo(code="internal_error", message=f"render {obj.id} failed")
            raise error_from_payload(info.model_dump(), _failed_status(info.code))


def _failed_status(code: str) -> int:
    """The HTTP status a job's error would have had as a response (500 if the code is unknown)."""
    return error_class(code, 500).http_status


def _wait_params(wait: float) -> dict[str, float]:
    return {"wait": round(wait, 3)} if wait > 0 else {}


def _render_or_none(response: httpx.Response) -> Render | None:
    # 200 with the render's state after a cancel; 204 after deleting a finished render.
    return Render.model_validate(response.json()) if response.status_code == 200 else None


class _Poll:
    """The pacing of one wait: long-polls bounded by the deadline, and a growing pause only after an answer
    that came back early without any change (a server that does not long-poll)."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self._pause = 0.0
        self._delay = _POLL_FIRST_S
        self._asked = 0.0

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def pause(self) -> float:
        return min(self._pause, max(0.0, self.deadline - time.monotonic()))

    def wait(self) -> float:
        self._asked = time.monotonic()
        return max(0.0, min(_LONG_POLL_S, self.deadline - self._asked))

    def seen(self, new: M, old: M) -> M:
        asked_for = max(0.0, min(_LONG_POLL_S, self.deadline - self._asked))
        early = time.monotonic() - self._asked < 0.5 * asked_for
        if new == old and early:
            self._pause, self._delay = self._delay, min(_POLL_MAX_S, self._delay * _POLL_GROWTH)
        else:
            self._pause, self._delay = 0.0, _POLL_FIRST_S
        return new


def _timeout_error(kind: str, obj: Identity | Render, timeout: float) -> WaitTimeout:
    state = obj.status if isinstance(obj, Identity) else obj.state
    message = f"{kind} {obj.id} still {state} after {timeout:g} s"
    return WaitTimeout(message, details={"id": obj.id, "state": state})


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _atomic_target(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest, dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")


# ------------------------------------------------------------------------------------------------------------
# Sync client
# ------------------------------------------------------------------------------------------------------------


class AvatarClient:
    """Synchronous client. ``timeout`` bounds each HTTP request (not a whole wait: see ``wait_*``)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0,
                 *, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=_auth_headers(api_key),
                                  timeout=httpx.Timeout(timeout), transport=transport)

    def __enter__(self) -> AvatarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return _check(self._http.request(method, url, **kwargs))
        except httpx.TransportError as e:
            raise ApiConnectionError(f"{method} {self.base_url}{url}: {e}") from e

    # --- service --------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the API process is alive."""
        return dict(self._request("GET", "/healthz").json())

    def ready(self) -> bool:
        """``GET /readyz``: the broker is reachable and a worker is alive (False, not an error, when not)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Block until ``/readyz`` answers 200 (a server that is starting), or raise WaitTimeout."""
        deadline, delay = time.monotonic() + timeout, _POLL_FIRST_S
        while not self.ready():
            if time.monotonic() > deadline:
                raise WaitTimeout(f"{self.base_url} not ready after {timeout:g} s")
            time.sleep(delay)
            delay = min(_POLL_MAX_S, delay * _POLL_GROWTH)

    # --- identities -----------------------------------------------------------------------------------------

    def upload(self, video: VideoInput, name: str | None = None) -> Identity:
        """``POST /v1/identities``: store a reference video, queue its ingest (status queued)."""
        body = _upload(video, {"name": name} if name else {})
        try:
            r = self._request("POST", "/v1/identities", files=body.files, data=body.data)
        finally:
            body.close()
        return Identity.model_validate(r.json())

    def get_identity(self, identity_id: str, wait: float = 0.0) -> Identity:
        """The identity's status; with ``wait`` > 0 the server answers when it changes (or after wait s)."""
        r = self._request("GET", f"/v1/identities/{_seg(identity_id)}", params=_wait_params(wait))
        return Identity.model_validate(r.json())

    def identities(self) -> list[Identity]:
        return [Identity.model_validate(x) for x in _items(self._request("GET", "/v1/identities").json())]

    def delete_identity(self, identity_id: str) -> None:
        self._request("DELETE", f"/v1/identities/{_seg(identity_id)}")

    def appearance_map_png(self, identity_id: str) -> bytes:
        """The identity's appearance map (Delaunay mesh over the references' head poses) as a PNG."""
        return self._request("GET", f"/v1/identities/{_seg(identity_id)}/appearance-map.png").content

    def wait_ready(self, identity_id: str, timeout: float = 300.0,
                   on_progress: Callable[[Identity], None] | None = None) -> Identity:
        """Poll until the identity is ``ready``; raise its error (``NoFaceFound``, ...) if it ``failed``."""
        return self._wait(self.get_identity, identity_id, "identity", timeout, on_progress)

    # --- renders --------------------------------------------------------------------------------------------

    def render(self, identity_id: str, driving: VideoInput | None = None, *, landmarks: Any = None,
               fps: float | None = None) -> Render:
        """``POST /v1/identities/{id}/renders``: drive the identity with a video (multipart ``file``; the
        output keeps its frame rate) or with mediapipe-normalised landmarks (T, 478, 3) at ``fps`` (default
        25); the render starts ``queued``."""
        url = f"/v1/identities/{_seg(identity_id)}/renders"
        if (driving is None) == (landmarks is None):
            raise ValueError("give exactly one of driving= (a video) or landmarks= (an array)")
        if landmarks is not None:
            r = self._request("POST", url, json=_landmarks_body(landmarks, fps))
            return Render.model_validate(r.json())
        if fps is not None:
            raise ValueError("fps applies to landmarks; a driving video keeps its own frame rate")
        body = _upload(driving, {})  # type: ignore[arg-type]
        try:
            r = self._request("POST", url, files=body.files, data=body.data)
        finally:
            body.close()
        return Render.model_validate(r.json())

    def get_render(self, render_id: str, wait: float = 0.0) -> Render:
        """The render's state; with ``wait`` > 0 the server answers when it changes (or after ``wait`` s)."""
        r = self._request("GET", f"/v1/renders/{_seg(render_id)}", params=_wait_params(wait))
        return Render.model_validate(r.json())

    def cancel_render(self, render_id: str) -> Render | None:
        """``DELETE /v1/renders/{id}``: cancel an unfinished render (its state is returned: ``cancelled``, or
        still ``running`` until its worker notices), or delete a finished one and its video (None)."""
        return _render_or_none(self._request("DELETE", f"/v1/renders/{_seg(render_id)}"))

    def wait_render(self, render_id: str, timeout: float = 600.0,
                    on_progress: Callable[[Render], None] | None = None) -> Render:
        """Poll until the render is ``done``; raise its error if it failed, RenderCancelled if cancelled."""
        return self._wait(self.get_render, render_id, "render", timeout, on_progress)

    # --- live (clients/live.py) ----------------------------------------------------------------------------

    def live(self, identity_id: str, frames: Any, *, fps: float | None = 25.0,
             summary: Any = None) -> Any:
        """``WS /v1/identities/{id}/live`` as an async iterator of ``clients.live.LiveFrame``: ``frames`` are
        RGB images, (478, 3) landmark arrays or JPEG bytes (an iterable or async iterable), sent at ``fps``."""
        from clients.live import live_stream

        return live_stream(self.base_url, identity_id, frames, fps=fps, summary=summary,
                           headers={k: v for k, v in self._http.headers.items() if k.lower() == "authorization"})

    def download_render(self, render_id: str, path: str | os.PathLike[str]) -> Path:
        """Stream the finished mp4 to ``path`` (complete or absent: a temp sibling, then ``os.replace``)."""
        dest, tmp = _atomic_target(path)
        try:
            with self._http.stream("GET", f"/v1/renders/{_seg(render_id)}/video") as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                with tmp.open("wb") as f:
                    for chunk in r.iter_bytes(_DOWNLOAD_CHUNK):
                        f.write(chunk)
            os.replace(tmp, dest)
        except httpx.TransportError as e:
            raise ApiConnectionError(f"GET {self.base_url}/v1/renders/{render_id}/video: {e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return dest

    # --- polling --------------------------------------------------------------------------------------------

    def _wait(self, get: Callable[[str, float], M], job_id: str, kind: str, timeout: float,
              on_progress: Callable[[M], None] | None) -> M:
        poll = _Poll(timeout)
        obj = get(job_id, 0.0)
        while True:
            if on_progress is not None:
                on_progress(obj)
            if obj.finished:
                _raise_if_failed(obj)
                return obj
            if poll.expired():
                raise _timeout_error(kind, obj, timeout)
            time.sleep(poll.pause())
            obj = poll.seen(get(job_id, poll.wait()), obj)


# ------------------------------------------------------------------------------------------------------------
# Async client: the same API with ``await``
# ------------------------------------------------------------------------------------------------------------


class AsyncAvatarClient:
    """The asyncio twin of ``AvatarClient`` (same methods, same errors)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0,
                 *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_auth_headers(api_key),
                                       timeout=httpx.Timeout(timeout), transport=transport)

    async def __aenter__(self) -> AsyncAvatarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return _check(await self._http.request(method, url, **kwargs))
        except httpx.TransportError as e:
            raise ApiConnectionError(f"{method} {self.base_url}{url}: {e}") from e

    async def health(self) -> dict[str, Any]:
        return dict((await self._request("GET", "/healthz")).json())

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def upload(self, video: VideoInput, name: str | None = None) -> Identity:
        # httpx's async client cannot stream a sync file object, so a path is read here; uploads are
        # bounded by the server's size limit anyway.
        if isinstance(video, str | os.PathLike):
            video = Path(video).read_bytes()
        body = _upload(video, {"name": name} if name else {})
        r = await self._request("POST", "/v1/identities", files=body.files, data=body.data)
        return Identity.model_validate(r.json())

    async def get_identity(self, identity_id: str, wait: float = 0.0) -> Identity:
        r = await self._request("GET", f"/v1/identities/{_seg(identity_id)}", params=_wait_params(wait))
        return Identity.model_validate(r.json())

    async def identities(self) -> list[Identity]:
        r = await self._request("GET", "/v1/identities")
        return [Identity.model_validate(x) for x in _items(r.json())]

    async def delete_identity(self, identity_id: str) -> None:
        await self._request("DELETE", f"/v1/identities/{_seg(identity_id)}")

    async def appearance_map_png(self, identity_id: str) -> bytes:
        return (await self._request("GET", f"/v1/identities/{_seg(identity_id)}/appearance-map.png")).content

    def live(self, identity_id: str, frames: Any, *, fps: float | None = 25.0, summary: Any = None) -> Any:
        """The same as ``AvatarClient.live``."""
        from clients.live import live_stream

        return live_stream(self.base_url, identity_id, frames, fps=fps, summary=summary,
                           headers={k: v for k, v in self._http.headers.items() if k.lower() == "authorization"})

    async def wait_ready(self, identity_id: str, timeout: float = 300.0,
                         on_progress: Callable[[Identity], None] | None = None) -> Identity:
        return await self._wait(self.get_identity, identity_id, "identity", timeout, on_progress)

    async def render(self, identity_id: str, driving: VideoInput | None = None, *, landmarks: Any = None,
                     fps: float | None = None) -> Render:
        url = f"/v1/identities/{_seg(identity_id)}/renders"
        if (driving is None) == (landmarks is None):
            raise ValueError("give exactly one of driving= (a video) or landmarks= (an array)")
        if landmarks is not None:
            r = await self._request("POST", url, json=_landmarks_body(landmarks, fps))
            return Render.model_validate(r.json())
        if fps is not None:
            raise ValueError("fps applies to landmarks; a driving video keeps its own frame rate")
        if isinstance(driving, str | os.PathLike):
            driving = Path(driving).read_bytes()
        body = _upload(driving, {})  # type: ignore[arg-type]
        r = await self._request("POST", url, files=body.files, data=body.data)
        return Render.model_validate(r.json())

    async def get_render(self, render_id: str, wait: float = 0.0) -> Render:
        r = await self._request("GET", f"/v1/renders/{_seg(render_id)}", params=_wait_params(wait))
        return Render.model_validate(r.json())

    async def cancel_render(self, render_id: str) -> Render | None:
        return _render_or_none(await self._request("DELETE", f"/v1/renders/{_seg(render_id)}"))

    async def wait_render(self, render_id: str, timeout: float = 600.0,
                          on_progress: Callable[[Render], None] | None = None) -> Render:
        return await self._wait(self.get_render, render_id, "render", timeout, on_progress)

    async def download_render(self, render_id: str, path: str | os.PathLike[str]) -> Path:
        dest, tmp = _atomic_target(path)
        try:
            async with self._http.stream("GET", f"/v1/renders/{_seg(render_id)}/video") as r:
                if r.status_code >= 400:
                    await r.aread()
                    _check(r)
                with tmp.open("wb") as f:
                    async for chunk in r.aiter_bytes(_DOWNLOAD_CHUNK):
                        f.write(chunk)
            os.replace(tmp, dest)
        except httpx.TransportError as e:
            raise ApiConnectionError(f"GET {self.base_url}/v1/renders/{render_id}/video: {e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return dest

    async def _wait(self, get: Callable[[str, float], Any], job_id: str, kind: str, timeout: float,
                    on_progress: Callable[[Any], None] | None) -> Any:
        poll = _Poll(timeout)
        obj = await get(job_id, 0.0)
        while True:
            if on_progress is not None:
                on_progress(obj)
            if obj.finished:
                _raise_if_failed(obj)
                return obj
            if poll.expired():
                raise _timeout_error(kind, obj, timeout)
            await asyncio.sleep(poll.pause())
            obj = poll.seen(await get(job_id, poll.wait()), obj)
