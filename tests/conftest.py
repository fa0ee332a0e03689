"""Shared fixtures: tiny random components (built once) and one smoke-config run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m fewstep ARGS`` in a fresh process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fewstep", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def tiny_pipe():
    from baselines.models import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke experiment run once (VAE, CLIP and teacher with tiny sizes); returns its run dir."""
    run_dir = tmp_path_factory.mktemp("smoke")
    result = run_cli("run", "configs/smoke.yaml", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir
