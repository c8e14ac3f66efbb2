"""``jobs/serve.py`` as a user runs it: its own Ray, ready when /v1/models answers, an answer to the openai
client, and a clean exit on SIGINT or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sig,to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-terminal-group", "sigterm-to-the-job"])
def test_serve_job_answers_then_exits_cleanly_on_a_signal(tmp_path, sig, to_group):
    """Ctrl-C reaches the terminal's whole process group (Ray's local processes too); SIGTERM comes from
    `kill PID`, Docker or Kubernetes, to the job's process. (SIGTERM to the whole group also stops it,
    but Ray's GCS dies first and the driver then exits with status 1.)"""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"BT_RAY_API_KEY": ""}
    # its own session and process group, like a terminal's foreground job: the signal reaches the
    # whole group (Ray's local processes too), as Ctrl-C does
    proc = subprocess.Popen(
        [sys.executable, "jobs/serve.py", "model.name=tiny", f"http.port={port}", "ray_num_cpus=2",
         "deployment.num_cpus=0.5", "decode.max_new_tokens=8"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops it" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready within 240 s"
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens == 8
        assert reply.choices[0].model_extra["backtracking"]["reset"] is False
        t0 = time.monotonic()
        os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 40
        assert "shutting down Serve" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_job_names_a_missing_demo_model_and_the_command_that_makes_it(tmp_path):
    out = subprocess.run([sys.executable, "jobs/serve.py", "--config", "jobs/configs/serve_demo.yaml",
                          f"model.name={tmp_path}/outputs/demo/runs/dpo-backtrack/model"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "model.name: no such model directory" in out.stderr and "make demo" in out.stderr


def test_serve_job_refuses_an_open_network_bind_without_a_key(tmp_path):
    env = {**os.environ, "BT_RAY_API_KEY": ""}
    out = subprocess.run([sys.executable, "jobs/serve.py", "model.name=tiny", "http.host=0.0.0.0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "http.host=0.0.0.0" in out.stderr and "BT_RAY_API_KEY" in out.stderr
