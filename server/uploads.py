"""Request bodies read with bounded memory and bounded disk.

Multipart uploads are parsed while they stream in (python-multipart's push parser): the file part goes straight
to a temp file, the size limit is enforced as bytes arrive (413 as soon as it is passed, whatever Content-Length
claimed), and small text fields are capped. JSON bodies are read up to a byte limit. Nothing here trusts a file
name or a declared content type: the caller sniffs the stored bytes (engine.video.probe).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from engine.errors import UserError, VideoTooLarge
from server.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

# Text fields (``name``) are short; a multipart body may also carry headers and boundaries around the file.
_MAX_FIELD_BYTES = 4096
_MAX_FIELDS = 8
_MULTIPART_OVERHEAD = 64 * 1024


@dataclass
class Upload:
    path: Path
    size: int
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


class _Form:
    """Callbacks of the push parser: one file part to disk, a few short text parts to memory."""

    def __init__(self, dest: Path, file_field: str, max_bytes: int) -> None:
        self.dest = dest
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.size = 0
        self.filename: str | None = None
        self.error: UserError | None = None
        self._out: BinaryIO | None = None
        self._seen_file = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._buf = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_cb,
            "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._name = None
        self._buf = bytearray()

    def _header_field_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        raw_name = params.get(b"name")
        self._name = raw_name.decode("utf-8", "replace") if raw_name is not None else None
        if self._name == self.file_field and not self._seen_file:
            self._seen_file = True
            fn = params.get(b"filename")
            self.filename = fn.decode("utf-8", "replace")[:255] if fn is not None else None
            self._out = open(self.dest, "wb")  # noqa: SIM115 -- closed in _part_end / close()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        chunk = data[start:end]
        if self._out is not None and self._name == self.file_field:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                self.error = VideoTooLarge(f"the upload is larger than the limit of {self.max_bytes} bytes",
                                           limit=self.max_bytes)
                return
            self._out.write(chunk)
        else:
            self._buf += chunk
            if len(self._buf) > _MAX_FIELD_BYTES:
                self.error = PayloadTooLarge(f"the form field {self._name!r} is longer than {_MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._out is not None and self._name == self.file_field:
            self._out.close()
            self._out = None
        elif self._name is not None and self.error is None:
            if len(self.fields) >= _MAX_FIELDS:
                self.error = InvalidRequest("too many form fields")
            else:
                self.fields[self._name] = self._buf.decode("utf-8", "replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_upload(request: Request, dest: Path, max_bytes: int, file_field: str = "file") -> Upload:
    """Stream the multipart body of ``request`` into ``dest`` (the ``file_field`` part) and return it.

    Raises UnsupportedMediaType (not multipart/form-data), VideoTooLarge (file part over ``max_bytes``, checked
    against Content-Length first and against the bytes as they come), InvalidRequest (no file part, malformed).
    ``dest`` is removed on any failure.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedMediaType("expected multipart/form-data with a 'file' part", content_type=ctype.decode())
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _MULTIPART_OVERHEAD:
        raise VideoTooLarge(f"the upload is {declared} bytes, more than the limit of {max_bytes}",
                            size=int(declared), limit=max_bytes)
    form = _Form(dest, file_field, max_bytes)
    parser = MultipartParser(params[b"boundary"], form.callbacks())  # type: ignore[arg-type]
    ok = False
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if form.error is not None:
                raise form.error
        parser.finalize()
        if form.error is not None:
            raise form.error
        if not form._seen_file:
            raise InvalidRequest(f"the multipart field {file_field!r} (the video file) is missing")
        ok = True
        return Upload(path=dest, size=form.size, filename=form.filename, fields=form.fields)
    except (ValueError, AssertionError) as e:  # python-multipart's MultipartParseError is a ValueError
        raise InvalidRequest(f"malformed multipart body: {e}") from None
    finally:
        form.close()
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()


async def receive_json(request: Request, max_bytes: int) -> Any:
    """The JSON body, read up to ``max_bytes`` (PayloadTooLarge beyond); InvalidRequest when it does not parse."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the body is {declared} bytes, more than the limit of {max_bytes}", limit=max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"the body is larger than the limit of {max_bytes} bytes", limit=max_bytes)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
