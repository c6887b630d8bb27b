"""``aca export onnx|tensorrt``: clients/cli.py mounts this with ``register(app)``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from engine.model.vid2vid import ACAVid2Vid

export_app = typer.Typer(name="export", help="Export the model to ONNX or TensorRT.", no_args_is_help=True)

Checkpoint = Annotated[
    Path | None, typer.Option("--checkpoint", "-c", help="Model checkpoint; without it a seeded random model.")
]
Preset = Annotated[str, typer.Option(help="Preset of the random model when there is no checkpoint.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]


def _model(checkpoint: Path | None, preset: str, seed: int) -> ACAVid2Vid:
    from engine.runtime.checkpoint import load_checkpoint, random_model

    return (load_checkpoint(checkpoint) if checkpoint is not None else random_model(preset, seed)).model


@export_app.command("onnx")
def onnx_command(
    checkpoint: Checkpoint = None,
    preset: Preset = "face-128",
    seed: Annotated[int, typer.Option(help="Seed of the random model.")] = 0,
    out: Out = Path("out/onnx"),
    validate: Annotated[bool, typer.Option(help="Check the files and compare onnxruntime with torch.")] = True,
) -> None:
    """Export the encode, extract and frame graphs (compact attention as one aca.CompactAttention node)."""
    from export import onnx as onnx_export

    model = _model(checkpoint, preset, seed)
    paths = onnx_export.export_onnx(model, out)
    for graph, path in paths.items():
        typer.echo(f"{graph}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if validate:
        worst = onnx_export.validate(model, out)
        typer.echo("onnxruntime vs torch, max abs diff: " + ", ".join(f"{g} {d:.2e}" for g, d in worst.items()))


@export_app.command("tensorrt")
def tensorrt_command(
    checkpoint: Checkpoint = None,
    preset: Preset = "face-128",
    seed: Annotated[int, typer.Option(help="Seed of the random model.")] = 0,
    out: Out = Path("out/tensorrt"),
    batch: Annotated[list[int] | None, typer.Option(help="Batch buckets of the optimisation profiles.")] = None,
    fp16: Annotated[bool, typer.Option(help="Allow FP16 kernels (the plugin stays FP32).")] = True,
) -> None:
    """Build FP16 TensorRT engines with the compact-attention plugin (needs TensorRT and a CUDA GPU)."""
    from engine.runtime.tensorrt_backend import DEFAULT_BATCH_SIZES
    from export.tensorrt import export_tensorrt

    try:
        engines = export_tensorrt(_model(checkpoint, preset, seed), out, batch or DEFAULT_BATCH_SIZES, fp16=fp16)
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    for graph, path in engines.items():
        typer.echo(f"{graph}: {path}")


def register(app: typer.Typer) -> None:
    """Mount ``aca export`` on the main command line."""
    app.add_typer(export_app, name="export")
