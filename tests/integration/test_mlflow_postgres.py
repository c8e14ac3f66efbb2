"""A tiny SFT and an eval of its model tracked to a shared MLflow server on PostgreSQL.

Slow: starts Debian's PostgreSQL (its binaries, on 127.0.0.1 with a temporary data dir and a free port)
and ``clusters/mlflow-server.sh`` against it with a temporary artifact dir, then runs ``jobs/sft.py`` and
``jobs/eval.py`` as subprocesses with only ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>`` pointing them
there, as a cluster's jobs are. It checks what landed, three ways: through ``MlflowClient`` against the
server, as rows in PostgreSQL's tables, and as files under the server's artifact dir (clients upload
through the server; nothing may fall back to a local ``mlruns``). Installs nothing: skipped where the
PostgreSQL binaries are absent (docs/operations-mlflow.md says how to install them). A fast test checks
the script's refusals of missing or bad settings.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.integration.conftest import EVAL_FAST as FAST_EVAL
from tests.integration.conftest import SFT_FAST

EVAL_FAST = [*FAST_EVAL, 'datasets=[{"name": "synthetic", "limit": 6}]']
DB_USER = "bt"


def postgres_bin_dir() -> Path | None:
    """The newest Debian ``/usr/lib/postgresql/<major>/bin``, else the dir of ``initdb`` on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                   if Path(p).parent.name.isdigit() else 0)
    candidates = [Path(p) for p in reversed(found)]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    for d in candidates:
        if all((d / name).is_file() for name in ("initdb", "postgres", "pg_ctl")):
            return d
    return None


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the process group ``proc`` leads (its children too), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} not written)"


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 with database ``mlflow``; yields ``(port, dsn of that database)``.

    PostgreSQL refuses to run as root, so as root (containers) it runs as the ``postgres`` user (or
    ``nobody``) in a /tmp dir that user owns; pytest's own tmp dirs are closed to other users.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, postgres, pg_ctl) not found in /usr/lib/postgresql/*/bin "
                    "or on PATH; install them (Debian: apt-get install postgresql), see "
                    "docs/operations-mlflow.md")
    user = None
    if os.geteuid() == 0:
        names = {p.pw_name for p in pwd.getpwall()}
        user = next((u for u in ("postgres", "nobody") if u in names), None)
        if user is None:
            pytest.skip("running as root with no 'postgres' or 'nobody' user to run PostgreSQL as")
    base = Path(tempfile.mkdtemp(prefix="btpg-", dir="/tmp"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    data, log = base / "data", base / "postgres.log"
    port = free_port()
    init = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust",
                           "--encoding=UTF8", "--locale=C", "--no-sync"],
                          user=user, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(base),
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            user=user, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import psycopg

        admin = f"postgresql://{DB_USER}@127.0.0.1:{port}/postgres"
        deadline = time.time() + 60
        while True:
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                    conn.execute("CREATE DATABASE mlflow")
                break
            except psycopg.OperationalError:
                assert server.poll() is None and time.time() < deadline, _tail(log)
                time.sleep(0.5)
        yield port, f"postgresql://{DB_USER}@127.0.0.1:{port}/mlflow"
    finally:
        _stop(server, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``clusters/mlflow-server.sh`` on 127.0.0.1 against ``postgres``; yields ``(URI, artifact dir)``."""
    _, dsn = postgres
    base = tmp_path_factory.mktemp("mlflow-server")
    artifacts, log = base / "artifacts", base / "server.log"
    port = free_port()
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "MLFLOW_BACKEND_STORE_URI": dsn.replace("postgresql://", "postgresql+psycopg://"),
           "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts), "MLFLOW_HOST": "127.0.0.1",
           "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as log_file:
        server = subprocess.Popen([str(REPO / "clusters" / "mlflow-server.sh")], env=env, cwd=base,
                                  stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"mlflow server exited {server.returncode}:\n{_tail(log)}"
            assert time.time() < deadline, f"mlflow server not answering after 180 s:\n{_tail(log)}"
            time.sleep(1)
        yield uri, artifacts
    finally:
        _stop(server)


def _job(script: str, args: list[str], uri: str, log: Path) -> None:
    """``python jobs/<script>`` in its own local Ray instance, told of ``uri`` by the environment only.

    ``RAY_ADDRESS=local``: a new Ray instance, never a ``ray start`` cluster another session left running.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": "local",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{_tail(log, 6000)}"


def test_server_script_names_every_missing_or_bad_variable(tmp_path):
    """The script refuses to start, exit 2, naming each required variable that is unset, and a bad port."""
    script = str(REPO / "clusters" / "mlflow-server.sh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "MLFLOW_BACKEND_STORE_URI" in proc.stderr and "MLFLOW_ARTIFACTS_DESTINATION" in proc.stderr
    env |= {"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db", "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path),
            "MLFLOW_PORT": "50000x"}
    proc = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "MLFLOW_PORT must be a port number in 1..65535; got '50000x'" in proc.stderr


def _artifact_files(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifact_files(client, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_sft_and_eval_track_to_a_postgres_backed_server(postgres, mlflow_server, tmp_path):
    import psycopg
    from mlflow import MlflowClient

    from bt_ray import tracking

    uri, artifact_root = mlflow_server
    root = tmp_path / "runs"
    _job("sft.py", ["--config", "jobs/configs/sft_tiny_demo.yaml", *SFT_FAST, f"run.root={root}",
                    "run.name=sft-pg", "mlflow.experiment=bt-ray-pg-sft"], uri, tmp_path / "sft.log")
    sft = json.loads((root / "sft-pg" / "summary.json").read_text())
    assert sft["mlflow_tracking_uri"] == uri and sft["global_step"] == 2
    model = Path(sft["model_dir"])
    eval_dir = tmp_path / "eval"
    _job("eval.py", ["--config", "jobs/configs/eval_tiny_synthetic.yaml", *EVAL_FAST, f"run_dir={eval_dir}",
                     f"models=[tiny, {model}]", "labels=[preset, sft]", "mlflow_experiment=bt-ray-pg-eval"],
         uri, tmp_path / "eval.log")
    ev = json.loads((eval_dir / "summary.json").read_text())
    assert ev["mlflow"]["tracking_uri"] == uri

    client = MlflowClient(tracking_uri=uri)
    # ---- the SFT run: FINISHED, its params, every logged step's loss as metrics.jsonl has it
    run = client.get_run(sft["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "bt-ray-pg-sft"
    assert run.data.params["optim.max_steps"] == "2" and run.data.tags["stage"] == "sft"
    assert run.data.tags["global_step"] == "2"
    logged = [json.loads(line) for line in (root / "sft-pg" / "metrics.jsonl").read_text().splitlines()]
    local_loss = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert set(local_loss) == {1, 2}
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(local_loss)
    # ---- the eval runs: a parent, one child per model; the SFT model's run names the SFT run
    eval_ids = {label: m["mlflow_run_id"] for label, m in ev["models"].items()}
    child = client.get_run(eval_ids["sft"])
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == ev["mlflow"]["parent_run_id"]
    assert child.data.tags[tracking.TAG_TRAIN_RUN_ID] == run.info.run_id
    assert child.data.tags[tracking.TAG_TRAIN_TRACKING_URI] == uri
    assert child.data.tags[tracking.TAG_MODEL_DIR] == str(model.resolve())
    assert child.data.tags[tracking.TAG_MODEL_STAGE] == "sft"
    assert tracking.TAG_TRAIN_RUN_ID not in client.get_run(eval_ids["preset"]).data.tags
    local_metrics = json.loads((eval_dir / "sft" / "metrics.json").read_text())
    assert child.data.metrics["synthetic.unsafe_rate"] == pytest.approx(
        local_metrics["datasets"]["synthetic"]["unsafe"]["rate"])

    # ---- artifacts: listed and downloaded through the server, byte for byte the jobs' files
    sft_files = {name: root / "sft-pg" / name for name in ("config.yaml", "summary.json")}
    eval_files = {"rows.jsonl": eval_dir / "sft" / "main" / "rows.jsonl",
                  "metrics.json": eval_dir / "sft" / "metrics.json", "config.yaml": eval_dir / "config.yaml"}
    for run_id, files in ((run.info.run_id, sft_files), (child.info.run_id, eval_files)):
        assert _artifact_files(client, run_id) == set(files)
        got = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl" / run_id))
        assert Path(got).read_bytes() == files["config.yaml"].read_bytes()
        # ... stored under the server's artifact destination, as mlflow-artifacts:/<exp>/<run>/artifacts
        artifact_uri = client.get_run(run_id).info.artifact_uri
        assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
        stored = artifact_root / artifact_uri.removeprefix("mlflow-artifacts:/").lstrip("/")
        for name, local in files.items():
            assert (stored / name).read_bytes() == local.read_bytes(), name
    # nothing fell back to a job-local store or artifact dir
    leftovers = [p for p in [root / "mlflow.db", root / "mlartifacts", eval_dir / "mlflow.db",
                             eval_dir / "mlflow-artifacts", REPO / "mlruns"] if p.exists()]
    assert not leftovers, leftovers

    # ---- the rows in PostgreSQL's tables
    _, dsn = postgres
    with psycopg.connect(dsn) as conn:
        runs = dict(conn.execute("SELECT run_uuid, status FROM runs").fetchall())
        steps = conn.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'loss'",
                             (run.info.run_id,)).fetchall()
        lineage = conn.execute("SELECT value FROM tags WHERE run_uuid = %s AND key = %s",
                               (child.info.run_id, tracking.TAG_TRAIN_RUN_ID)).fetchone()
        experiments = {name for (name,) in conn.execute("SELECT name FROM experiments").fetchall()}
    expected = {run.info.run_id, ev["mlflow"]["parent_run_id"], *eval_ids.values()}
    assert {k: runs.get(k) for k in expected} == dict.fromkeys(expected, "FINISHED")
    assert len(runs) == len(expected)  # no duplicate or stray runs
    assert dict(steps) == pytest.approx(local_loss)
    assert lineage == (run.info.run_id,)
    assert {"bt-ray-pg-sft", "bt-ray-pg-eval"} <= experiments
