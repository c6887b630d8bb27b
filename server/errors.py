"""The server's typed errors (DESIGN.md habit 6) and the one exception handler that renders every error.

Server-side user errors subclass ``engine.errors.UserError`` and join its ``USER_ERRORS`` registry, so one table
maps every stable code to a class (the Python client maps codes back the same way). Every error body reads
``{"error": {"code": ..., "message": ..., "details": {...}}}``. A broken worker or a bug is not a user error: a job
fails with ``internal_error``, and the API answers 500 only where the API itself broke.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import USER_ERRORS, AcaError, UserError
from server.schemas import ErrorResponse

log = logging.getLogger("aca.server")


class IdentityNotFound(UserError):
    code = "identity_not_found"
    http_status = 404


class RenderNotFound(UserError):
    code = "render_not_found"
    http_status = 404


class IdentityNotReady(UserError):
    code = "identity_not_ready"
    http_status = 409


class RenderNotDone(UserError):
    code = "render_not_done"
    http_status = 409


class Unauthorized(UserError):
    code = "unauthorized"
    http_status = 401


class QueueFull(UserError):
    """Too many unfinished jobs; retry later (the response carries Retry-After)."""

    code = "queue_full"
    http_status = 429


class PayloadTooLarge(UserError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(UserError):
    code = "unsupported_media_type"
    http_status = 415


class InvalidRequest(UserError):
    """The request does not match its schema (pydantic validation, a missing multipart field)."""

    code = "invalid_request"
    http_status = 422


class NotFound(UserError):
    """A path that names no route."""

    code = "not_found"
    http_status = 404


class MethodNotAllowed(UserError):
    code = "method_not_allowed"
    http_status = 405


class TooManyStreams(UserError):
    """``live_max_streams`` live or streaming sessions are open; retry later."""

    code = "too_many_streams"
    http_status = 429


class InvalidFrame(UserError):
    """A driving frame that is neither landmarks nor a decodable JPEG/PNG image, or one that is too large."""

    code = "invalid_frame"
    http_status = 422


class NoWorker(AcaError):
    """No live worker to serve a stream: not the user's fault, retrying later may help."""

    code = "no_worker"
    http_status = 503


class InternalError(AcaError):
    """A bug or a broken worker: not the user's fault, retrying may help."""

    code = "internal_error"
    http_status = 500


SERVER_ERRORS: tuple[type[UserError], ...] = (
    IdentityNotFound, RenderNotFound, IdentityNotReady, RenderNotDone, Unauthorized, QueueFull, PayloadTooLarge,
    UnsupportedMediaType, InvalidRequest, NotFound, MethodNotAllowed, TooManyStreams, InvalidFrame,
)
for _cls in SERVER_ERRORS:
    # One registry of codes: a clash would make the client map a code to the wrong class.
    if USER_ERRORS.get(_cls.code, _cls) is not _cls:
        raise RuntimeError(f"error code {_cls.code!r} is already registered by {USER_ERRORS[_cls.code]!r}")
    USER_ERRORS[_cls.code] = _cls


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(exc: AcaError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message, _jsonable(exc.details)), status_code=exc.http_status,
                        headers=headers)


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, str | int | float | bool | list | dict | type(None)) else str(v)
            for k, v in details.items()}


_HTTP_CODES: dict[int, type[AcaError]] = {
    401: Unauthorized, 404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge, 415: UnsupportedMediaType,
}


async def _aca_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AcaError)
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFull | TooManyStreams | NoWorker):
        headers["Retry-After"] = "1"
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if not isinstance(exc, UserError):
        log.error("internal error on %s %s: %s", request.method, request.url.path, exc.message)
    return error_response(exc, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    message = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])
    return error_response(InvalidRequest(message, errors=errors[:20]))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    cls = _HTTP_CODES.get(exc.status_code)
    if cls is None:
        return JSONResponse(error_body(f"http_{exc.status_code}", str(exc.detail)), status_code=exc.status_code)
    return error_response(cls(str(exc.detail)))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError("the server failed to handle the request"))


def install_error_handlers(app: FastAPI) -> None:
    """The one place errors become responses."""
    app.add_exception_handler(AcaError, _aca_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def error_responses(*classes: type[AcaError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: each status with the codes it may carry."""
    by_status: dict[int, list[str]] = {}
    all_classes: tuple[type[AcaError], ...] = (*classes, InvalidRequest)
    for cls in all_classes:
        by_status.setdefault(cls.http_status, []).append(cls.code)
    return {
        status: {"model": ErrorResponse, "description": "error codes: " + ", ".join(sorted(set(codes)))}
        for status, codes in sorted(by_status.items())
    }
