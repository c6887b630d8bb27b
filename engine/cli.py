"""The engine's sub-commands of the `aca` command line (clients/cli.py mounts them with ``register``)."""

from __future__ import annotations

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


def register(app: typer.Typer) -> None:
    app.command("synthesize")(synthesize)
