"""``aca serve`` and ``aca worker``: a Typer app that clients/cli.py mounts (``register(app)``), also runnable
as ``python -m server.cli``."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="ACA Avatar Server processes", no_args_is_help=True)


def _settings(**overrides: Any) -> Any:
    from server.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def serve(
    host: str = typer.Option(None, help="bind address (ACA_HOST)"),
    port: int = typer.Option(None, help="port (ACA_PORT)"),
    workers: int = typer.Option(None, help="in-process workers in embedded mode (ACA_WORKERS)"),
    data_dir: Path = typer.Option(None, help="data directory (ACA_DATA_DIR)"),
) -> None:
    """Run the API (uvicorn). Without ACA_REDIS_URL it also runs the workers in this process."""
    import uvicorn

    from server.app import create_app

    settings = _settings(host=host, port=port, workers=workers, data_dir=data_dir)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


@app.command()
def worker(
    data_dir: Path = typer.Option(None, help="data directory shared with the API (ACA_DATA_DIR)"),
    worker_id: str = typer.Option(None, help="consumer name (default host-pid)"),
) -> None:
    """Run one worker process against Redis (ACA_REDIS_URL): ingest and render jobs until SIGTERM/SIGINT."""
    from server.broker.base import make_broker
    from server.worker import Worker

    settings = _settings(data_dir=data_dir)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.embedded:
        typer.echo("aca worker needs ACA_REDIS_URL (embedded mode runs workers inside `aca serve`)", err=True)
        raise typer.Exit(2)
    broker = make_broker(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    w = Worker(settings, broker, worker_id=worker_id)
    try:
        w.run(stop)
    finally:
        broker.close()


def register(parent: typer.Typer) -> None:
    """Add ``serve`` and ``worker`` to another Typer app (the ``aca`` command in clients/cli.py)."""
    parent.command(name="serve")(serve)
    parent.command(name="worker")(worker)


if __name__ == "__main__":
    app()
