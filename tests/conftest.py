"""Shared fixtures. Tests never download: tiny models are built from config in code."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_datasets_dir() -> Path | None:
    """``$BT_RAY_DATA_DIR`` or ``../shared/datasets`` beside the repo, when present."""
    env = os.environ.get("BT_RAY_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "datasets"
    return path if path.is_dir() else None


def stop_process_group(proc, timeout: float = 30) -> None:
    """SIGTERM the process group a test started (``start_new_session=True``), SIGKILL it after ``timeout``."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (closed again when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = shared_datasets_dir()
    if path is None:
        pytest.skip("../shared/datasets not found: real-data tests need the shared datasets beside the repo")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny preset's tokenizer with [RESET] registered: ``(tokenizer, reset_info)``."""
    from bt_ray.models import ModelCfg, load_tokenizer

    return load_tokenizer(ModelCfg())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Presets convert into a per-session cache, never the user's home."""
    if "BT_RAY_CACHE" not in os.environ:
        monkeypatch.setenv("BT_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "bt-ray-cache"))
