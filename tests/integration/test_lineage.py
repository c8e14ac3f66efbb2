"""MLflow lineage through the real jobs: a tiny SFT (2 steps) and an eval of its model, run as
subprocesses with the environment ``jobs/pipeline.py`` exports (store, experiment, parent run) and
the experiment override its stages get (``bt_ray.pipeline.stages``), on one local sqlite store. The
eval's number walks through its tags to the SFT run that made its model; both nest under the
pipeline's run in its experiment; a rerun of the eval reuses its run instead of adding one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import EVAL_FAST as FAST_EVAL
from tests.integration.conftest import SFT_FAST

pytestmark = pytest.mark.integration

EVAL_FAST = [*FAST_EVAL, 'datasets=[{"name": "synthetic", "limit": 4}]']
EXPERIMENT = "bt-ray-pipeline-lineage"


def _job(script: str, args: list[str], env: dict, log: Path) -> None:
    """``python jobs/<script>`` in its own local Ray instance (``RAY_ADDRESS=local``)."""
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{log.read_text()[-6000:]}"


def test_an_eval_number_walks_to_the_sft_run_under_one_pipeline_run(tmp_path):
    from bt_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.Run.start(uri, EXPERIMENT, "pipeline:lineage", tmp_path / "mlartifacts")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, tracking.ENV_EXPERIMENT: EXPERIMENT,
           tracking.ENV_PARENT_RUN_ID: parent.run_id, "RAY_ADDRESS": "local",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    root = tmp_path / "runs"
    _job("sft.py", ["--config", "jobs/configs/sft_tiny_demo.yaml", *SFT_FAST, f"run.root={root}",
                    "run.name=sft-backtrack", f"mlflow.experiment={EXPERIMENT}"], env, tmp_path / "sft.log")
    sft = json.loads((root / "sft-backtrack" / "summary.json").read_text())
    eval_dir = tmp_path / "eval"
    eval_args = ["--config", "jobs/configs/eval_tiny_synthetic.yaml", *EVAL_FAST, f"run_dir={eval_dir}",
                 f"models=[{sft['model_dir']}]", "labels=[sft-backtrack]", f"mlflow_experiment={EXPERIMENT}"]
    _job("eval.py", eval_args, env, tmp_path / "eval.log")
    ev = json.loads((eval_dir / "summary.json").read_text())

    client = tracking.client(uri)
    number = client.get_run(ev["models"]["sft-backtrack"]["mlflow_run_id"])
    unsafe = json.loads((eval_dir / "sft-backtrack" / "metrics.json").read_text())
    assert number.data.metrics["synthetic.unsafe_rate"] == pytest.approx(
        unsafe["datasets"]["synthetic"]["unsafe"]["rate"])
    assert number.info.run_id != sft["mlflow_run_id"] and number.data.tags["stage"] == "eval"  # same name
    # the walk: eval run -> lineage.train_run_id -> the SFT run, whose final model is the eval's model
    trained = client.get_run(number.data.tags[tracking.TAG_TRAIN_RUN_ID])
    assert trained.info.run_id == sft["mlflow_run_id"] and trained.info.status == "FINISHED"
    assert trained.data.tags[tracking.TAG_FINAL_MODEL] == number.data.tags[tracking.TAG_MODEL_DIR]
    assert number.data.tags[tracking.TAG_MODEL_DIR] == str(Path(sft["model_dir"]).resolve())
    assert set(client.get_metric_history(trained.info.run_id, "loss")) and trained.data.tags["stage"] == "sft"
    # one experiment, both under the pipeline's run (one model: the eval has no parent of its own)
    for run in (number, trained):
        assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
        assert run.data.tags[tracking.TAG_PARENT_RUN_ID] == parent.run_id
    assert ev["mlflow"]["experiment"] == EXPERIMENT

    # a rerun of the eval stage reuses its run
    _job("eval.py", eval_args, env, tmp_path / "eval-again.log")
    again = json.loads((eval_dir / "summary.json").read_text())
    assert again["models"]["sft-backtrack"]["mlflow_run_id"] == number.info.run_id
    assert client.get_run(number.info.run_id).info.status == "FINISHED"
    runs = client.search_runs([number.info.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["pipeline:lineage", "sft-backtrack", "sft-backtrack"]
