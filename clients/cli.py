"""The ``aca`` command line: one typer app to which each package adds its own sub-commands.

Client commands (HTTP only, through ``clients.client.AvatarClient``): ``aca upload``, ``aca identities``,
``aca render``, ``aca delete``, ``aca health``; they take ``--url`` (env ``ACA_URL``) and ``--api-key`` (env
``ACA_API_KEY``). ``aca demo`` (clients/demo.py) runs the whole product on this machine. The commands of
engine/cli.py, export/cli.py and server/cli.py (``aca serve``, ``aca worker``) are mounted through each
module's ``register(app)``; each is imported inside a function, so a package that is not installed leaves the
other commands working.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clients.client import DEFAULT_URL, AvatarClient, Identity, Render
from clients.errors import ApiConnectionError, ApiError

app = typer.Typer(
    name="aca",
    help="ACA Avatar Server: few-shot avatar synthesis with Adaptive Compact Attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err_console = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="ACA_URL", help="Base URL of the server.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="ACA_API_KEY", help="Bearer API key.",
                                            show_default=False)]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the job to finish.")]

T = TypeVar("T")


@contextmanager
def _client(url: str, api_key: str | None) -> Iterator[AvatarClient]:
    """A client whose errors end the command with a one-line message and exit code 1 (no traceback)."""
    try:
        with AvatarClient(url, api_key=api_key) as client:
            yield client
    except ApiConnectionError as e:
        err_console.print(f"[red]error:[/] cannot reach the server at {url} ({e.message}); "
                          "start one with `aca serve` or pass --url")
        raise typer.Exit(1) from e
    except ApiError as e:
        detail = f" {e.details}" if e.details else ""
        err_console.print(f"[red]error:[/] {e.code}: {e.message}{detail}")
        raise typer.Exit(1) from e


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=err_console,
                    transient=False)


def wait_identity(client: AvatarClient, identity_id: str, timeout: float) -> Identity:
    """``wait_ready`` with a progress bar (percent of the ingest)."""
    with _progress() as bar:
        task = bar.add_task("ingest", total=100, state="queued")

        def show(identity: Identity) -> None:
            bar.update(task, completed=round(100 * (identity.progress or 0.0)), state=identity.status)

        identity = client.wait_ready(identity_id, timeout=timeout, on_progress=show)
        bar.update(task, completed=100, state=identity.status)
    return identity


def wait_render(client: AvatarClient, render_id: str, timeout: float) -> Render:
    """``wait_render`` with a progress bar (frames done of frames total)."""
    with _progress() as bar:
        task = bar.add_task("render", total=None, state="queued")

        def show(render: Render) -> None:
            bar.update(task, total=render.frames_total or None, completed=render.frames_done,
                       state=render.state)

        return client.wait_render(render_id, timeout=timeout, on_progress=show)


def _describe(identity: Identity) -> str:
    used = "?" if identity.frames_used is None else identity.frames_used
    dropped = "?" if identity.frames_dropped is None else identity.frames_dropped
    return f"{identity.id} {identity.status} (frames used {used}, dropped {dropped})"


# ------------------------------------------------------------------------------------------- client commands


@app.command()
def upload(
    video: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Reference video of one face.")],
    name: Annotated[str | None, typer.Option(help="A name to list the identity by.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the identity is ready.")] = True,
    timeout: Timeout = 600.0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload a reference video; prints the new identity's id (and waits for its ingest)."""
    with _client(url, api_key) as client:
        identity = client.upload(video, name=name)
        err_console.print(f"uploaded {video} -> identity {identity.id}")
        if wait:
            identity = wait_identity(client, identity.id, timeout)
            err_console.print(_describe(identity))
    console.print(identity.id)


@app.command()
def identities(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the identities (of this API key)."""
    with _client(url, api_key) as client:
        items = client.identities()
    table = Table("id", "name", "status", "frames used", "dropped", "error")
    for i in items:
        table.add_row(i.id, i.name or "", i.status, _opt(i.frames_used), _opt(i.frames_dropped),
                      i.error.code if i.error else "")
    console.print(table)


def _opt(value: object) -> str:
    return "" if value is None else str(value)


@app.command()
def render(
    identity_id: Annotated[str, typer.Argument(help="Identity to drive.")],
    driving: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Driving video (any face).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the mp4.")] = Path("out.mp4"),
    timeout: Timeout = 1800.0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Render IDENTITY_ID driven by the DRIVING video into an mp4."""
    with _client(url, api_key) as client:
        job = client.render(identity_id, driving=driving)
        err_console.print(f"render {job.id} queued")
        done = wait_render(client, job.id, timeout)
        path = client.download_render(done.id, output)
    err_console.print(f"{done.frames_done} frames in {_total_s(done):.1f} s")
    console.print(str(path))


def _total_s(render: Render) -> float:
    return float(sum(v for v in render.timings.values() if isinstance(v, int | float)))


@app.command()
def delete(
    identity_id: Annotated[str, typer.Argument(help="Identity to delete.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete an identity and its files."""
    with _client(url, api_key) as client:
        client.delete_identity(identity_id)
    err_console.print(f"deleted {identity_id}")


@app.command()
def health(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Is the server alive, and ready (broker reachable, a worker alive)?"""
    with _client(url, api_key) as client:
        alive = client.health()
        ready = client.ready()
    console.print({"alive": alive, "ready": ready})
    if not ready:
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/demo"),
    workers: Annotated[int, typer.Option(min=1, help="In-process workers.")] = 1,
    size: Annotated[int, typer.Option(min=64, help="Side of the synthetic videos, pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the reference identity (seed + 1 drives it).")] = 0,
    preset: Annotated[str | None, typer.Option(help="Serve a randomly initialised model of this preset "
                                                    "(engine.config) instead of the shipped model.")] = None,
) -> None:
    """Run the whole service here: an in-process server (no Redis, no GPU), a synthetic reference video
    driven by another synthetic face, written to out/demo/out.mp4 with a side-by-side PNG."""
    from clients.demo import run_demo

    try:
        result = run_demo(out, workers=workers, size=size, seed=seed, console=err_console, preset=preset)
    except ApiError as e:
        err_console.print(f"[red]error:[/] {e.code}: {e.message}")
        raise typer.Exit(1) from e
    console.print(f"video:        {result.video}")
    console.print(f"side by side: {result.side_by_side}")


# --------------------------------------------------------------------------- sub-commands of other packages


def _command_name(callback: Callable[..., object] | None, name: str | None) -> str:
    if name:
        return name
    return typer.main.get_command_name(callback.__name__ if callback else "")


def mount(target: typer.Typer, module_name: str) -> list[str]:
    """Add the sub-commands of ``module_name`` to ``target``: those its ``register(app)`` function adds, or
    those of its typer ``app``. A command name that ``target`` has already stays ``target``'s (so
    ``clients/demo.py`` replaces the engine's provisional ``demo``). Returns the names added; none when the
    module is not installed."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only the module itself (or its package) missing is expected; a broken import inside it is a bug.
        if e.name is not None and module_name.startswith(e.name):
            return []
        raise
    register = getattr(module, "register", None)
    if callable(register):
        # Into a scratch app first, so that a name clash is resolved here instead of by click's registration
        # order.
        source = typer.Typer()
        register(source)
    elif isinstance(getattr(module, "app", None), typer.Typer):
        source = module.app
    else:
        return []
    taken = {_command_name(c.callback, c.name) for c in target.registered_commands}
    taken |= {g.name or "" for g in target.registered_groups}
    added = []
    for command in source.registered_commands:
        name = _command_name(command.callback, command.name)
        if name not in taken:
            target.registered_commands.append(command)
            added.append(name)
    for group in source.registered_groups:
        if group.name and group.name not in taken:
            target.registered_groups.append(group)
            added.append(group.name)
    return added


def _mount_packages() -> None:
    for module_name in ("engine.cli", "export.cli", "server.cli", "clients.live"):
        mount(app, module_name)


_mount_packages()


if __name__ == "__main__":  # python -m clients.cli; the console script calls app() directly
    app(prog_name="aca")
