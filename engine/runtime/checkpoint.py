"""Model checkpoints: the config and weights in one file, identified by the sha256 of its bytes.

A checkpoint is a ``torch.save`` of ``{"format", "config", "state_dict", "step", "meta"}``. Loading checks the format
and the config (unknown fields are refused), and, when the caller knows it (a model card), the sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig, preset
from engine.model.vid2vid import ACAVid2Vid

FORMAT = "aca.checkpoint.v1"


class CheckpointError(ValueError):
    """The file is not a checkpoint of this project, or not the one expected."""


@dataclass
class LoadedModel:
    model: ACAVid2Vid
    model_id: str  # "sha256:<hex>" of the checkpoint, or "random:<preset>:<seed>"
    step: int
    meta: dict[str, Any]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: Path, model: ACAVid2Vid, step: int = 0, meta: dict[str, Any] | None = None) -> str:
    """Write atomically (temp file + rename); return the sha256 of what was written."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {"format": FORMAT, "config": model.cfg.to_dict(), "state_dict": state, "step": step, "meta": meta or {}}, buf
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(buf.getvalue()).hexdigest()


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> LoadedModel:
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(f"{path}: sha256 {digest} does not match the expected {expected_sha256}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} file")
    cfg = ModelConfig.from_dict(data["config"])
    model = ACAVid2Vid(cfg)
    model.load_state_dict(data["state_dict"])
    return LoadedModel(model=model.eval(), model_id=f"sha256:{digest}", step=int(data["step"]), meta=data["meta"])


def random_model(preset_name: str = "tiny", seed: int = 0) -> LoadedModel:
    """A randomly initialised model of a preset, deterministic by seed (until a trained model is shipped)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ACAVid2Vid(preset(preset_name))
    return LoadedModel(model=model.eval(), model_id=f"random:{preset_name}:{seed}", step=0, meta={})


# ---------------------------------------------------------------------------------------------- shipped models

#: The shipped model the server uses by default (models/README.md is its model card).
DEFAULT_SHIPPED = "aca-face-64"
REGISTRY_FILE = "models.json"


def models_dir() -> Path:
    """models/ at the repository root (read when called, never at import)."""
    return Path(__file__).resolve().parents[2] / "models"


def shipped_models(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """The registry ``models/models.json``: name -> {"file", "sha256", "config", ...}."""
    import json

    path = (directory or models_dir()) / REGISTRY_FILE
    if not path.is_file():
        raise CheckpointError(f"no model registry at {path}")
    data: dict[str, dict[str, Any]] = json.loads(path.read_text())
    return data


def shipped_model_path(name: str = DEFAULT_SHIPPED, directory: Path | None = None) -> Path:
    """The verified path of a shipped model: its file exists, its sha256 and its config are the registry's.

    ``CheckpointError`` otherwise (a truncated download, an LFS pointer, a retrained file without a new card).
    """
    directory = directory or models_dir()
    registry = shipped_models(directory)
    if name not in registry:
        raise CheckpointError(f"unknown shipped model {name!r}; known: {sorted(registry)}")
    entry = registry[name]
    path = directory / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"shipped model {name!r} is missing: {path}")
    loaded = load_checkpoint(path, expected_sha256=entry["sha256"])
    if loaded.model.cfg.to_dict() != entry["config"]:
        raise CheckpointError(f"{path}: its config differs from the registry's entry for {name!r}")
    return path
