"""MLflow tracking on a real local sqlite store: one run per stage, reused on retry, FAILED on crash."""

from __future__ import annotations

import socket

import pytest

from bt_ray.tracking import MAX_PARAM_VALUE_LENGTH, StageRun, cap_params, log_metrics, resolve_tracking_uri


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
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
