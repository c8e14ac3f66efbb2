"""A two-node Ray cluster on one machine loses its worker node during SFT; training finishes on the head.

Slow. The test starts its own cluster with ``ray start`` (ports picked free, its own short temp dir,
fast node health checks), never ``ray stop``: that would stop every Ray cluster on the machine.

* head: 1 CPU, and the job's driver and Train controller (0 CPUs); worker node: 2 CPUs;
* the job (``jobs/sft.py`` as a subprocess, ``RAY_ADDRESS`` of the head) trains with 1 worker of
  1 CPU, which fits on either node. Ray places a placement group's bundle on the node with the most
  room left after it (the head would have none left), so the worker starts on the worker node; the
  test checks that it did;
* once a checkpoint is committed and a later step logged, the worker node's raylet is SIGKILLed and
  then the rest of that node's processes (the machine is gone). The head marks the node dead, Ray
  Train restarts the worker group (``run.max_failures``), and the new worker, on the head, resumes
  from the latest committed checkpoint.

Checked: the run finishes; it resumed from the checkpoint committed when the node died; the
final checkpoint's history, ``metrics.jsonl`` and MLflow's metric history hold every step once, no
gap, no repeat; the steps trained again after the restart recompute the losses the dead worker logged.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 10
SAVE_STEPS = 2
JOB_TIMEOUT_S = 360
FAST = [
    "model.tiny.num_layers=1", "data.synthetic.num_train_pairs=64", "data.max_length=256",
    "optim.global_batch_size=8", "optim.micro_batch_size=4", f"optim.max_steps={STEPS}",
    "optim.learning_rate=3e-3", "optim.warmup_ratio=0", f"run.save_steps={SAVE_STEPS}",
    "run.num_to_keep=2", "run.max_failures=2", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
    "run.name=sft-multinode", "mlflow.experiment=test-multinode",
]
# GCS side: a node that stops answering is dead after ~3 missed checks 0.5 s apart (default ~15 s+).
FAST_HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _node_ports() -> list[str]:
    """Ports of one node's own servers, picked free (away from Ray's defaults other clusters use)."""
    base = random.randrange(20000, 30000, 100)  # the node's worker ports: a 100-port range
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--min-worker-port={base}", f"--max-worker-port={base + 99}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


class Cluster:
    """``ray start --block`` processes, each in its own process group, stopped by signalling those only."""

    def __init__(self, temp_dir: Path, env: dict):
        self.temp_dir, self.env = temp_dir, env
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        # Each node its own temp dir (short: Ray's socket paths are capped), or both nodes' log
        # monitors would tail the same worker logs and the driver would print every line twice.
        temp_dir = self.temp_dir / name
        temp_dir.mkdir()
        log = open(self.temp_dir / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
             f"--temp-dir={temp_dir}", *args, *_node_ports()],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def alive_nodes(self) -> dict[str, int]:
        """Node id -> node manager port of the nodes the GCS holds alive (no driver is connected)."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10)
        return {node_id.hex(): info.node_manager_port for node_id, info in infos.items()
                if info.state == GcsNodeInfo.ALIVE}

    def wait_nodes(self, n: int, timeout_s: float = 120) -> dict[str, int]:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                nodes = self.alive_nodes()
                if len(nodes) == n:
                    return nodes
            except Exception:  # the GCS is not up yet
                pass
            time.sleep(1)
        raise TimeoutError(f"{n} alive nodes expected in {timeout_s}s; see the logs in {self.temp_dir}")

    def stop(self) -> None:
        for proc in self.procs.values():
            _killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="btmn-", dir="/tmp"))
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "RAY_AUTH_MODE": "disabled", **FAST_HEALTH}
    env.pop("RAY_ADDRESS", None)
    c = Cluster(temp_dir, env)
    try:
        c.start("head", ["--head", f"--port={c.gcs_port}", "--num-cpus=1", "--include-dashboard=false",
                         f"--ray-client-server-port={free_port()}"])
        c.wait_nodes(1)
        c.start("worker", [f"--address={c.address}", "--num-cpus=2"])
        c.wait_nodes(2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _train_workers(pid: int) -> list[int]:
    """Ray Train worker processes under the ``ray start`` process ``pid`` (Ray titles them
    ``ray::RayTrainWorker...``)."""
    import psutil

    found = []
    for proc in _descendants(pid):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _committed_step(run_dir: Path) -> int | None:
    """Step of the latest checkpoint Ray's controller has committed (its snapshot file), or None."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        latest = snapshot["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or caught mid-write
        return None
    return int(latest["checkpoint_dir_name"].removeprefix("checkpoint-")) if latest else None


def _records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return records


def _remove_node(cluster: Cluster) -> None:
    """SIGKILL the worker node's raylet, then every other process of that node."""
    import psutil

    proc = cluster.procs["worker"]
    procs = _descendants(proc.pid)
    raylets = [p for p in procs if p.name() == "raylet"]
    assert len(raylets) == 1, [p.name() for p in procs]
    os.kill(raylets[0].pid, signal.SIGKILL)
    _killpg(proc.pid, signal.SIGKILL)
    for p in procs:  # any that left the process group
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)


def test_worker_node_lost_mid_sft_resumes_on_head_without_lost_or_repeated_steps(cluster, tmp_path):
    from mlflow import MlflowClient

    t0 = time.time()
    run_dir = tmp_path / "sft-multinode"
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "RAY_TRAIN_V2_ENABLED": "1"}
    for key in FAST_HEALTH:
        env.pop(key)
    log_path = tmp_path / "job.log"
    with log_path.open("w") as log:
        job = subprocess.Popen(
            [sys.executable, "jobs/sft.py", "--config", "jobs/configs/sft_tiny_demo.yaml", *FAST,
             f"run.root={tmp_path}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        # ---- wait for the worker (on the worker node) to commit a checkpoint and log a step past it
        worker_pid = cluster.procs["worker"].pid
        killed: dict = {}
        deadline = time.time() + JOB_TIMEOUT_S
        while time.time() < deadline and job.poll() is None:
            committed, records = _committed_step(run_dir), _records(run_dir / "metrics.jsonl")
            logged = max((r["step"] for r in records if "loss" in r), default=0)
            if committed and logged > committed:
                on_worker_node = _train_workers(worker_pid)
                head_workers = _train_workers(cluster.procs["head"].pid)
                assert on_worker_node and not head_workers, (
                    "the training worker did not start on the worker node", on_worker_node, head_workers)
                _remove_node(cluster)
                killed = {"committed": committed, "logged": logged, "at_s": round(time.time() - t0, 1),
                          "records": {r["step"]: r for r in records if "loss" in r}}
                break
            time.sleep(0.2)
        assert killed, ("the job ended or timed out before a checkpoint was committed:\n"
                        + log_path.read_text()[-3000:])
        cluster.wait_nodes(1, timeout_s=60)  # the head marked the worker node dead

        rc = job.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not finish in {JOB_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
    finally:
        _killpg(job.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert rc == 0 and "== done" in out, out[-4000:]
    wall = time.time() - t0

    # ---- resumed once, from the checkpoint committed when the node died (or one committed while it
    # died: a report already taken by the controller)
    resumed = sorted({int(s) for s in re.findall(r"resuming sft from \S+ at global step (\d+)", out)})
    assert len(resumed) == 1, out[-4000:]
    assert killed["committed"] <= resumed[0] <= killed["logged"], (killed, resumed)
    assert resumed[0] % SAVE_STEPS == 0, resumed
    print(f"\n[multinode] worker node killed at step {killed['logged']} (latest committed checkpoint: "
          f"step {killed['committed']}, {killed['at_s']}s in); resumed at step {resumed[0]} on the head; "
          f"job wall {wall:.0f}s")

    # ---- every step once: the final checkpoint's history, metrics.jsonl, MLflow
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == STEPS
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    history = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    assert sorted(history) == list(range(1, STEPS + 1))

    records = [r for r in _records(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    pids = list(dict.fromkeys(r["pid"] for r in records))
    assert len(pids) == 2, pids  # the dead worker, then the one on the head
    assert [r["step"] for r in records if r["pid"] == pids[1]][0] == resumed[0] + 1, records
    for r in records:
        assert math.isclose(r["loss"], history[r["step"]], rel_tol=1e-6), (r, history)

    client = MlflowClient(summary["mlflow_tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("test-multinode").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for key in ("loss", "grad_norm", "learning_rate"):
        steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key))
        assert steps == list(range(1, STEPS + 1)), (key, steps)

    # ---- continuity: steps the dead worker had logged past the checkpoint were trained again from
    # it and give the same losses (MLflow kept the first value, metrics.jsonl the redone one)
    redone = [s for s in killed["records"] if s > resumed[0]]
    mlflow_loss = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    for step in redone:
        assert math.isclose(killed["records"][step]["loss"], history[step], rel_tol=1e-4), step
        assert math.isclose(mlflow_loss[step], history[step], rel_tol=1e-4), step
    print(f"[multinode] steps trained twice (logged once): {redone}")
