"""MLflow tracking for bt-ray stages: one run per stage, the same run across Ray restarts.

Who logs what:

* the driver (``StageRun``) creates or reopens the run, logs the flattened resolved config as params
  (capped to MLflow's limits), the tags (stage, recipe, model, git sha), the config as an artifact,
  and at the end the final model's location and the status (FINISHED, or FAILED when the stage dies);
* rank 0 of the training workers logs per-step metrics into that run (``log_metrics``), given the
  run id the driver passed down. Worker restarts reuse the id, so no duplicate runs appear.

The run id is kept in ``<run dir>/mlflow_run_id``: restarting a stage from its run dir reopens the
same run. Default store: ``sqlite:///<run root>/mlflow.db`` with artifacts under
``<run root>/mlartifacts`` (an explicit artifact location: without one, artifacts logged from Ray
workers land in Ray's temporary session dir). ``MLFLOW_TRACKING_URI`` or the config point elsewhere.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"
# MLflow's limits (mlflow.utils.validation): 6000 characters per param value, 250 per key,
# 100 params per log_batch call.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAM_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100


def resolve_tracking_uri(configured: str | None, run_root: str | Path) -> str:
    """The store URI: the config's, else ``$MLFLOW_TRACKING_URI``, else sqlite under the run root."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"


def cap_params(flat: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow accepts them: string values and keys cut to MLflow's length limits."""
    out = {}
    for key, value in flat.items():
        text = "null" if value is None else str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
        out[str(key)[:MAX_PARAM_KEY_LENGTH]] = text
    return out


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, name: str, tracking_uri: str, run_root: Path) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:"):
        artifact_location = (run_root.resolve() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def _reopenable(client, run_id: str):
    """The run ``run_id`` if the store holds it live; None if the store does not know it or it was deleted.

    Only "does not exist" means "start a new run". Any other failure (a server that is down or answers
    500, a permission error) is raised: treating it as "not found" would create a duplicate run and
    overwrite the run id file, splitting one stage's history over two runs.
    """
    from mlflow.entities import LifecycleStage
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):  # the store was deleted or moved
            return None
        raise
    return None if run.info.lifecycle_stage == LifecycleStage.DELETED else run


class StageRun:
    """The driver's handle on one stage's MLflow run.

    Args:
        tracking_uri: store URI (see ``resolve_tracking_uri``).
        experiment: experiment name.
        run_dir: the stage's run dir; holds the run id so a restart reopens the same run.
        run_name: MLflow run name (the stage's run name).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_dir: str | Path, run_name: str):
        self.tracking_uri = tracking_uri
        self.run_dir = Path(run_dir)
        self._client = _client(tracking_uri)
        id_file = self.run_dir / RUN_ID_FILE
        self.resumed = False
        run = _reopenable(self._client, id_file.read_text().strip()) if id_file.is_file() else None
        run_id = None if run is None else run.info.run_id
        if run is not None:
            found = self._client.get_experiment(run.info.experiment_id).name
            if found != experiment:  # MLflow cannot move a run; never log into an experiment not asked for
                raise ValueError(
                    f"{id_file} names MLflow run {run_id} in experiment {found!r}, but mlflow.experiment is "
                    f"{experiment!r}; keep {found!r} to resume, or choose another run.name to start over"
                )
            self.resumed = True
        if run_id is None:
            experiment_id = _experiment_id(self._client, experiment, tracking_uri, self.run_dir.parent)
            run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_config(self, resolved: dict, config_path: str | Path, tags: dict[str, str]) -> None:
        """Params (flattened, capped), tags and the config file as an artifact."""
        from mlflow.entities import Param, RunTag

        from bt_ray.config import flatten

        params = cap_params(flatten(resolved))
        logged = self._client.get_run(self.run_id).data.params
        # A reopened run already has its params; MLflow rejects re-logging a param with a new value.
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i: i + MAX_PARAMS_PER_BATCH])
        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self._client.log_artifact(self.run_id, str(config_path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        self._client.set_terminated(self.run_id, status=status)


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numeric metrics at ``step`` into an existing run (called from training rank 0)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    if batch:
        _client(tracking_uri).log_batch(run_id, metrics=batch)
