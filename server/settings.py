"""Runtime settings of the server and its workers (DESIGN.md habit 4).

One pydantic-settings class; every environment variable (prefix ``ACA_``) is declared here once, with a comment.
It is read once at start-up (``get_settings()`` or an explicit ``Settings(...)`` handed to ``create_app`` /
``Worker``), never at import time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.video import DecodeLimits

_MIB = 1 << 20


class Settings(BaseSettings):
    """Every knob of the API and the workers. Environment: ``ACA_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="ACA_", extra="ignore", frozen=True)

    # --- storage and broker ---------------------------------------------------------------------------------
    # Root of the identity registry and render outputs; API and workers must see the same directory.
    data_dir: Path = Path("data")
    # Redis URL (redis://host:port/db). Unset: embedded mode, an in-process broker and in-process workers.
    redis_url: str | None = None
    # Prefix of every Redis key this deployment uses (several deployments or test runs can share one Redis).
    redis_prefix: str = "aca"

    # --- upload and video limits ----------------------------------------------------------------------------
    # Largest accepted upload (reference or driving video), enforced while the body streams in.
    max_upload_bytes: int = Field(200 * _MIB, gt=0)
    # Largest JSON body (driving landmarks): 478 x 3 floats per frame are about 25 KB of JSON.
    max_json_bytes: int = Field(64 * _MIB, gt=0)
    # Longest accepted video, in seconds (from the header, re-checked while decoding).
    max_video_duration_s: float = Field(120.0, gt=0)
    # Most decoded source frames of one video.
    max_video_frames: int = Field(10_000, gt=0)
    # Largest accepted resolution (either orientation).
    max_video_width: int = Field(3840, gt=0)
    max_video_height: int = Field(2160, gt=0)
    # Most frames of one render (driving video frames or landmark frames).
    max_render_frames: int = Field(3000, gt=0)
    # Highest driving frame rate a landmarks render may ask for.
    max_render_fps: float = Field(60.0, gt=0)
    # Rate at which reference videos are sampled during ingest (engine.runtime.identity.ingest_video).
    ingest_fps: float = Field(10.0, gt=0)
    # Most reference frames kept per identity.
    max_references: int = Field(48, gt=2)
    # x264 quality of rendered mp4s (0 lossless .. 51 worst).
    render_crf: int = Field(20, ge=0, le=51)

    # --- model and workers ----------------------------------------------------------------------------------
    # Checkpoint of the model. Unset: the shipped model named by `model` (or a random model when `preset` is set).
    model_path: Path | None = None
    # Shipped model (models/models.json, sha256-verified at load) served when neither model_path nor preset is set.
    model: str = "aca-face-64"
    # Architecture preset (engine.config) of a seeded, randomly initialised model, for tests and development;
    # ignored when model_path is set.
    preset: str | None = None
    # Inference backend of engine.runtime.synthesizer.Synthesizer.
    backend: Literal["torch", "torch-compile", "onnxruntime", "tensorrt"] = "torch"
    # Torch device of the worker ("cpu", "cuda", "cuda:1").
    device: str = "cpu"
    # Torch CPU threads of a worker process (0: torch's default, one per core). Workers that share a busy CPU run
    # far faster with few threads each: measured 13-26 s against 1.1 s of model time for 40 frames at 1 thread.
    torch_threads: int = Field(0, ge=0)
    # Memory budget of the Synthesizer's per-reference-set bases cache.
    synth_cache_bytes: int = Field(256 * _MIB, gt=0)
    # In-process worker threads started by `aca serve` in embedded mode (0: accept jobs, run none).
    workers: int = Field(1, ge=0)
    # Most frames (of different render jobs) in one batched forward.
    batch_size: int = Field(8, ge=1)
    # How long an idle worker waits for more jobs to fill a batch after the first arrives (Triton's
    # max_queue_delay): latency of the first job against throughput of the batch.
    batch_delay_ms: float = Field(5.0, ge=0)
    # Loaded identities kept per worker (LRU), so consecutive renders of one identity skip the disk.
    identity_cache_size: int = Field(8, ge=1)
    # Least time between two progress reports of one job (0: every frame).
    progress_interval_s: float = Field(0.25, ge=0)

    # --- queue --------------------------------------------------------------------------------------------------
    # Most unfinished jobs (queued + running); beyond it submissions get 429 queue_full.
    queue_max_depth: int = Field(64, ge=1)
    # Deliveries of one job before it is failed (a worker that dies mid-job causes a redelivery).
    job_max_deliveries: int = Field(3, ge=1)
    # A delivered job whose worker has not refreshed it for this long is claimed by another worker (XAUTOCLAIM).
    # Live workers refresh their jobs with every heartbeat, so this only needs to exceed a few heartbeats.
    job_idle_timeout_s: float = Field(30.0, gt=0)
    # Seconds between worker heartbeats (feed /readyz and keep held jobs from being reclaimed).
    heartbeat_interval_s: float = Field(2.0, gt=0)
    # A worker whose last heartbeat is older than this is considered dead by /readyz.
    heartbeat_ttl_s: float = Field(10.0, gt=0)
    # How long finished job records stay in the broker (the durable state is on disk).
    job_ttl_s: int = Field(7 * 24 * 3600, gt=0)

    # --- live streams (WS /v1/identities/{id}/live, POST /v1/identities/{id}/stream) ----------------------------
    # Most live and streaming sessions open at once (all API processes together in Redis mode); one more is refused
    # with close code 1013 (websocket) or 429 too_many_streams (HTTP).
    live_max_streams: int = Field(16, ge=1)
    # A websocket that sends nothing for this long is closed (code 4408); a worker forgets a stream it has not
    # seen for twice as long.
    live_idle_timeout_s: float = Field(30.0, gt=0)
    # Largest driving frame (one websocket message, one NDJSON line or one multipart part).
    live_max_frame_bytes: int = Field(2 * _MIB, gt=0)
    # Frames of one stream at the workers at once. Latency stays bounded by it: a websocket's newer frames wait in
    # a one-frame slot where each replaces the last (latest wins, the replaced one is counted as dropped).
    live_max_inflight: int = Field(2, ge=1)
    # Synthesized frames an HTTP stream keeps for a client that reads its response slower than it sends.
    live_max_buffered: int = Field(64, ge=1)
    # The workers' dynamic batcher (Triton's max_batch_size and max_queue_delay): at most this many frames of
    # different streams per forward pass, and the first frame waits at most this long for others to join it.
    live_batch_size: int = Field(16, ge=1)
    live_batch_delay_ms: float = Field(2.0, ge=0)
    # JPEG quality of synthesized live frames.
    live_jpeg_quality: int = Field(85, ge=1, le=100)
    # A frame unanswered this long makes the API check its worker's heartbeat; a dead worker's streams move to a
    # live worker (which starts them afresh, without the previous frame) and their unanswered frames are resent.
    live_reroute_after_s: float = Field(1.0, gt=0)
    # A frame unanswered this long moves its stream to another worker even when the worker still beats.
    live_frame_timeout_s: float = Field(15.0, gt=0)

    # --- API ------------------------------------------------------------------------------------------------
    # Comma-separated API keys; empty: no authentication (every resource belongs to the anonymous owner).
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Leave /metrics open when API keys are set (scrapers rarely carry bearer tokens).
    metrics_public: bool = True
    # Longest long-poll (?wait=) a client may ask for.
    max_wait_s: float = Field(30.0, gt=0)
    # Address `aca serve` binds.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    # --- derived --------------------------------------------------------------------------------------------

    @property
    def embedded(self) -> bool:
        """True without Redis: in-process broker and workers."""
        return not self.redis_url

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_bytes=self.max_upload_bytes,
            max_duration_s=self.max_video_duration_s,
            max_frames=self.max_video_frames,
            max_width=self.max_video_width,
            max_height=self.max_video_height,
        )

    def api_key_hashes(self) -> frozenset[str]:
        return frozenset(hash_key(k) for k in self.api_keys)


def hash_key(key: str) -> str:
    """What the registry stores as an owner: a SHA-256 of the API key, never the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def get_settings() -> Settings:
    """Read the environment (and nothing else) once; call it at start-up only."""
    return Settings()  # type: ignore[call-arg]  # every field has a default; mypy does not see pydantic's
