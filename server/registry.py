"""The reference registry: identities and renders on disk, written so that a crash never leaves a half-written
resource visible (DESIGN.md section 4, "Upload").

Layout under the data dir::

    identities/<id>/meta.json          IdentityRecord (temp + fsync + os.replace)
    identities/<id>/upload.bin         the reference video as uploaded (until ingest settles)
    identities/<id>/assets/            IdentityAssets + appearance-map.png (built in a temp dir, renamed in)
    renders/<id>/meta.json             RenderRecord
    renders/<id>/driving.bin | .npy    the driving video, or the driving landmarks in crop pixels (T, 478, 3)
    renders/<id>/out.mp4               the result (engine.video.encode_mp4 writes it atomically)
    tmp/                               uploads in flight and resources being assembled (same filesystem)

A resource directory is assembled under tmp/ (its upload and meta.json inside) and renamed into place in one step,
so it appears complete or not at all; deleting renames it out of the way first. Ids are generated here and checked
against a strict pattern before they touch a path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.errors import IdentityNotFound, RenderNotFound
from server.schemas import IdentityRecord, RenderRecord, now

if TYPE_CHECKING:
    from engine.runtime.identity import IdentityAssets

_ID = re.compile(r"^(idn|rnd)_[0-9a-f]{20}$")
META = "meta.json"
UPLOAD = "upload.bin"
ASSETS = "assets"
MAP_PNG = "appearance-map.png"
DRIVING_VIDEO = "driving.bin"
DRIVING_LANDMARKS = "driving.npy"
OUTPUT = "out.mp4"


def new_id(kind: str) -> str:
    """``idn_...`` for identities, ``rnd_...`` for renders: 80 random bits, unguessable across owners."""
    return f"{kind}_{secrets.token_hex(10)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def write_json_atomic(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` via a temp sibling, fsync and ``os.replace``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class Registry:
    """Identities and renders under ``data_dir``. Every method is synchronous, short, and safe to call from
    several processes (the API and workers share the directory)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.identities = self.root / "identities"
        self.renders = self.root / "renders"
        self.tmp = self.root / "tmp"

    def ensure_dirs(self) -> None:
        for d in (self.identities, self.renders, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path under tmp/ (same filesystem as the resources, so renames are atomic)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    # ------------------------------------------------------------------------------------------ generic parts

    def _dir(self, base: Path, rid: str) -> Path | None:
        if not _ID.match(rid):
            return None
        d = base / rid
        return d if (d / META).is_file() else None

    def _publish(self, base: Path, rid: str, meta: str, files: dict[str, Path]) -> Path:
        """Assemble ``rid`` in tmp/ (meta.json and the given files moved in) and rename it into ``base``."""
        base.mkdir(parents=True, exist_ok=True)
        staging = self.temp_path(".new")
        staging.mkdir()
        try:
            for name, src in files.items():
                os.replace(src, staging / name)
            (staging / META).write_text(meta, encoding="utf-8")
            _fsync_tree(staging)
            os.rename(staging, base / rid)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(base)
        return base / rid

    def _remove(self, d: Path) -> None:
        """Rename out of the way first (the resource disappears at once), then delete at leisure."""
        trash = self.temp_path(".del")
        try:
            os.rename(d, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ identities

    def create_identity(self, identity_id: str, owner: str, name: str | None, upload: Path,
                        size: int) -> IdentityRecord:
        record = IdentityRecord(id=identity_id, owner=owner, name=name, upload_bytes=size)
        self._publish(self.identities, identity_id, record.model_dump_json(), {UPLOAD: upload})
        return record

    def read_identity(self, identity_id: str) -> IdentityRecord | None:
        d = self._dir(self.identities, identity_id)
        if d is None:
            return None
        try:
            return IdentityRecord.model_validate_json((d / META).read_text(encoding="utf-8"))
        except FileNotFoundError:  # deleted between the check and the read
            return None

    def get_identity(self, identity_id: str, owner: str) -> IdentityRecord:
        """The record, if ``owner`` owns it; IdentityNotFound otherwise (another owner's id is indistinguishable
        from an unknown one)."""
        record = self.read_identity(identity_id)
        if record is None or record.owner != owner:
            raise IdentityNotFound(f"no identity {identity_id!r}", id=identity_id)
        return record

    def list_identities(self, owner: str) -> list[IdentityRecord]:
        if not self.identities.is_dir():
            return []
        records = (self.read_identity(p.name) for p in self.identities.iterdir())
        return sorted((r for r in records if r is not None and r.owner == owner), key=lambda r: (r.created_at, r.id))

    def unfinished_identities(self) -> list[IdentityRecord]:
        """Every owner's identities still queued or processing, oldest first."""
        if not self.identities.is_dir():
            return []
        records = (self.read_identity(p.name) for p in self.identities.iterdir())
        return sorted((r for r in records if r is not None and r.status in ("queued", "processing")),
                      key=lambda r: r.created_at)

    def unfinished_renders(self) -> list[RenderRecord]:
        if not self.renders.is_dir():
            return []
        records = (self.read_render(p.name) for p in self.renders.iterdir())
        return sorted((r for r in records if r is not None and r.state in ("queued", "running")),
                      key=lambda r: r.created_at)

    def update_identity(self, identity_id: str, **fields: Any) -> IdentityRecord | None:
        """Rewrite meta.json with ``fields`` changed; None when the identity is gone (deleted meanwhile)."""
        record = self.read_identity(identity_id)
        if record is None:
            return None
        record = record.model_copy(update={**fields, "updated_at": now()})
        record = IdentityRecord.model_validate(record.model_dump())
        try:
            write_json_atomic(self.identities / identity_id / META, record.model_dump_json())
        except FileNotFoundError:
            return None
        return record

    def delete_identity(self, identity_id: str) -> None:
        if _ID.match(identity_id):
            self._remove(self.identities / identity_id)

    def upload_path(self, identity_id: str) -> Path:
        return self.identities / identity_id / UPLOAD

    def drop_upload(self, identity_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.upload_path(identity_id).unlink()

    def assets_dir(self, identity_id: str) -> Path:
        return self.identities / identity_id / ASSETS

    def appearance_map_path(self, identity_id: str) -> Path:
        return self.assets_dir(identity_id) / MAP_PNG

    def commit_assets(self, identity_id: str, assets: IdentityAssets) -> None:
        """Save ``assets`` (and the appearance map's PNG) into the identity, atomically and idempotently: a second
        run after a crash finds the committed directory and keeps it (the same input gives the same result)."""
        final = self.assets_dir(identity_id)
        if final.is_dir():
            return
        staging = self.identities / identity_id / f".assets.{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            assets.save(staging)
            (staging / MAP_PNG).write_bytes(assets.appearance_map_png())
            _fsync_tree(staging)
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # a concurrent run of the same job committed first otherwise
                    raise
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(final.parent)

    # -------------------------------------------------------------------------------------------------- renders

    def create_render(self, render_id: str, identity_id: str, owner: str, *, source: str, driving: Path,
                      fps: float | None, frames_total: int = 0) -> RenderRecord:
        record = RenderRecord(id=render_id, identity_id=identity_id, owner=owner, source=source,  # type: ignore[arg-type]
                              fps=fps, frames_total=frames_total)
        name = DRIVING_VIDEO if source == "video" else DRIVING_LANDMARKS
        self._publish(self.renders, render_id, record.model_dump_json(), {name: driving})
        return record

    def read_render(self, render_id: str) -> RenderRecord | None:
        d = self._dir(self.renders, render_id)
        if d is None:
            return None
        try:
            return RenderRecord.model_validate_json((d / META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def get_render(self, render_id: str, owner: str) -> RenderRecord:
        record = self.read_render(render_id)
        if record is None or record.owner != owner:
            raise RenderNotFound(f"no render {render_id!r}", id=render_id)
        return record

    def update_render(self, render_id: str, **fields: Any) -> RenderRecord | None:
        record = self.read_render(render_id)
        if record is None:
            return None
        record = RenderRecord.model_validate({**record.model_dump(), **fields, "updated_at": now()})
        try:
            write_json_atomic(self.renders / render_id / META, record.model_dump_json())
        except FileNotFoundError:
            return None
        return record

    def delete_render(self, render_id: str) -> None:
        if _ID.match(render_id):
            self._remove(self.renders / render_id)

    def driving_path(self, render_id: str, source: str) -> Path:
        return self.renders / render_id / (DRIVING_VIDEO if source == "video" else DRIVING_LANDMARKS)

    def output_path(self, render_id: str) -> Path:
        return self.renders / render_id / OUTPUT

    def scratch_path(self, render_id: str, token: str) -> Path:
        """Per-delivery scratch file (decoded frames before encoding); the token keeps two deliveries apart."""
        return self.renders / render_id / f".frames.{re.sub(r'[^0-9A-Za-z]', '_', token)}.u8"


def dump_report(report: Any) -> dict[str, Any]:
    """An IngestReport as plain JSON data (dataclass -> dict, numpy scalars -> floats)."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(report), default=float))
