"""Schemas: the versioned messages that cross the broker, the records stored on disk, and the public API models.

Three families, kept apart on purpose (DESIGN.md habit 5): *public* models are what clients see (no owner, no
paths); *create* models are what clients send; *stored* records and *broker* messages carry a schema version
``v`` so that an API and workers of different releases can tell each other's messages apart. Broker messages
carry ids only, never paths: a worker derives every path from its own data dir, so a message cannot point it
anywhere else.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

IdentityStatus = Literal["queued", "processing", "ready", "failed"]
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})


def now() -> float:
    return time.time()


# ------------------------------------------------------------------------------------------------------ errors


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. no_face_found")
    message: str = Field(description="what went wrong, for people")
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------------- broker messages


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    job_id: str
    created_at: float = Field(default_factory=now)


class IngestJob(_Message):
    """Turn the stored upload of ``identity_id`` into its IdentityAssets."""

    kind: Literal["ingest"] = "ingest"
    identity_id: str


class RenderJob(_Message):
    """Render the stored driving input of ``render_id`` with identity ``identity_id`` into an mp4."""

    kind: Literal["render"] = "render"
    render_id: str
    identity_id: str


Job = Annotated[IngestJob | RenderJob, Field(discriminator="kind")]
JOB_ADAPTER: TypeAdapter[IngestJob | RenderJob] = TypeAdapter(Job)


class JobState(BaseModel):
    """Live state of one job, kept by the broker (memory dict or Redis hash); ``version`` grows on each change."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = 1
    job_id: str
    kind: Literal["ingest", "render"]
    state: JobStatus = "queued"
    progress: float = 0.0
    frames_done: int = 0
    frames_total: int = 0
    deliveries: int = 0
    cancel_requested: bool = False
    error: ErrorDetail | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    worker: str | None = None
    version: int = 0
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class WorkerInfo(BaseModel):
    worker_id: str
    pid: int
    host: str
    model_id: str | None = None
    started_at: float
    last_seen: float
    jobs: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------------ stored records


class IdentityRecord(BaseModel):
    """``<data>/identities/<id>/meta.json``: the durable state of an identity (written by temp + replace)."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = 1
    id: str
    name: str | None = None
    owner: str = Field(description="SHA-256 of the creating API key ('' without keys)")
    status: IdentityStatus = "queued"
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    upload_bytes: int = 0
    error: ErrorDetail | None = None
    report: dict[str, Any] | None = None
    model_id: str | None = None
    image_size: int | None = None


class RenderRecord(BaseModel):
    """``<data>/renders/<id>/meta.json``: the durable state of a render (terminal states land here)."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = 1
    id: str
    identity_id: str
    owner: str
    source: Literal["video", "landmarks"]
    fps: float | None = None
    state: JobStatus = "queued"
    frames_done: int = 0
    frames_total: int = 0
    timings: dict[str, float] = Field(default_factory=dict)
    error: ErrorDetail | None = None
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


# --------------------------------------------------------------------------------------------- public: identities


class IdentityCreated(BaseModel):
    id: str
    status: IdentityStatus
    status_url: str


class IdentityPublic(BaseModel):
    id: str
    name: str | None
    status: IdentityStatus
    progress: float = Field(description="0..1 while processing, 1 when ready")
    error: ErrorDetail | None = None
    created_at: float
    updated_at: float
    frames_total: int | None = None
    frames_used: int | None = None
    frames_dropped: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    n_references: int | None = None
    coverage: dict[str, Any] | None = Field(None, description="head-pose coverage of the references")
    model_id: str | None = None
    image_size: int | None = None
    appearance_map_url: str | None = None


class IdentityList(BaseModel):
    items: list[IdentityPublic]


# ------------------------------------------------------------------------------------------------ public: renders


class RenderLandmarksCreate(BaseModel):
    """Driving landmarks: T frames of 478 mediapipe-normalised points (x, y in [0, 1] of the frame, z like x)."""

    model_config = ConfigDict(extra="forbid")

    landmarks: list[list[list[float]]] = Field(description="(T, 478, 3)")
    fps: float = Field(25.0, gt=0, description="frame rate of the output video")


class RenderCreated(BaseModel):
    id: str
    status: JobStatus
    status_url: str


class RenderPublic(BaseModel):
    id: str
    identity_id: str
    state: JobStatus
    frames_done: int
    frames_total: int
    fps: float | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")
    error: ErrorDetail | None = None
    created_at: float
    updated_at: float
    video_url: str | None = Field(None, description="set when state is done")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    broker: str
    workers: int = 0
    details: dict[str, Any] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------------- live (broker messages)


class LiveFrameMsg(BaseModel):
    """API -> worker: one driving frame of a live or streaming session (the landmarks travel beside it as raw
    float32 bytes, (478, 3) in the identity's crop pixels), or ``kind="close"``: forget the stream.

    ``n`` numbers the frames the API sent for the stream (the client's ``seq`` is only echoed); ``epoch`` grows
    each time the stream moves to another worker, so a worker that sees a new epoch starts the stream afresh."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    kind: Literal["frame", "close"] = "frame"
    stream_id: str
    identity_id: str = ""
    epoch: int = 0
    n: int = 0
    seq: int = 0
    encoding: Literal["jpeg", "raw"] = "jpeg"
    submitted_at: float = Field(default_factory=now)


class LiveReplyMsg(BaseModel):
    """Worker -> API: the synthesized frame ``n`` of a stream (JPEG, or raw (S, S, 3) uint8 RGB, beside it) or
    the error that stopped it, with the worker's timings in seconds (queue, model, encode) and the batch size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    stream_id: str
    epoch: int
    n: int
    seq: int
    worker: str
    size: int = 0
    timings: dict[str, float] = Field(default_factory=dict)
    error: ErrorDetail | None = None
