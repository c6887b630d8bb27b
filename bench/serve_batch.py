"""Batch-render throughput of the served path, and what the queue adds per frame, embedded vs Redis.

One identity is made from a synthetic reference video (engine.synthetic) and driven by landmark renders
(``POST /v1/identities/{id}/renders`` with a JSON body, so the driving video's decode and face tracking are
not in the measure): ``--jobs`` concurrent jobs of ``--frames`` frames each, submitted together through the
Python client, timed from the first submit to the last ``done``.

- embedded: ``aca serve``'s layout, the in-process broker and N worker threads inside the API process;
- redis: the API process with no workers, and N ``aca worker`` processes consuming the Redis stream.

The baseline is the bare engine in this process (``Synthesizer.render`` on the same identity and landmarks,
one stream frame by frame, and all jobs' streams batched together as a worker does): the *overhead per frame*
is the served wall time less the batched bare-engine time for the same frames, divided by the frames. It holds
the HTTP API, the broker, state and progress updates, the mp4 encode and the download of nothing (no video is
downloaded). Run it on an idle machine:

    .venv/bin/python bench/serve_batch.py [--frames 40] [--jobs 4] [--workers 1 2] [--no-redis]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import table, write_section  # noqa: E402
from clients.client import AvatarClient, Render  # noqa: E402
from clients.demo import local_server  # noqa: E402

SIZE = 96  # side of the synthetic videos (the model's own size comes from its preset)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    broker: str
    workers: int
    frames: int
    wall_s: float  # best round: first submit to last done of every concurrent job
    latency_s: float  # one job alone: submit to done as the client sees it
    job_s: float  # the same job's time inside the worker (its timings' total_s)
    job_frames: int

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s


def driving_landmarks(n_jobs: int, frames: int) -> list[np.ndarray]:
    """One (frames, 478, 3) mediapipe-normalised landmark sequence per job, each of another synthetic face."""
    from engine.synthetic import random_identity, sequence

    return [sequence(random_identity(100 + j), frames, seed=100 + j, size=SIZE).landmarks / SIZE
            for j in range(n_jobs)]


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Least wall seconds of ``repeats`` calls: the machine's other load only ever adds time."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bare_engine(reference: Path, drives: list[np.ndarray], preset: str, repeats: int) -> tuple[float, float]:
    """Seconds to render every frame of ``drives`` with the bare Synthesizer: one stream at a time, and all
    streams batched per time step (what a worker's batch does). Steady state: one untimed round first warms
    torch and the per-reference-set bases cache, as a served round is preceded by a warm-up round."""
    from engine.runtime.identity import ingest_video
    from engine.runtime.synthesizer import FrameRequest, Synthesizer, landmarks_from_normalized

    synth = Synthesizer.load(None, preset=preset)
    assets = ingest_video(reference, synth)
    crops = [landmarks_from_normalized(d, synth.image_size) for d in drives]  # each (T, 478, 3) crop pixels

    def single() -> None:
        for j, lms in enumerate(crops):
            state = synth.new_stream()
            for lm in lms:
                synth.render([FrameRequest(f"s{j}", assets, lm, state)])

    def batched() -> None:
        states = [synth.new_stream() for _ in crops]
        for t in range(max(len(c) for c in crops)):
            synth.render([FrameRequest(f"b{j}", assets, c[t], states[j])
                          for j, c in enumerate(crops) if t < len(c)])

    single()
    return best_of(repeats, single), best_of(repeats, batched)


def served(url: str, reference: Path, drives: list[np.ndarray], repeats: int) -> tuple[float, float, float]:
    """(best wall seconds of a round of concurrent jobs, one job's submit-to-done latency, the same job's time
    inside its worker), after an untimed warm-up round."""
    with AvatarClient(url, timeout=120.0) as client:
        client.wait_until_ready(120.0)
        identity = client.wait_ready(client.upload(reference).id, timeout=600.0)

        def one(drive: np.ndarray) -> Render:
            with AvatarClient(url, timeout=120.0) as c:
                return c.wait_render(c.render(identity.id, landmarks=drive, fps=25.0).id, timeout=1800.0)

        def round_() -> None:
            with ThreadPoolExecutor(len(drives)) as pool:
                list(pool.map(one, drives))

        round_()
        wall = best_of(repeats, round_)
        t0 = time.perf_counter()
        alone = one(drives[0])
        latency = time.perf_counter() - t0
        return wall, latency, float(alone.timings.get("total_s", float("nan")))


@contextmanager
def worker_processes(n: int, env: dict[str, str]) -> Iterator[None]:
    """``aca worker`` processes (the Redis layout); stopped (SIGTERM, then SIGKILL) on exit."""
    command = [sys.executable, "-m", "clients.cli", "worker"]
    procs = [subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
             for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def drop_redis_keys(url: str, prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        for key in r.scan_iter(match=f"{prefix}*"):
            r.delete(key)
    finally:
        r.close()


def run_embedded(workers: int, reference: Path, drives: list[np.ndarray], preset: str,
                 repeats: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="aca-bench-") as data, \
            local_server(data_dir=Path(data), workers=workers, preset=preset) as url:
        return served(url, reference, drives, repeats)


def run_redis(workers: int, reference: Path, drives: list[np.ndarray], preset: str, repeats: int,
              redis_url: str) -> tuple[float, float, float]:
    prefix = f"aca-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="aca-bench-") as data:
        env = {"ACA_REDIS_URL": redis_url, "ACA_REDIS_PREFIX": prefix, "ACA_DATA_DIR": data,
               "ACA_PRESET": preset}
        server = local_server(data_dir=Path(data), workers=0, preset=preset, redis_url=redis_url,
                              redis_prefix=prefix)
        try:
            with worker_processes(workers, env), server as url:
                return served(url, reference, drives, repeats)
        finally:
            drop_redis_keys(redis_url, prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=40, help="frames per render job")
    ap.add_argument("--jobs", type=int, default=4, help="concurrent render jobs")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds per case (the best is kept)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--redis-url", default=os.environ.get("ACA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker process and in this process (bare engine, embedded)")
    args = ap.parse_args()

    import torch

    # Measured on a shared 2-core machine: workers with torch's default thread count (all cores each) spend
    # most of their time in contended OpenMP spin-waits (13-26 s for 40 frames instead of 1.1 s with one
    # thread), so the thread count is set, and said, rather than left to the machine.
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the `aca worker` processes

    from engine.synthetic import write_demo_videos

    tmp = Path(tempfile.mkdtemp(prefix="aca-bench-videos-"))
    reference, _ = write_demo_videos(tmp, seed=0, size=SIZE, reference_s=2.0, driving_s=0.2)
    drives = driving_landmarks(args.jobs, args.frames)
    total = args.jobs * args.frames

    single_s, batched_s = bare_engine(reference, drives, args.preset, args.repeats)
    runs: list[Served] = []
    for n in args.workers:
        embedded = run_embedded(n, reference, drives, args.preset, args.repeats)
        runs.append(Served("embedded", n, total, *embedded, job_frames=args.frames))
        if not args.no_redis:
            redis = run_redis(n, reference, drives, args.preset, args.repeats, args.redis_url)
            runs.append(Served("redis", n, total, *redis, job_frames=args.frames))

    rows: list[list[object]] = [
        ["bare engine, one stream at a time", "-", total, single_s, total / single_s, "-", "-", "-"],
        [f"bare engine, {args.jobs} streams batched", "-", total, batched_s, total / batched_s] + ["-"] * 3,
    ]
    for r in runs:
        queue_ms = 1000 * (r.latency_s - r.job_s)
        rows.append([r.broker, r.workers, r.frames, r.wall_s, r.fps, 1000 * (r.wall_s - batched_s) / total,
                     queue_ms, queue_ms / r.job_frames])
    body = (
        f"Preset `{args.preset}`, {args.jobs} concurrent landmark render jobs of {args.frames} frames each, "
        "submitted together through `clients.AvatarClient`; wall time from the first submit to the last "
        f"`done`, best of {args.repeats} rounds after an untimed warm-up round (torch, bases cache). "
        "Embedded: in-process broker and worker threads in the API process; redis: the API plus N "
        "`aca worker` processes. *vs bare*: served wall time less the batched bare engine's, per frame "
        "(everything serving adds: HTTP, broker, state and progress updates, mp4 encode, and worse batching "
        "when the jobs do not line up). *Queue*: one job alone, its submit-to-done latency as the client "
        "sees it less its time inside the worker (`timings.total_s`): HTTP, queueing, pick-up and the "
        f"notification of the end, per job and spread over its frames. {args.threads} torch thread(s) per "
        "worker and in the bare engine. The machine may be shared: numbers "
        "are noisy, compare rows of one run only.\n\n"
        + table(["path", "workers", "frames", "wall s", "frames/s", "vs bare ms/frame", "queue ms/job",
                 "queue ms/frame"], rows)
    )
    write_section("serve_batch", "Served batch renders: throughput and queue overhead", body)


if __name__ == "__main__":
    main()
