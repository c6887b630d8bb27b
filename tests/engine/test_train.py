"""engine/train.py and engine/losses.py: the loss terms against hand-computed values, learning on a fixed batch,
seeded and resumable runs, the weights-only export, and ``aca train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import ClipSampler, SyntheticSequences
from engine.losses import (
    MultiscaleDiscriminator,
    VGGPerceptualLoss,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    landmark_flow_loss,
    mask_loss,
    sample_flow,
)
from engine.runtime.checkpoint import load_checkpoint
from engine.train import MODEL_FILE, STATE_FILE, TrainConfig, Trainer, linear_decay, plot_losses

TINY = {"preset": "tiny", "batch_size": 2, "n_identities": 2, "clips_per_identity": 1, "clip_frames": 8, "ndf": 8,
        "log_every": 1}


@pytest.fixture(scope="module")
def source() -> SyntheticSequences:
    return SyntheticSequences.train(2, 64, n_frames=8)


# ---------------------------------------------------------------------------------------------------- losses


def test_hinge_and_feature_matching_by_hand() -> None:
    real = [[torch.zeros(1, 2, 2, 2), torch.full((1, 1, 2, 2), 0.5)]]
    fake = [[torch.ones(1, 2, 2, 2), torch.full((1, 1, 2, 2), -2.0)]]
    # relu(1 - 0.5) + relu(1 + (-2)) = 0.5 + 0
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(2.0)
    assert feature_matching_loss(real, fake).item() == pytest.approx(1.0)  # |1 - 0| on the one inner layer


def test_discriminator_scales_and_features() -> None:
    D = MultiscaleDiscriminator(label_nc=3, ndf=8, n_layers=3, n_scales=2)
    outs = D(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    assert len(outs) == 2 and all(len(o) == 4 for o in outs)
    assert outs[1][-1].shape[-1] < outs[0][-1].shape[-1]  # the second scale sees a half-size input


def test_landmark_flow_loss_is_zero_for_the_true_flow() -> None:
    H = W = 32
    target = torch.tensor([[[5.0, 7.0], [20.0, 11.5], [31.0, 0.0], [40.0, 3.0]]])  # the last lies outside
    shift = torch.tensor([3.0, -2.0])
    flow = shift.view(1, 2, 1, 1).expand(1, 2, H, W).contiguous()  # a translation: source = target + shift
    assert torch.allclose(sample_flow(flow, target), shift.expand(1, 4, 2))
    assert landmark_flow_loss(flow, target, target + shift).item() == pytest.approx(0.0, abs=1e-6)
    # One pixel off in x at the 3 inside points: 2 / (W - 1) grid units each.
    assert landmark_flow_loss(flow, target, target + shift + torch.tensor([1.0, 0.0])).item() == pytest.approx(
        2 / 31, rel=1e-4)


def test_mask_loss_targets_the_warp_confidence() -> None:
    target = torch.zeros(1, 3, 2, 2)
    warped = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)  # good left, bad right
    ideal = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)  # generated image where the warp is bad
    assert mask_loss(ideal, warped, target).item() == 0.0
    assert mask_loss(1 - ideal, warped, target).item() == 1.0


def test_perceptual_loss_needs_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="VGG19 weights not found"):
        VGGPerceptualLoss(tmp_path / "vgg19.pth")


def test_linear_decay_reaches_zero() -> None:
    f = linear_decay(100)
    assert f(0) == 1.0 and f(50) == 0.5 and f(100) == 0.0 and f(150) == 0.0


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("attention", ["compact", "pixel"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(source: SyntheticSequences, attention: str) -> None:
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**TINY, attention=attention, steps=1000), source=source)
    batch = ClipSampler(source, m=3, seed=3).sample(2)
    first = trainer.train_step(batch)
    for _ in range(11):
        last = trainer.train_step(batch)
    for key in ("l1", "warp"):
        assert last[key] < 0.8 * first[key], (key, first[key], last[key])
    assert all(np.isfinite(v) for v in last.values())


def test_runs_are_seeded_and_resume_exactly(tmp_path: Path, source: SyntheticSequences) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(**TINY, steps=4, sample_every=2, checkpoint_every=2)
    straight = Trainer(cfg, tmp_path / "a", source=source)
    straight.run(progress=False)
    interrupted = Trainer(cfg, tmp_path / "b", source=source)
    interrupted.run(steps=2, progress=False)
    resumed = Trainer.resume(tmp_path / "b", source=source)
    assert resumed.step == 2 and len(resumed.history) == 2
    resumed.run(progress=False)
    assert resumed.step == 4
    for (name, a), (_, b) in zip(straight.G.state_dict().items(), resumed.G.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Files of a run: resumable state, weights-only model, history, samples and the loss curve.
    run = tmp_path / "b"
    for rel in (STATE_FILE, MODEL_FILE, "history.jsonl", "samples/step_000002.png", "samples/step_000004.png",
                "losses.png"):
        assert (run / rel).is_file(), rel
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["lr"] == pytest.approx(0.0)  # decayed linearly to zero at the last step


def test_exported_model_is_weights_only_and_round_trips(tmp_path: Path, source: SyntheticSequences) -> None:
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**TINY, steps=1), tmp_path, source=source)
    trainer.run(progress=False)
    state_bytes = (tmp_path / STATE_FILE).stat().st_size
    model_bytes = (tmp_path / MODEL_FILE).stat().st_size
    assert model_bytes < state_bytes / 2  # no optimiser moments, no discriminator
    loaded = load_checkpoint(tmp_path / MODEL_FILE)
    assert loaded.step == 1 and loaded.meta["train_config"]["preset"] == "tiny"
    batch = ClipSampler(source, m=3, seed=0).sample(1)
    trainer.G.eval()
    with torch.no_grad():
        args = (batch.labels[:, 0], batch.ref_images, batch.ref_labels)
        assert torch.equal(trainer.G(*args).image, loaded.model(*args).image)


def test_loss_plot_is_drawn(tmp_path: Path) -> None:
    from PIL import Image

    history = [{"step": float(s), "g_total": 10 / (s + 1), "l1": 1 / (s + 1), "d": 2.0} for s in range(30)]
    plot_losses(history, tmp_path / "l.png")
    img = np.asarray(Image.open(tmp_path / "l.png"))
    assert img.shape == (900, 720, 3) and (img < 128).any()


def test_cli_train_writes_a_run(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from engine.cli import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--out", str(out), "--preset", "tiny", "--steps", "2", "-b", "1",
                                   "--identities", "1", "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / MODEL_FILE).is_file() and load_checkpoint(out / MODEL_FILE).step == 2
