"""MLflow tracking on a real local sqlite store: one run per stage, reused on retry, FAILED on crash;
eval's parent and child runs; lineage tags from a model dir; one client per process."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from bt_ray import tracking
from bt_ray.tracking import MAX_PARAM_VALUE_LENGTH, StageRun, cap_params, log_metrics, resolve_tracking_uri
from tests.conftest import free_port


def test_params_are_capped_to_mlflow_limits():
    params = cap_params({"a.b": "x" * 10_000, "k" * 300: 1, "none": None, "list": [1, 2]})
    assert len(params["a.b"]) == MAX_PARAM_VALUE_LENGTH and params["a.b"].endswith("...")
    assert "k" * 250 in params and params["none"] == "null" and params["list"] == "[1, 2]"


def test_default_store_is_sqlite_under_the_run_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_stage_run_logs_reuses_its_id_and_fails(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None, tmp_path)
    run_dir = tmp_path / "sft-a"
    config_path = tmp_path / "config.yaml"
    config_path.write_text("optim:\n  learning_rate: 0.001\n")
    resolved = {"optim": {"learning_rate": 0.001, "global_batch_size": 8}, "long": "y" * 7000}

    first = StageRun(uri, "exp", run_dir, "sft-a")
    first.log_config(resolved, config_path, {"stage": "sft", "recipe": "backtrack-sft", "git_sha": "abc"})
    log_metrics(uri, first.run_id, {"loss": 2.0, "rewards/margins": 0.5}, step=1)
    first.end("FAILED")  # the stage died
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "FAILED"

    retry = StageRun(uri, "exp", run_dir, "sft-a")  # a retry reopens the same run
    assert retry.resumed and retry.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    retry.log_config(resolved, config_path, {"stage": "sft", "recipe": "backtrack-sft", "git_sha": "abc"})
    log_metrics(uri, retry.run_id, {"loss": 1.5}, step=2)
    retry.end()

    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.learning_rate"] == "0.001"
    assert len(run.data.params["long"]) == MAX_PARAM_VALUE_LENGTH
    assert run.data.tags["stage"] == "sft" and run.data.tags["git_sha"] == "abc"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    # Artifacts live under the run root, not in a temp dir of whichever process logged them.
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "exp").resolve().as_uri()
    assert (tmp_path / "mlartifacts" / "exp" / run.info.run_id / "artifacts" / "config.yaml").is_file()


def test_a_deleted_store_starts_a_new_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "r"
    first = StageRun(resolve_tracking_uri(None, tmp_path), "exp", run_dir, "r")
    other_root = tmp_path / "elsewhere"
    other_root.mkdir()
    second = StageRun(f"sqlite:///{other_root / 'mlflow.db'}", "exp", run_dir, "r")
    assert second.run_id != first.run_id and not second.resumed


def test_a_deleted_run_starts_a_new_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, run_dir = resolve_tracking_uri(None, tmp_path), tmp_path / "r"
    first = StageRun(uri, "exp", run_dir, "r")
    MlflowClient(uri).delete_run(first.run_id)
    second = StageRun(uri, "exp", run_dir, "r")
    assert second.run_id != first.run_id and not second.resumed
    assert (run_dir / "mlflow_run_id").read_text().strip() == second.run_id


def test_a_run_id_the_store_does_not_know_starts_a_new_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "mlflow_run_id").write_text("0" * 32 + "\n")
    run = StageRun(resolve_tracking_uri(None, tmp_path), "exp", run_dir, "r")
    assert not run.resumed and run.run_id != "0" * 32


def test_a_store_error_on_reopen_is_raised_not_taken_for_a_missing_run(tmp_path, monkeypatch):
    """Only "run does not exist" starts a new run; a failing store must not split a stage over two runs."""
    from mlflow.exceptions import MlflowException

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "r"
    first = StageRun(resolve_tracking_uri(None, tmp_path), "exp", run_dir, "r")
    id_file = run_dir / "mlflow_run_id"

    # A server that is down: the error is about reading the run, and nothing else is tried.
    closed_port = free_port()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(MlflowException, match="runs/get"):
        StageRun(f"http://127.0.0.1:{closed_port}", "exp", run_dir, "r")
    assert id_file.read_text().strip() == first.run_id

    # A store that rejects the id (here a corrupted id file) is an error, not a reason to start over.
    id_file.write_text("../x\n")
    with pytest.raises(MlflowException, match="Invalid value"):
        StageRun(resolve_tracking_uri(None, tmp_path), "exp", run_dir, "r")
    assert id_file.read_text() == "../x\n"


def test_a_resumed_run_refuses_a_changed_experiment(tmp_path, monkeypatch):
    """A reopened run stays in its experiment, so a new mlflow.experiment is refused, never ignored."""
    from bt_ray import config
    from bt_ray.train.config import SFTJobCfg
    from bt_ray.train.driver import check_resumable

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, run_dir = resolve_tracking_uri(None, tmp_path), tmp_path / "r"
    StageRun(uri, "exp", run_dir, "r")
    with pytest.raises(ValueError, match="in experiment 'exp', but mlflow.experiment is 'other'"):
        StageRun(uri, "other", run_dir, "r")

    config.dump(config.load(SFTJobCfg, None, ["mlflow.experiment=exp"]), run_dir / "config.yaml")
    with pytest.raises(ValueError, match="mlflow.experiment: 'exp' -> 'other'"):
        check_resumable(config.load(SFTJobCfg, None, ["mlflow.experiment=other"]), run_dir)


def test_one_store_for_a_demo_and_its_jobs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.use_one_store(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # the stages it runs resolve the same store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.use_one_store(tmp_path) == "http://mlflow:5000"  # an explicit setting wins


def test_log_metrics_reuses_one_client(tmp_path, monkeypatch):
    """Rank 0 logs every step: one MlflowClient per store and process, not one per call."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None, tmp_path)
    run = StageRun(uri, "exp", tmp_path / "r", "r")
    made = []
    real = mlflow.MlflowClient

    def counting(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    tracking.client.cache_clear()
    monkeypatch.setattr(mlflow, "MlflowClient", counting)
    for step in range(3):
        log_metrics(uri, run.run_id, {"loss": 1.0 / (step + 1)}, step=step)
    assert len(made) == 1
    assert [m.step for m in real(uri).get_metric_history(run.run_id, "loss")] == [0, 1, 2]


def _model_dir(path, **recorded):
    path.mkdir(parents=True)
    (path / "bt_ray.json").write_text(json.dumps({"config": {}, "reset_token": {"token": "[RESET]", "id": 9},
                                                  **recorded}))
    return path


def test_a_checkpoint_names_the_training_run_and_lineage_tags_read_it(tmp_path):
    """Training writes its MLflow run into bt_ray.json; a run using that model dir is tagged with it."""
    from bt_ray.train.callbacks import checkpoint_metadata

    loop_config = {"stage": "sft", "cfg": {"run": {"name": "a"}}, "git_sha": "abc",
                   "mlflow": {"tracking_uri": "sqlite:///m.db", "run_id": "f" * 32}}
    meta = checkpoint_metadata(loop_config, SimpleNamespace(global_step=4, max_steps=4))
    assert meta["mlflow_run_id"] == "f" * 32 and meta["mlflow_tracking_uri"] == "sqlite:///m.db"
    assert "mlflow_run_id" not in checkpoint_metadata(loop_config | {"mlflow": None},
                                                      SimpleNamespace(global_step=4, max_steps=4))
    model = _model_dir(tmp_path / "sft" / "model", **meta)
    assert tracking.lineage_tags(str(model)) == {
        tracking.TAG_MODEL_DIR: str(model.resolve()), tracking.TAG_MODEL_STAGE: "sft",
        tracking.TAG_MODEL_GIT_SHA: "abc", tracking.TAG_TRAIN_RUN_ID: "f" * 32,
        tracking.TAG_TRAIN_TRACKING_URI: "sqlite:///m.db",
    }
    # an untracked stage, a dir bt-ray did not write, a preset: what is known, nothing invented
    untracked = _model_dir(tmp_path / "untracked", stage="dpo", git_sha="def")
    assert tracking.TAG_TRAIN_RUN_ID not in tracking.lineage_tags(str(untracked))
    assert tracking.lineage_tags(str(untracked))[tracking.TAG_MODEL_GIT_SHA] == "def"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert tracking.lineage_tags(str(plain)) == {tracking.TAG_MODEL_DIR: str(plain.resolve())}
    assert tracking.lineage_tags("tiny") == {}


def test_parent_and_child_runs_end_failed_on_an_exception(tmp_path, monkeypatch):
    """Eval's shape: a parent run, one child per model; an exception marks both FAILED."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None, tmp_path)
    store = dict(tracking_uri=uri, experiment="eval", artifact_dir=tmp_path / "mlflow-artifacts")
    model = _model_dir(tmp_path / "model", stage="sft", git_sha="abc", mlflow_run_id="e" * 32)
    with tracking.Run.start(**store, run_name="eval:run", tags={"stage": "eval"}) as parent:
        with tracking.Run.start(**store, run_name="ok", parent=parent,
                                tags={"stage": "eval"} | tracking.lineage_tags(str(model))) as ok:
            ok.log_params({"model.name": str(model), "none": None})
            ok.log_metrics({"synthetic.unsafe_rate": 0.5})
            ok.log_artifact(model / "bt_ray.json")
    with pytest.raises(RuntimeError):
        with tracking.Run.start(**store, run_name="eval:run2") as parent2:
            with tracking.Run.start(**store, run_name="broken", parent=parent2) as broken:
                raise RuntimeError("engine died")

    client = MlflowClient(uri)
    done, child = client.get_run(parent.run_id), client.get_run(ok.run_id)
    assert done.info.status == child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.data.tags[tracking.TAG_TRAIN_RUN_ID] == "e" * 32
    assert child.data.tags[tracking.TAG_MODEL_DIR] == str(model.resolve())
    assert child.data.params == {"model.name": str(model), "none": "null"}
    assert child.data.metrics == {"synthetic.unsafe_rate": 0.5}
    assert client.get_run(broken.run_id).info.status == client.get_run(parent2.run_id).info.status == "FAILED"
    assert client.get_run(broken.run_id).data.tags["mlflow.parentRunId"] == parent2.run_id
    experiment = client.get_experiment_by_name("eval")
    assert experiment.artifact_location == (tmp_path / "mlflow-artifacts").resolve().as_uri()
    assert (tmp_path / "mlflow-artifacts" / ok.run_id / "artifacts" / "bt_ray.json").is_file()
