"""``ray job submit`` of jobs/sft.py then jobs/dpo.py against a local ``ray start --head`` cluster.

Slow: starts its own cluster (ports picked free, token auth disabled for the CLI) beside any
in-process test cluster, and runs two small jobs through the job server with ``--working-dir .``
(``.venv``, outputs and caches excluded: job working dirs are capped at 100 MiB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, stop_process_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXCLUDES = [".venv", ".git", ".cache", "outputs", ".pytest_cache", ".ruff_cache", "**/__pycache__"]
FAST = ["data.synthetic.num_train_pairs=32", "data.max_length=256", "optim.global_batch_size=8",
        "optim.micro_batch_size=2", "optim.max_steps=2", "run.save_steps=2", "model.tiny.num_layers=1"]


@pytest.fixture
def head_node():
    """``ray start --head --block`` in its own process group, stopped by signalling that group only.

    (``ray stop`` would stop every Ray process on the machine, other test sessions' included.) Its own
    short temp dir keeps ``ray.init()`` elsewhere from finding and joining this cluster.
    """
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "RAY_AUTH_MODE": "disabled"}
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="btrj-", dir="/tmp")
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=3",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the job server answers once the dashboard is up
            ok = subprocess.run([f"{bin_dir}/ray", "job", "list", "--address", address], env=env,
                                capture_output=True, timeout=60).returncode == 0
            if ok:
                break
            time.sleep(2)
        yield address, env
    finally:
        stop_process_group(head, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, script: str, args: list[str]) -> str:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           "--", "python", script, *args]
    deadline = time.time() + 180
    while True:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        # The job server can answer `ray job list` before the head's job agent is up; the server then
        # refuses the submission with "No available agent ... please try again later": do so.
        if proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout:
            break
        if time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout, proc.stdout[-4000:]
    return proc.stdout


def test_ray_job_submit_sft_then_dpo(head_node, tmp_path):
    address, env = head_node
    root = tmp_path / "runs"
    out = submit(address, env, "jobs/sft.py", ["--config", "jobs/configs/sft_tiny_demo.yaml", *FAST,
                                               f"run.root={root}", "run.name=sft-submit"])
    assert "== done" in out
    sft_model = root / "sft-submit" / "model"
    assert (sft_model / "model.safetensors").is_file()
    out = submit(address, env, "jobs/dpo.py", ["--config", "jobs/configs/dpo_tiny_demo.yaml",
                                               *FAST[:-1], f"model.name={sft_model}",
                                               f"run.root={root}", "run.name=dpo-submit"])
    assert "== done" in out
    summary = json.loads((root / "dpo-submit" / "summary.json").read_text())
    assert summary["global_step"] == 2 and Path(summary["model_dir"], "model.safetensors").is_file()
