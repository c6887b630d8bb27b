"""Every available backend, through Synthesizer.render, matches eager torch (DESIGN.md habit 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.runtime.backends import BACKENDS, available_backends, make_backend
from engine.runtime.checkpoint import random_model
from engine.runtime.identity import IdentityAssets, IngestReport
from engine.runtime.synthesizer import FrameRequest, Synthesizer
from engine.selection import AppearanceMap

# torch-compile's first compile takes minutes on two shared cores: it is checked in the slow run only.
FAST = [b for b in available_backends() if b not in ("torch", "torch-compile")]
SLOW = [b for b in available_backends() if b == "torch-compile"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One export cache for the module: each model is exported once (a few seconds each)."""
    return tmp_path_factory.mktemp("backend-cache")


@pytest.fixture(scope="module")
def clip():
    from engine import synthetic

    return synthetic.sequence(synthetic.random_identity(2), n_frames=10, seed=4, size=64)


def _assets(synth: Synthesizer, clip) -> IdentityAssets:
    """An identity from the first 6 synthetic frames, encoded by ``synth``'s backend."""
    from engine.labels import draw_labels

    n = 6
    labels = draw_labels(clip.landmarks[:n], synth.image_size)
    X_a, X_l = synth.encode_references(clip.images[:n], labels)
    return IdentityAssets(
        images=clip.images[:n], landmarks=clip.landmarks[:n], poses=clip.poses[:n], labels=labels.astype(np.float16),
        X_a=X_a.astype(np.float16), X_l=X_l.astype(np.float16), appearance_map=AppearanceMap(clip.poses[:n, :2]),
        report=IngestReport(frames_total=n, frames_used=n, frames_dropped=0, fps=clip.fps, duration_s=n / clip.fps,
                            n_references=n),
        model_id=synth.model_id,
    )


def _render(backend: str, clip, tmp_path, attention: str = "compact") -> tuple[list[np.ndarray], np.ndarray]:
    """Two streams over three frames (batch 2); returns the frames and the identity's encoder features."""
    loaded = random_model("tiny", seed=0)
    if attention != "compact":
        torch.manual_seed(0)
        from engine.config import preset
        from engine.model.vid2vid import ACAVid2Vid

        loaded.model = ACAVid2Vid(preset("tiny", attention=attention)).eval()
        loaded.model_id = f"random:tiny-{attention}:0"
    synth = Synthesizer(make_backend(backend, loaded.model, model_id=loaded.model_id, cache_dir=tmp_path),
                        loaded.model_id)
    assets = _assets(synth, clip)
    states = [synth.new_stream(), synth.new_stream()]
    frames = []
    for t in range(3):
        reqs = [FrameRequest("id", assets, clip.landmarks[6 + t + s], states[s]) for s in range(2)]
        frames += [f.image for f in synth.render(reqs)]
    return frames, assets.X_a.astype(np.float32)


def _check(backend: str, clip, tmp_path, attention: str = "compact") -> None:
    want, want_X = _render("torch", clip, tmp_path, attention)
    got, got_X = _render(backend, clip, tmp_path, attention)
    np.testing.assert_allclose(got_X, want_X, atol=1e-3)
    for g, w in zip(got, want, strict=True):
        # uint8 frames: 1e-3 in [-1, 1] is 0.06 of a level, so rounding may move a pixel by one level at most.
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 1


def test_backend_names_are_known():
    assert set(available_backends()) <= set(BACKENDS) and "torch" in available_backends()
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("nope", random_model("tiny").model)


@pytest.mark.parametrize("backend", FAST)
def test_backend_render_matches_torch(backend, clip, cache):
    _check(backend, clip, cache)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAST)
def test_backend_render_matches_torch_for_the_pixel_baseline(backend, clip, cache):
    _check(backend, clip, cache, attention="pixel")


@pytest.mark.slow
@pytest.mark.parametrize("backend", SLOW)
def test_slow_backend_render_matches_torch(backend, clip, cache):
    _check(backend, clip, cache)


def test_onnxruntime_exports_once_into_the_cache(cache):
    tmp_path = cache
    if "onnxruntime" not in available_backends():
        pytest.skip("onnxruntime is not installed")
    from engine.runtime.onnx_backend import OnnxRuntimeBackend

    model = random_model("tiny").model
    first = OnnxRuntimeBackend(model, cache_dir=tmp_path, model_id="random:tiny:0")
    stamp = (first.directory / "frame.onnx").stat().st_mtime_ns
    second = OnnxRuntimeBackend(model, cache_dir=tmp_path, model_id="random:tiny:0")
    assert second.directory == first.directory and ":" not in first.directory.name
    assert (second.directory / "frame.onnx").stat().st_mtime_ns == stamp
