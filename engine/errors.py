"""Typed errors of the engine (DESIGN.md habit 6).

A user's mistake is a ``UserError`` with a stable ``code`` that the server maps to an HTTP 4xx and the Python client
maps back to the same class. Anything else that goes wrong is a bug or a broken worker and is not a ``UserError``.
"""

from __future__ import annotations


class AcaError(Exception):
    """Base of every error this project raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "details": self.details}


class UserError(AcaError):
    """The request or its content is at fault; retrying the same input cannot succeed."""

    code = "bad_request"
    http_status = 400


class InvalidVideo(UserError):
    """Unreadable, corrupt, truncated, empty or not a video at all."""

    code = "invalid_video"
    http_status = 422


class VideoTooLarge(UserError):
    code = "video_too_large"
    http_status = 413


class VideoTooLong(UserError):
    code = "video_too_long"
    http_status = 422


class ResolutionTooHigh(UserError):
    code = "resolution_too_high"
    http_status = 422


class NoFaceFound(UserError):
    """No frame of the input shows a face that the landmark model finds."""

    code = "no_face_found"
    http_status = 422


class InvalidLandmarks(UserError):
    """Landmarks of the wrong shape, or with NaN or infinite values."""

    code = "invalid_landmarks"
    http_status = 422


USER_ERRORS: dict[str, type[UserError]] = {
    cls.code: cls
    for cls in (UserError, InvalidVideo, VideoTooLarge, VideoTooLong, ResolutionTooHigh, NoFaceFound, InvalidLandmarks)
}
