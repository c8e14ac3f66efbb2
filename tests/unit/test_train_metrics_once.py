"""``MetricsCallback`` after a worker group restart: every step recorded once, in metrics.jsonl and MLflow.

A dead group logged steps past the checkpoint the next group resumes from; the next group trains them
again. metrics.jsonl is rolled back to the resumed step (a torn last line dropped too); MLflow, which
cannot delete a value, keeps each (key, step) it already holds.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bt_ray.train.callbacks import METRICS_FILE, MetricsCallback


def _group(run_dir, mlflow):
    """Rank 0's callback of a new worker group (as ``loop.py`` makes it)."""
    return MetricsCallback({"run_dir": str(run_dir), "mlflow": mlflow}, rank=0)


def _train(callback, start: int, stop: int, loss_of):
    state = SimpleNamespace(global_step=start, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    for step in range(start + 1, stop + 1):
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        callback.on_log(None, state, None, logs={"loss": loss_of(step), "learning_rate": 1e-3})


def test_restart_records_every_step_once(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    mlflow = {"tracking_uri": uri, "run_id": run_id}

    _train(_group(tmp_path, mlflow), 0, 4, lambda s: 10.0 - s)  # dies after logging step 4
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 5, "lo')  # torn by the kill
    _train(_group(tmp_path, mlflow), 2, 6, lambda s: 10.0 - s + 0.001)  # resumes from checkpoint 2

    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == pytest.approx([9, 8, 7.001, 6.001, 5.001, 4.001])  # redone: new
    for key in ("loss", "learning_rate", "tokens_per_second"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [1, 2, 3, 4, 5, 6], key
    losses = dict(sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")))
    assert losses == pytest.approx({1: 9, 2: 8, 3: 7, 4: 6, 5: 5.001, 6: 4.001})  # 3, 4: the first value kept


def test_fresh_run_without_mlflow_keeps_nothing_stale(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n')  # died before a checkpoint
    _train(_group(tmp_path, None), 0, 2, lambda s: 2.0)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [2.0, 2.0]
