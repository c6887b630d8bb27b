"""An identity: what a reference video becomes (DESIGN.md section 4, "Upload").

``ingest_video`` decodes the upload, finds landmarks and head pose per frame (frames without a face are dropped and
counted), crops and aligns, picks a pose-diverse set of reference frames, draws their labels, encodes them once
(E_a, E_l: the per-identity cache) and builds the appearance map (paper 3.2). ``IdentityAssets`` is the result;
it saves into and loads from one directory (the server makes the directory atomic).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.faces import track_video
from engine.labels import draw_labels
from engine.selection import AppearanceMap
from engine.video import DecodeLimits, Source, iter_frames

if TYPE_CHECKING:
    from engine.runtime.synthesizer import Synthesizer

ASSETS_FILE = "assets.npz"
META_FILE = "identity.json"
FORMAT = "aca.identity.v1"


@dataclass
class IngestReport:
    frames_total: int  # frames decoded (after resampling to the ingest fps)
    frames_used: int  # frames with a face
    frames_dropped: int  # frames without a face
    fps: float
    duration_s: float
    n_references: int  # frames kept as references (pose-diverse subset of the used frames)
    coverage: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class IdentityAssets:
    """Everything a worker needs to drive an identity."""

    images: np.ndarray  # (n, S, S, 3) uint8 reference crops R_a
    landmarks: np.ndarray  # (n, 478, 3) float32 in crop pixels
    poses: np.ndarray  # (n, 3) float32 pitch, yaw, roll (degrees)
    labels: np.ndarray  # (n, L, S, S) float16 R_l
    X_a: np.ndarray  # (n, c, h, w) float16: E_a(R_a), the per-identity feature cache
    X_l: np.ndarray  # (n, c, h, w) float16: E_l(R_l)
    appearance_map: AppearanceMap
    report: IngestReport
    model_id: str  # the model that computed X_a and X_l

    @property
    def n_refs(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def save(self, directory: Path) -> None:
        """Write into an existing directory (the caller writes to a temporary one and renames it into place)."""
        np.savez(
            directory / ASSETS_FILE,
            images=self.images, landmarks=self.landmarks, poses=self.poses, labels=self.labels, X_a=self.X_a,
            X_l=self.X_l,
        )
        meta = {
            "format": FORMAT,
            "model_id": self.model_id,
            "report": asdict(self.report),
            "appearance_map": self.appearance_map.to_dict(),
        }
        (directory / META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> IdentityAssets:
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory} does not hold {FORMAT} assets")
        with np.load(directory / ASSETS_FILE) as z:
            arrays = {k: z[k] for k in ("images", "landmarks", "poses", "labels", "X_a", "X_l")}
        return cls(
            **arrays,
            appearance_map=AppearanceMap.from_dict(meta["appearance_map"]),
            report=IngestReport(**meta["report"]),
            model_id=meta["model_id"],
        )

    def appearance_map_png(self, query: Any = None, size: int = 512) -> bytes:
        return self.appearance_map.plot_png(query, size=size)


def pick_references(poses: np.ndarray, max_references: int) -> np.ndarray:
    """Indices of up to ``max_references`` frames spread over the (pitch, yaw) plane: farthest-point sampling.

    Starts from the most frontal frame, then repeatedly adds the frame farthest from all picked ones, so the
    appearance map covers the poses the video shows with as few references as possible. Returned sorted (time order).
    """
    pts = np.asarray(poses, dtype=np.float64)[:, :2]
    n = len(pts)
    if n <= max_references:
        return np.arange(n)
    picked = [int(np.argmin(np.linalg.norm(pts, axis=1)))]
    dist = np.linalg.norm(pts - pts[picked[0]], axis=1)
    while len(picked) < max_references:
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0.0:  # all remaining frames repeat a picked pose
            break
        picked.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[nxt], axis=1))
    return np.sort(np.asarray(picked, dtype=np.int64))


def ingest_video(
    src: Source | Path,
    synth: Synthesizer,
    limits: DecodeLimits = DecodeLimits(),
    *,
    fps: float = 10.0,
    max_references: int = 48,
    progress: Callable[[float], None] | None = None,
) -> IdentityAssets:
    """A reference video -> IdentityAssets. Raises the engine's typed errors for bad input (video, no face)."""
    report_progress = progress or (lambda _f: None)
    size = synth.image_size
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    stream = iter_frames(src, limits, fps=fps)
    with stream:
        track = track_video(stream, size=size, fps=fps)
    timings["decode_and_landmarks"] = time.perf_counter() - t0
    report_progress(0.6)

    t0 = time.perf_counter()
    keep = pick_references(track.poses, max_references)
    images, landmarks, poses = track.crops[keep], track.landmarks[keep], track.poses[keep]
    labels = draw_labels(landmarks, size)  # (n, L, S, S) float32
    timings["labels"] = time.perf_counter() - t0
    report_progress(0.7)

    t0 = time.perf_counter()
    X_a, X_l = synth.encode_references(images, labels)
    timings["encode"] = time.perf_counter() - t0
    report_progress(0.9)

    appearance_map = AppearanceMap(poses[:, :2])
    report = IngestReport(
        frames_total=track.n_frames,
        frames_used=len(track.kept),
        frames_dropped=track.n_dropped,
        fps=float(stream.fps),
        duration_s=track.n_frames / float(stream.fps) if stream.fps else 0.0,
        n_references=len(keep),
        coverage=json.loads(json.dumps(appearance_map.coverage().to_dict())),  # JSON-normalised, as stored
        timings_s=timings,
    )
    report_progress(1.0)
    return IdentityAssets(
        images=images, landmarks=landmarks.astype(np.float32), poses=poses.astype(np.float32),
        labels=labels.astype(np.float16), X_a=X_a.astype(np.float16), X_l=X_l.astype(np.float16),
        appearance_map=appearance_map, report=report, model_id=synth.model_id,
    )
