"""Shared helpers: run a script as a user would (a subprocess in a scratch folder) and read its run folder."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One XLA compilation cache for every subprocess of the session: reruns of a configuration (determinism,
    save -> load) skip most of their compile time."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture
def run_script(tmp_path, compile_cache):
    def run(script, *flags, cwd=None, timeout=900):
        env = dict(
            os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compile_cache, WANDB_MODE="offline"
        )
        env["PYTHONPATH"] = str(ROOT)
        cmd = [sys.executable, str(ROOT / script), *map(str, flags)]
        return subprocess.run(
            cmd, cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )

    return run


def run_dirs(folder):
    runs = Path(folder) / "runs"
    return sorted(runs.iterdir()) if runs.exists() else []


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def read_summary(run_dir):
    with open(Path(run_dir) / "summary.json") as f:
        return json.load(f)
