"""The engine's sub-commands of the `aca` command line (clients/cli.py mounts them with ``register``)."""

from __future__ import annotations

import time
from pathlib import Path

import typer


def synthesize(
    reference: Path = typer.Argument(..., exists=True, dir_okay=False, help="reference video of the person"),
    driving: Path = typer.Argument(..., exists=True, dir_okay=False, help="driving video (any face)"),
    out: Path = typer.Option(Path("out.mp4"), "-o", "--out", help="where to write the mp4"),
    model: Path | None = typer.Option(None, help="checkpoint; default: a random model of --preset"),
    preset: str = typer.Option("tiny", help="model preset when no checkpoint is given"),
) -> None:
    """Drive REFERENCE's person with DRIVING's face, offline (no server): ingest, then render every frame."""
    from engine.runtime.identity import ingest_video
    from engine.runtime.synthesizer import FrameRequest, Synthesizer, driving_landmarks_from_video
    from engine.video import encode_mp4

    synth = Synthesizer.load(model, preset=preset)
    assets = ingest_video(reference, synth)
    typer.echo(f"identity: {assets.report.frames_used} frames with a face, {assets.n_refs} references")
    landmarks, fps = driving_landmarks_from_video(driving, size=synth.image_size)
    state = synth.new_stream()
    frames = []
    # One stream runs frame by frame: each frame needs the previous output (f_p). Workers batch across streams.
    for lm in landmarks:
        frames.append(synth.render([FrameRequest("cli", assets, lm, state)])[0].image)
    encode_mp4(frames, fps, path=out)
    typer.echo(f"wrote {len(frames)} frames to {out}")


def train(
    out: Path = typer.Option(Path("runs/face-64"), "-o", "--out", help="run directory (checkpoints, samples, curves)"),
    preset: str = typer.Option("face-64", help="model preset (engine/config.py)"),
    attention: str | None = typer.Option(None, help="'compact' (ACA) or 'pixel' (few-shot vid2vid); default: preset"),
    steps: int = typer.Option(3000, help="iterations; the lr decays linearly to 0 over them"),
    batch_size: int = typer.Option(4, "--batch-size", "-b"),
    lr: float = typer.Option(4e-4),
    seed: int = typer.Option(0),
    data: str = typer.Option("synthetic", help="'synthetic' or a folder of talking-head videos"),
    identities: int = typer.Option(300, help="synthetic training identities"),
    n_frames: int = typer.Option(2, "--frames", help="consecutive frames generated recurrently per sample"),
    vgg_weights: Path | None = typer.Option(None, exists=True, dir_okay=False,
                                            help="local torchvision vgg19 state dict for a perceptual loss"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint"),
    max_minutes: float | None = typer.Option(None, help="stop (and checkpoint) after this wall time"),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    sample_every: int = typer.Option(200),
    checkpoint_every: int = typer.Option(200),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Train ACA (or the pixel-wise baseline) on synthetic heads or real videos (paper 4.2)."""
    import torch

    from engine.train import MODEL_FILE, TrainConfig, Trainer

    if threads:
        torch.set_num_threads(threads)
    if resume:
        trainer = Trainer.resume(out, device=device)
        typer.echo(f"resuming {out} at step {trainer.step} of {trainer.tcfg.steps}")
    else:
        tcfg = TrainConfig(
            preset=preset, attention=attention, steps=steps, batch_size=batch_size, lr=lr, seed=seed, data=data,
            n_identities=identities, n_frames=n_frames, vgg_weights=str(vgg_weights) if vgg_weights else None,
            sample_every=sample_every, checkpoint_every=checkpoint_every, device=device,
        )
        trainer = Trainer(tcfg, out)
    start = time.monotonic()
    trainer.run(progress=progress, max_seconds=max_minutes * 60 if max_minutes else None)
    typer.echo(f"step {trainer.step}: {time.monotonic() - start:.0f} s; weights in {out / MODEL_FILE}")


def evaluate(
    model: Path | None = typer.Argument(None, help="checkpoint; default: the shipped model"),
    data: str = typer.Option("synthetic", help="'synthetic' (held-out identities) or a folder of videos"),
    identities: int = typer.Option(8, help="held-out synthetic identities"),
    frames: int = typer.Option(40, help="frames per synthetic test sequence (20% are its references)"),
    refs: str = typer.Option("random", help="'random' or 'select' (reference selection, paper 3.2)"),
    m: int | None = typer.Option(None, help="references per frame; default: the model's n_refs"),
    seed: int = typer.Option(0),
    inception: Path | None = typer.Option(None, exists=True, dir_okay=False,
                                          help="local Inception TorchScript (FID); never downloaded"),
    i3d: Path | None = typer.Option(None, exists=True, dir_okay=False,
                                    help="local I3D TorchScript (FVD); never downloaded"),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
) -> None:
    """PSNR, SSIM, temporal error (and FID / FVD with local weights) on held-out sequences (paper 4.2 protocol)."""
    import json

    import torch

    from engine.metrics import evaluate_model, test_source
    from engine.runtime.checkpoint import load_checkpoint, shipped_model_path

    if threads:
        torch.set_num_threads(threads)
    loaded = load_checkpoint(model if model is not None else shipped_model_path())
    source = test_source(data, loaded.model.cfg.image_size, identities, frames)
    result = evaluate_model(loaded.model, source, refs=refs, m=m, seed=seed, inception=inception, i3d=i3d)
    typer.echo(json.dumps(result.summary(), indent=2))


def register(app: typer.Typer) -> None:
    app.command("synthesize")(synthesize)
    app.command("train")(train)
    app.command("eval")(evaluate)
