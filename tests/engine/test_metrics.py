"""engine/metrics.py: PSNR, SSIM, the temporal error and the Fréchet distance against hand-computed values; FID
with a local TorchScript feature network and a clear error without one; the paper's reference protocol; and the
shipped model reproducing its model card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import SyntheticSequences
from engine.metrics import (
    MetricWeightsMissing,
    evaluate_model,
    fid,
    frechet_distance,
    fvd,
    psnr,
    reference_sets,
    ssim,
    temporal_error,
)


def test_psnr_of_a_known_mse() -> None:
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 10, np.uint8)  # MSE = 100
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))  # 28.13 dB
    assert psnr(a, a) == math.inf
    # Float images with their own range: MSE 0.01 on [0, 1] is 20 dB.
    assert psnr(np.zeros(4), np.full(4, 0.1), data_range=1.0) == pytest.approx(20.0)


def test_ssim_identical_is_one_and_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 36, 3)).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    want = structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255)
    assert ssim(a, b) == pytest.approx(want, abs=1e-9)
    assert ssim(a, b) < 0.99
    with pytest.raises(ValueError):
        ssim(a, b[:, :30])


def test_temporal_error() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 200, (5, 8, 8, 3)).astype(np.uint8)
    assert temporal_error(truth + 20, truth) == 0.0  # a constant offset changes nothing between frames
    frozen = np.repeat(truth[:1], 5, axis=0)
    want = np.abs(np.diff(truth.astype(float), axis=0)).mean()  # a frozen video misses all of the motion
    assert temporal_error(frozen, truth) == pytest.approx(want)


def test_frechet_distance_of_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)) = 13 + (1 + 9 - 6) + (4 + 1 - 4)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(13 + 4 + 1)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_and_fvd_refuse_without_local_weights(tmp_path: Path) -> None:
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(MetricWeightsMissing, match="--inception PATH"):
        fid(frames, frames, None)
    with pytest.raises(MetricWeightsMissing, match="does not exist"):
        fvd([frames], [frames], tmp_path / "i3d.pt")


class _Features(torch.nn.Module):
    """A stand-in for NVlabs' Inception TorchScript with its calling convention: uint8 (N, 3, H, W) -> (N, 4)."""

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = x.float() / 255.0
        return torch.stack([x.mean((1, 2, 3)), x[:, 0].mean((1, 2)), x.std((1, 2, 3)), x[:, 2].amax((1, 2))], 1)


def test_fid_with_a_local_torchscript_network(tmp_path: Path) -> None:
    path = tmp_path / "inception.pt"
    torch.jit.script(_Features()).save(str(path))
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 16, 16, 3)).astype(np.uint8)
    assert fid(real, real, path) == pytest.approx(0.0, abs=1e-6)
    assert fid(real, (real // 2).astype(np.uint8), path) > 0.01


def test_reference_protocol_random_and_selected() -> None:
    seq = SyntheticSequences.test(1, 64, n_frames=30).get(0)
    drive, sets = reference_sets(seq, "random", 3, np.random.default_rng([0, 0]))
    assert drive.tolist() == list(range(6, 30)) and len(sets) == 24
    assert len(set(sets)) == 1 and all(0 <= i < 6 for i in sets[0])  # one random set from the first 20%
    again = reference_sets(seq, "random", 3, np.random.default_rng([0, 0]))[1]
    assert again == sets  # the same seed gives both models the same reference sets
    _, selected = reference_sets(seq, "select", 3, np.random.default_rng(0))
    assert all(len(set(s)) == 3 and all(0 <= i < 6 for i in s) for s in selected)
    with pytest.raises(ValueError):
        reference_sets(seq, "nearest", 3, np.random.default_rng(0))


def test_shipped_model_reproduces_its_model_card() -> None:
    """CI: the shipped model, evaluated as its card says, gives the card's PSNR within 0.1 dB."""
    from engine.runtime.checkpoint import load_checkpoint, models_dir, shipped_model_path, shipped_models

    torch.set_num_threads(1)
    entry = shipped_models()["aca-face-64"]
    loaded = load_checkpoint(shipped_model_path("aca-face-64"), expected_sha256=entry["sha256"])
    card = entry["ci_eval"]
    source = SyntheticSequences.test(card["identities"], loaded.model.cfg.image_size, n_frames=card["frames"])
    result = evaluate_model(loaded.model, source, refs=card["refs"], seed=card["seed"])
    assert abs(result.mean("psnr") - card["psnr"]) < 0.1, (result.summary(), card)
    assert abs(result.mean("ssim") - card["ssim"]) < 0.01
    # The model card quotes the same numbers as the registry.
    assert f"{card['psnr']:.2f}" in (models_dir() / "README.md").read_text()
    assert json.loads((models_dir() / "models.json").read_text())["aca-face-64"]["sha256"] == entry["sha256"]


def test_cli_eval_prints_the_metrics(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from engine.cli import register
    from engine.model.vid2vid import ACAVid2Vid
    from engine.runtime.checkpoint import random_model, save_checkpoint

    model: ACAVid2Vid = random_model("tiny").model
    save_checkpoint(tmp_path / "m.pt", model)
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "m.pt"), "--identities", "1", "--frames", "12",
                                   "--refs", "select", "--threads", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["refs"] == "select" and summary["frames"] == 9 and 0 < summary["ssim"] < 1
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "m.pt"), "--identities", "1", "--frames", "12",
                                   "--inception", str(tmp_path / "missing.pt")])
    assert res.exit_code != 0  # typer refuses a weights file that does not exist
