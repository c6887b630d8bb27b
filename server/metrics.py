"""Prometheus text exposition, written by hand (no extra dependency).

Samples are kept as a flat ``{"name{label=\"v\"}": value}`` map: the same shape lives in a process (``Metrics``)
and in a Redis hash (workers add their deltas with HINCRBYFLOAT), so the API can expose what separate worker
processes counted. Histograms are cumulative ``_bucket{le=...}`` counters plus ``_sum`` and ``_count``, as the
format requires.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping

# Seconds; from one small frame on a GPU to a long ingest on a CPU.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Every metric family this service exposes: name -> (type, help).
FAMILIES: dict[str, tuple[str, str]] = {
    "aca_http_requests_total": ("counter", "HTTP requests by route template, method and status"),
    "aca_http_request_duration_seconds": ("histogram", "HTTP request latency by route template"),
    "aca_queue_depth": ("gauge", "unfinished jobs (queued and running)"),
    "aca_workers_alive": ("gauge", "workers with a fresh heartbeat"),
    "aca_frames_synthesized_total": ("counter", "frames rendered by the workers"),
    "aca_render_batch_size": ("histogram", "frames per batched forward"),
    "aca_frame_seconds": ("histogram", "wall time of one batched forward divided by its frames"),
    "aca_job_seconds": ("histogram", "wall time of finished jobs by kind and outcome"),
    "aca_jobs_total": ("counter", "finished jobs by kind and outcome"),
}

BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)

#: Unlabelled families shown as 0 before their first sample (so a scraper sees them from the start).
_ZERO_DEFAULT = ("aca_queue_depth", "aca_workers_alive", "aca_frames_synthesized_total")


def sample_key(name: str, labels: Mapping[str, str] | None = None) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def histogram_samples(name: str, value: float, labels: Mapping[str, str] | None = None,
                      buckets: tuple[float, ...] = LATENCY_BUCKETS) -> dict[str, float]:
    """The increments one observation makes: every bucket with ``le >= value``, ``+Inf``, sum and count."""
    base = dict(labels or {})
    out: dict[str, float] = {}
    for le in (*buckets, math.inf):
        if value <= le:
            out[sample_key(f"{name}_bucket", {**base, "le": _fmt(le)})] = 1.0
    out[sample_key(f"{name}_sum", base)] = value
    out[sample_key(f"{name}_count", base)] = 1.0
    return out


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "+Inf"
    return repr(float(x)) if x != int(x) else f"{int(x)}.0"


class Metrics:
    """Thread-safe in-process sample store."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, float] = {}
        self._pending: dict[str, float] = {}

    def inc(self, name: str, labels: Mapping[str, str] | None = None, n: float = 1.0) -> None:
        self.add({sample_key(name, labels): n})

    def observe(self, name: str, value: float, labels: Mapping[str, str] | None = None,
                buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.add(histogram_samples(name, value, labels, buckets))

    def add(self, deltas: Mapping[str, float]) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._samples[k] = self._samples.get(k, 0.0) + v
                self._pending[k] = self._pending.get(k, 0.0) + v

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._samples)

    def drain(self) -> dict[str, float]:
        """Increments since the last drain (what a worker ships to a shared store)."""
        with self._lock:
            out, self._pending = self._pending, {}
            return out


def _family(key: str) -> str:
    name = key.split("{", 1)[0]
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in FAMILIES:
            return name[: -len(suffix)]
    return name


def render(*sources: Mapping[str, float]) -> str:
    """Exposition text of the merged samples, grouped by family with HELP and TYPE lines."""
    merged: dict[str, float] = {}
    for src in sources:
        for k, v in src.items():
            merged[k] = merged.get(k, 0.0) + v
    by_family: dict[str, list[str]] = {}
    for key in sorted(merged, key=_order):
        by_family.setdefault(_family(key), []).append(key)
    lines: list[str] = []
    for fam in sorted(set(by_family) | set(_ZERO_DEFAULT)):
        kind, text = FAMILIES.get(fam, ("untyped", fam))
        lines.append(f"# HELP {fam} {text}")
        lines.append(f"# TYPE {fam} {kind}")
        keys = by_family.get(fam, [])
        if not keys:
            lines.append(f"{fam} 0")
        lines.extend(f"{k} {_value(merged[k])}" for k in keys)
    return "\n".join(lines) + "\n"


_PAIR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_SUFFIX_ORDER = {"_bucket": 0, "_sum": 1, "_count": 2}


def _order(key: str) -> tuple[str, str, int, float]:
    """Series together, then a histogram's buckets by increasing ``le`` (+Inf last), then _sum and _count."""
    name, _, labels = key.partition("{")
    family = _family(key)
    pairs = [(k, v) for k, v in _PAIR.findall(labels) if k != "le"]
    bound = next((float(v.replace("+Inf", "inf")) for k, v in _PAIR.findall(labels) if k == "le"), 0.0)
    return family, repr(pairs), _SUFFIX_ORDER.get(name[len(family):], 0), bound


def _value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
