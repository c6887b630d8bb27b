"""Errors the client raises: the server's error codes mapped back to exception classes (DESIGN.md habit 6).

The server answers every failure with ``{"error": {"code": ..., "message": ..., "details": {...}}}`` and an
HTTP status. ``error_from_response`` turns that body into the class registered for its code, so a caller
writes ``except NoFaceFound`` whether the face was missing in its own process or on a server: each class for
an engine code subclasses the engine class, and ``except engine.errors.NoFaceFound`` catches the client's
``NoFaceFound`` too. An unknown code (a newer server) maps to the generic class of its HTTP status, so callers
that only care about "not found" or "retry later" keep working.

Following TGI's ``clients/python/text_generation/errors.py``: one class per code, one lookup, no string
matching on messages. The client imports ``engine.errors`` (a leaf module without dependencies), never
``server``.
"""

from __future__ import annotations

from typing import Any

from engine import errors as engine_errors
from engine.errors import AcaError, UserError

__all__ = [
    "ApiConnectionError",
    "ApiError",
    "BadRequest",
    "ClientError",
    "Conflict",
    "IdentityFailed",
    "IdentityNotFound",
    "IdentityNotReady",
    "InternalError",
    "InvalidLandmarks",
    "InvalidRequest",
    "InvalidVideo",
    "NoFaceFound",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "RenderCancelled",
    "RenderNotDone",
    "RenderNotFound",
    "ResolutionTooHigh",
    "ServerError",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
    "VideoTooLarge",
    "VideoTooLong",
    "WaitTimeout",
    "error_class",
    "error_from_payload",
    "error_from_response",
]


class ApiError(AcaError):
    """The server answered with an error. ``code``, ``message``, ``details`` come from the body, ``status`` is
    the HTTP status of this response (``http_status`` stays the class's nominal one)."""

    code = "api_error"
    http_status = 500

    def __init__(
        self, message: str, *, code: str | None = None, status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, **(details or {}))
        if code is not None:
            self.code = code
        self.status = status if status is not None else self.http_status

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The remote twin of an engine error takes that class's code and status, so the two cannot drift apart.
        if "code" not in cls.__dict__:
            for base in cls.__mro__[1:]:
                if issubclass(base, UserError) and not issubclass(base, ApiError) and base is not UserError:
                    cls.code, cls.http_status = base.code, base.http_status
                    break

    def __str__(self) -> str:
        return f"[{self.status} {self.code}] {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default pickling of exceptions (multiprocessing).
        return (_rebuild, (type(self), self.message, self.code, self.status, self.details))


def _rebuild(cls: type[ApiError], message: str, code: str, status: int, details: dict[str, Any]) -> ApiError:
    return cls(message, code=code, status=status, details=details)


# --- generic classes by HTTP status (used directly for codes this client does not know) ---------------------


class ClientError(ApiError, UserError):
    """A 4xx: the request is at fault; sending it again unchanged cannot succeed (but see TooManyRequests)."""

    code = "bad_request"
    http_status = 400


class BadRequest(ClientError):
    code = "bad_request"
    http_status = 400


class Unauthorized(ClientError):
    """Missing or unknown API key (``Authorization: Bearer KEY``)."""

    code = "unauthorized"
    http_status = 401


class NotFound(ClientError):
    code = "not_found"
    http_status = 404


class Conflict(ClientError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(ClientError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(ClientError):
    code = "unsupported_media_type"
    http_status = 415


class InvalidRequest(ClientError):
    """The body failed validation (FastAPI's 422)."""

    code = "invalid_request"
    http_status = 422


class TooManyRequests(ClientError):
    """Try again later: the condition is temporary."""

    code = "too_many_requests"
    http_status = 429


class ServerError(ApiError):
    """A 5xx: the server (or one of its workers) broke; not the caller's fault."""

    code = "internal_error"
    http_status = 500


class InternalError(ServerError):
    code = "internal_error"
    http_status = 500


# --- one class per code the server documents ----------------------------------------------------------------


class IdentityNotFound(NotFound):
    code = "identity_not_found"


class RenderNotFound(NotFound):
    code = "render_not_found"


class IdentityNotReady(Conflict):
    code = "identity_not_ready"


class RenderNotDone(Conflict):
    code = "render_not_done"


class QueueFull(TooManyRequests):
    code = "queue_full"


# The engine's user errors: subclasses of both, so ``except engine.errors.X`` catches the remote X as well; code and
# status come from the engine class (ApiError.__init_subclass__).


class InvalidVideo(ClientError, engine_errors.InvalidVideo):
    pass


class VideoTooLarge(PayloadTooLarge, engine_errors.VideoTooLarge):
    pass


class VideoTooLong(ClientError, engine_errors.VideoTooLong):
    pass


class ResolutionTooHigh(ClientError, engine_errors.ResolutionTooHigh):
    pass


class NoFaceFound(ClientError, engine_errors.NoFaceFound):
    pass


class InvalidLandmarks(ClientError, engine_errors.InvalidLandmarks):
    pass


# --- raised by the client itself, not by a response ---------------------------------------------------------


class ApiConnectionError(ApiError):
    """The server could not be reached (refused, DNS, TLS, timed out): no HTTP status."""

    code = "connection_error"
    http_status = 0


class WaitTimeout(ApiError, TimeoutError):
    """``wait_ready`` / ``wait_render`` gave up before the job finished; the job itself goes on."""

    code = "wait_timeout"
    http_status = 0


class IdentityFailed(ServerError):
    """An identity's ingest job failed with a code that is not a user error (``internal_error``)."""

    code = "identity_failed"


class RenderCancelled(ApiError):
    """The render job ended in ``cancelled``: there is no video to download."""

    code = "render_cancelled"
    http_status = 409


_BY_CODE: dict[str, type[ApiError]] = {
    cls.code: cls
    for cls in (
        BadRequest, Unauthorized, NotFound, Conflict, PayloadTooLarge, UnsupportedMediaType,
        InvalidRequest, TooManyRequests, InternalError, IdentityNotFound, RenderNotFound, IdentityNotReady,
        RenderNotDone, QueueFull, InvalidVideo, VideoTooLarge, VideoTooLong, ResolutionTooHigh, NoFaceFound,
        InvalidLandmarks,
    )
}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 422: InvalidRequest, 429: TooManyRequests,
}


def error_class(code: str | None, status: int) -> type[ApiError]:
    """The class for an error ``code``; for a code this client does not know, the class of ``status``."""
    if code is not None and code in _BY_CODE:
        return _BY_CODE[code]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ClientError if 400 <= status < 500 else ServerError


def error_from_payload(payload: dict[str, Any], status: int) -> ApiError:
    """An ``{"code", "message", "details"}`` object (of a response, or of a failed job) as an exception."""
    code = payload.get("code")
    code = code if isinstance(code, str) else None
    message = str(payload.get("message") or code or f"HTTP {status}")
    details = payload.get("details")
    cls = error_class(code, status)
    return cls(message, code=code, status=status, details=details if isinstance(details, dict) else None)


def error_from_response(status: int, body: Any) -> ApiError:
    """The exception for an error response: the server's ``{"error": {...}}`` body, or anything else a proxy
    or a framework default produced (FastAPI's ``{"detail": ...}``, HTML, nothing), mapped by HTTP status."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return error_from_payload(body["error"], status)
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        message = detail if isinstance(detail, str) else "request failed validation"
        details = {"errors": detail} if isinstance(detail, list) else None
        return error_class(None, status)(message, status=status, details=details)
    text = body.strip()[:200] if isinstance(body, str) and body.strip() else f"HTTP {status}"
    return error_class(None, status)(text, status=status)
