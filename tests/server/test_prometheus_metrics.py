"""The hand-written Prometheus exposition: cumulative, ordered buckets; merged sources; HELP/TYPE per family."""

from __future__ import annotations

from server import metrics


def test_histogram_exposition_is_cumulative_and_ordered() -> None:
    local, shared = metrics.Metrics(), metrics.Metrics()
    for v in (0.003, 0.04, 0.04, 7.0):
        local.observe("aca_frame_seconds", v, {"kind": "render"})
    shared.observe("aca_frame_seconds", 400.0, {"kind": "render"})  # beyond the last finite bucket
    shared.inc("aca_frames_synthesized_total", n=5)
    text = metrics.render(local.snapshot(), shared.snapshot(), {"aca_queue_depth": 3.0})
    lines = text.splitlines()
    assert lines.count("# TYPE aca_frame_seconds histogram") == 1
    buckets = [line for line in lines if line.startswith("aca_frame_seconds_bucket")]
    les = [line.split('le="')[1].split('"')[0] for line in buckets]
    assert les[-1] == "+Inf" and [float(x) for x in les[:-1]] == sorted(float(x) for x in les[:-1])
    counts = [int(line.rsplit(" ", 1)[1]) for line in buckets]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 5
    assert 'aca_frame_seconds_count{kind="render"} 5' in lines
    assert 'aca_frame_seconds_bucket{kind="render",le="0.05"} 3' in lines
    assert "aca_frames_synthesized_total 5" in lines and "aca_queue_depth 3" in lines
    assert "aca_workers_alive 0" in lines  # declared gauges show before their first sample


def test_drain_returns_increments_once() -> None:
    m = metrics.Metrics()
    m.inc("aca_jobs_total", {"kind": "render", "outcome": "done"})
    assert m.drain() == {'aca_jobs_total{kind="render",outcome="done"}': 1.0}
    assert m.drain() == {}
    assert m.snapshot() == {'aca_jobs_total{kind="render",outcome="done"}': 1.0}
