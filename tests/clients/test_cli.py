"""The ``aca`` command line: client commands against a real server, mounting of other packages' commands, and
``aca demo`` end to end."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from clients.cli import app, mount
from clients.demo import side_by_side

if TYPE_CHECKING:
    from tests.clients.conftest import Videos

runner = CliRunner()


def _names(module: str) -> set[str]:
    """The command names a package's ``register(app)`` adds."""
    scratch = typer.Typer()
    importlib.import_module(module).register(scratch)
    return {c.name or typer.main.get_command_name(c.callback.__name__) for c in scratch.registered_commands}


def test_help_lists_the_commands_of_every_package() -> None:
    group = typer.main.get_command(app)
    names = set(group.commands)  # type: ignore[attr-defined]
    assert {"upload", "identities", "render", "delete", "health", "demo"} <= names
    assert _names("engine.cli") - {"demo"} <= names
    if importlib.util.find_spec("export.cli") is not None:
        assert _names("export.cli") <= names
    if importlib.util.find_spec("server.cli") is not None:
        assert {"serve", "worker"} <= _names("server.cli") <= names
    # Ours, not the engine's provisional one, whatever the engine registers under that name.
    assert group.commands["demo"].callback.__module__ == "clients.cli"  # type: ignore[attr-defined]
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "upload" in result.output


def test_mount_adds_commands_but_keeps_our_own(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = types.ModuleType("aca_test_plugin")

    def register(target: typer.Typer) -> None:
        target.command("demo")(lambda: typer.echo("theirs"))
        target.command("extra")(lambda: typer.echo("extra"))

    plugin.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "aca_test_plugin", plugin)
    target = typer.Typer()
    target.command("demo")(lambda: typer.echo("ours"))
    assert mount(target, "aca_test_plugin") == ["extra"]
    assert runner.invoke(target, ["demo"]).output.strip() == "ours"
    assert runner.invoke(target, ["extra"]).output.strip() == "extra"
    # A package that is not installed adds nothing and breaks nothing.
    assert mount(target, "aca_no_such_package.cli") == []


def test_upload_identities_render(server_url: str, videos: Videos, tmp_path: Path) -> None:
    from engine.video import decode

    result = runner.invoke(app, ["upload", str(videos.reference), "--name", "cli", "--url", server_url])
    assert result.exit_code == 0, result.output
    identity_id = result.stdout.strip().splitlines()[-1]
    assert "ready" in result.stderr

    listing = runner.invoke(app, ["identities", "--url", server_url], terminal_width=200)
    assert listing.exit_code == 0 and identity_id in listing.stdout and "cli" in listing.stdout

    out = tmp_path / "cli.mp4"
    args = ["render", identity_id, str(videos.driving), "-o", str(out), "--url", server_url]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert len(decode(out).frames) == videos.driving_frames

    assert runner.invoke(app, ["delete", identity_id, "--url", server_url]).exit_code == 0
    listing = runner.invoke(app, ["identities", "--url", server_url], terminal_width=200)
    assert identity_id not in listing.stdout


def test_url_from_the_environment_and_errors_as_one_line(server_url: str, videos: Videos,
                                                         tmp_path: Path) -> None:
    result = runner.invoke(app, ["render", "no-such-id", str(videos.driving), "-o", str(tmp_path / "x.mp4")],
                           env={"ACA_URL": server_url})
    assert result.exit_code == 1
    assert "identity_not_found" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.mp4").exists()

    bad = runner.invoke(app, ["upload", str(videos.not_a_video), "--url", server_url])
    assert bad.exit_code == 1 and "invalid_video" in bad.stderr


def test_unreachable_server_says_how_to_start_one() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = runner.invoke(app, ["identities", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1 and "cannot reach" in result.stderr and "aca serve" in result.stderr


def test_health(server_url: str) -> None:
    result = runner.invoke(app, ["health", "--url", server_url])
    assert result.exit_code == 0, result.output
    assert "'ready': True" in result.stdout


def test_side_by_side_rows() -> None:
    driving = np.zeros((10, 96, 96, 3), np.uint8)
    driving[:, :, :, 0] = np.arange(10, dtype=np.uint8)[:, None, None] * 20  # frame index in the red channel
    output = np.full((5, 64, 64, 3), 200, np.uint8)
    grid = side_by_side(driving, output, rows=4)
    assert grid.shape == (4 * 96, 2 * 96, 3)
    # Row k shows driving frame int((k + 0.5) / 4 * 10): 1, 3, 6, 8.
    assert [int(grid[96 * k + 48, 48, 0]) for k in range(4)] == [20, 60, 120, 160]
    assert (grid[:, 96:] == 200).all()


def test_demo_end_to_end(tmp_path: Path) -> None:
    from PIL import Image

    from engine.video import decode

    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--size", "96"])
    assert result.exit_code == 0, result.output
    video, png = out / "out.mp4", out / "side_by_side.png"
    assert str(video) in result.stdout and str(png) in result.stdout
    frames = decode(video).frames
    driving = decode(out / "driving.mp4").frames
    assert len(frames) == len(driving)
    side = max(frames.shape[1], driving.shape[1])
    assert np.asarray(Image.open(png)).shape == (4 * side, 2 * side, 3)
