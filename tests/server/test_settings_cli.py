"""Settings come from the environment when asked (never at import), the CLI has its two commands, and an
embedded server queues unfinished work again after a restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import LiveServer, Media, make_settings, settle, upload

from server.settings import Settings, get_settings, hash_key

ROOT = Path(__file__).resolve().parents[2]


def test_settings_read_from_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ACA_API_KEYS", " alpha, beta ,,")
    monkeypatch.setenv("ACA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ACA_BATCH_SIZE", "3")
    s = get_settings()
    assert s.api_keys == ["alpha", "beta"] and s.data_dir == tmp_path and s.batch_size == 3 and s.embedded
    assert s.api_key_hashes() == {hash_key("alpha"), hash_key("beta")}
    monkeypatch.setenv("ACA_REDIS_URL", "redis://example:6379/1")
    assert not get_settings().embedded
    monkeypatch.setenv("ACA_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="batch_size"):
        get_settings()
    monkeypatch.delenv("ACA_BATCH_SIZE")
    limits = Settings(max_upload_bytes=1000, max_video_duration_s=2.5).decode_limits()
    assert limits.max_bytes == 1000 and limits.max_duration_s == 2.5


def test_cli_commands() -> None:
    help_text = subprocess.run([sys.executable, "-m", "server.cli", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60).stdout
    assert "serve" in help_text and "worker" in help_text
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "server.cli", "worker"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 2 and "ACA_REDIS_URL" in r.stderr


@pytest.mark.slow
def test_embedded_restart_requeues_unfinished_identities(tmp_path: Path, media: Media) -> None:
    with LiveServer(make_settings(tmp_path, workers=0)) as first, first.client() as c:
        iid = upload(c, media.reference).json()["id"]
        assert c.get(f"/v1/identities/{iid}").json()["status"] == "queued"
    with LiveServer(make_settings(tmp_path, workers=1)) as second, second.client() as c:
        assert settle(c, f"/v1/identities/{iid}")["status"] == "ready"


def test_workers_serve_the_shipped_model_unless_told_otherwise(tmp_path: Path) -> None:
    from engine.runtime.checkpoint import CheckpointError, shipped_model_path
    from server.worker import model_checkpoint

    assert model_checkpoint(Settings(data_dir=tmp_path)) == shipped_model_path()  # verified sha256 and config
    assert model_checkpoint(Settings(data_dir=tmp_path, preset="tiny")) is None  # a seeded random model
    mine = tmp_path / "mine.pt"
    assert model_checkpoint(Settings(data_dir=tmp_path, model_path=mine, preset="tiny")) == mine
    with pytest.raises(CheckpointError, match="unknown shipped model"):
        model_checkpoint(Settings(data_dir=tmp_path, model="no-such-model"))
