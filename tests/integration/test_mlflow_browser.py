"""What a person looks at: the MLflow UI's run comparison of baseline vs backtracking, in a real browser.

A real eval job logs two models (baseline and backtracking labels) into a local store; ``mlflow server``
serves that store on 127.0.0.1; headless Chromium (Debian's ``chromium``) opens the compare-runs view
and must show the unsafe-rate metric and its value for each run, and a screenshot is taken. The one in
docs (``docs/img/mlflow-compare.png``, shown by docs/quickstart.md) is this view over the demo's own
store (``outputs/demo/mlflow.db``, its four eval runs under ``mlflow server``), taken with the same
Chromium flags as ``_chromium`` here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import REPO, free_port, stop_process_group
from tests.integration.conftest import EVAL_FAST

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
METRIC = "synthetic.unsafe_rate"


def _chromium(*args: str, timeout: int = 120) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--window-size=1600,1000", "--virtual-time-budget=30000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


@pytest.fixture
def mlflow_ui(tmp_path):
    """An eval of two labelled models in a sqlite store, served by ``mlflow server`` on 127.0.0.1."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "RAY_ADDRESS": "local"}
    env.pop("BT_RAY_PARENT_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    subprocess.run([sys.executable, "jobs/eval.py", "--config", "jobs/configs/eval_tiny_synthetic.yaml",
                    *EVAL_FAST, 'datasets=[{"name": "synthetic", "limit": 8}]',
                    f"run_dir={tmp_path / 'eval'}",
                    "models=[tiny, tiny]", "labels=[baseline-sft, backtrack-sft]",
                    "mlflow_experiment=bt-ray-browser"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not come up") from None
                time.sleep(1)
        yield url, store
    finally:
        stop_process_group(server)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_mlflow_compare_view_shows_the_unsafe_rate_of_baseline_and_backtracking(mlflow_ui, tmp_path):
    from mlflow.tracking import MlflowClient

    url, store = mlflow_ui
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("bt-ray-browser")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])
            if METRIC in r.data.metrics}
    assert set(runs) == {"baseline-sft", "backtrack-sft"}
    ids = [runs[name].info.run_id for name in ("baseline-sft", "backtrack-sft")]
    query = urllib.parse.urlencode({"runs": json.dumps(ids),
                                    "experiments": json.dumps([experiment.experiment_id])})
    page = f"{url}/#/compare-runs?{query}"

    dom = _chromium("--dump-dom", page)
    assert METRIC in dom, "the compare view does not list the unsafe-rate metric"
    for name, run in runs.items():
        assert name in dom, f"run {name} is not on the page"
        value = run.data.metrics[METRIC]
        assert any(text in dom for text in {f"{value}", f"{value:g}", f"{round(value, 4)}"}), (name, value)

    shot = tmp_path / "mlflow-compare.png"
    _chromium(f"--screenshot={shot}", page)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
