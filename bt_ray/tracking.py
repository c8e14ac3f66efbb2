"""MLflow for every bt-ray job: the one place that knows the store, experiments, runs and their lineage.

Who logs what:

* a training stage's driver (``StageRun``) creates or reopens the stage's run, logs the flattened
  resolved config as params (capped to MLflow's limits), the tags (stage, recipe, model, git sha, and
  ``lineage_tags`` of the model it starts from), the config as an artifact, and at the end the final
  model's location and the status (FINISHED, or FAILED when the stage dies);
* rank 0 of the training workers logs per-step metrics into that run (``log_metrics``), given the
  run id the driver passed down. Worker restarts reuse the id, so no duplicate runs appear. The run
  id is also written into every checkpoint's ``bt_ray.json``, so the model dir names the run that
  made it;
* the eval job opens one run per model (``Run.start``; children of one parent run when there are
  several), each tagged with ``lineage_tags`` of its model: the model dir, and the training run and
  git sha its ``bt_ray.json`` records.

Store (``resolve_tracking_uri``): the config's URI, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<run root>/mlflow.db``. A local store's experiment gets an explicit artifact location
under the run root: without one, artifacts go to ``./mlruns`` of whichever process logs them (for
Ray workers, Ray's temporary session dir).

Everything goes through ``MlflowClient`` with explicit run ids, never the fluent API's process-global
"active run": Ray workers, the demo (several jobs in one process) and nested eval runs then cannot
log into the wrong run. One client per store and process (``client``).

A stage's run id is kept in ``<run dir>/mlflow_run_id``: restarting a stage from its run dir reopens
the same run.
"""

from __future__ import annotations

import functools
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
# Lineage tags of a run that uses a model (``lineage_tags``).
TAG_MODEL_DIR = "lineage.model_dir"
TAG_MODEL_STAGE = "lineage.model_stage"
TAG_MODEL_GIT_SHA = "lineage.model_git_sha"
TAG_TRAIN_RUN_ID = "lineage.train_run_id"
TAG_TRAIN_TRACKING_URI = "lineage.train_tracking_uri"


# ---------------------------------------------------------------- store and experiments


def resolve_tracking_uri(configured: str | None, run_root: str | Path) -> str:
    """The store URI: the config's, else ``$MLFLOW_TRACKING_URI``, else sqlite under the run root."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"


def use_one_store(run_root: str | Path) -> str:
    """Point every later job of this process, and the processes it starts, at one store; returns it.

    ``$MLFLOW_TRACKING_URI`` if set (an explicit setting wins), else sqlite under ``run_root``, which
    becomes ``$MLFLOW_TRACKING_URI``. The demo uses it so that the UI shows all its stages side by side.
    """
    uri = resolve_tracking_uri(None, run_root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@functools.cache
def client(tracking_uri: str):
    """This process's ``MlflowClient`` for ``tracking_uri`` (rank 0 logs every step through one client)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str, artifact_dir: str | Path) -> str:
    """The experiment ``name``, created if missing; on a local store its artifacts go to ``artifact_dir``.

    A server's store keeps its own artifact root (a local path would be unreadable elsewhere).
    """
    found = client(tracking_uri).get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if tracking_uri.startswith(("sqlite:", "file:")):
        artifact_location = Path(artifact_dir).resolve().as_uri()
    return client(tracking_uri).create_experiment(name, artifact_location=artifact_location)


def cap_params(flat: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow accepts them: string values and keys cut to MLflow's length limits."""
    out = {}
    for key, value in flat.items():
        text = "null" if value is None else str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
        out[str(key)[:MAX_PARAM_KEY_LENGTH]] = text
    return out


# ---------------------------------------------------------------- runs


class Run:
    """One MLflow run, addressed by id. As a context manager it ends FINISHED, or FAILED on an exception.

    Args:
        tracking_uri: store URI (see ``resolve_tracking_uri``).
        run_id: an existing run's id.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = client(tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str, artifact_dir: str | Path,
              parent: Run | None = None, tags: dict[str, Any] | None = None) -> Run:
        """A new run in ``experiment`` (created with ``artifact_dir``), a child of ``parent`` if given.

        The run carries MLflow's context tags (user, source, git commit), as ``mlflow.start_run`` adds.
        """
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent is not None:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent.run_id
        exp_id = experiment_id(tracking_uri, experiment, artifact_dir)
        created = client(tracking_uri).create_run(exp_id, run_name=run_name, tags=resolve_tags(all_tags))
        return cls(tracking_uri, created.info.run_id)

    def log_params(self, params: dict[str, Any], skip_logged: bool = False) -> None:
        """Params capped to MLflow's limits. ``skip_logged``: keep the values a reopened run already has
        (MLflow rejects re-logging a param with a new value)."""
        from mlflow.entities import Param

        capped = cap_params(params)
        logged = self._client.get_run(self.run_id).data.params if skip_logged else {}
        new = [Param(k, v) for k, v in capped.items() if k not in logged]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i: i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(self.tracking_uri, self.run_id, metrics, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FINISHED" if exc_type is None else "FAILED")


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


class StageRun(Run):
    """The driver's handle on one training stage's MLflow run: created once, reopened on restart.

    Args:
        tracking_uri: store URI (see ``resolve_tracking_uri``).
        experiment: experiment name; its artifacts go under ``<run root>/mlartifacts/<experiment>``.
        run_dir: the stage's run dir; holds the run id so a restart reopens the same run.
        run_name: MLflow run name (the stage's run name).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_dir: str | Path, run_name: str):
        self.run_dir = Path(run_dir)
        id_file = self.run_dir / RUN_ID_FILE
        run = _reopenable(client(tracking_uri), id_file.read_text().strip()) if id_file.is_file() else None
        self.resumed = run is not None
        if run is not None:
            found = client(tracking_uri).get_experiment(run.info.experiment_id).name
            if found != experiment:  # MLflow cannot move a run; never log into an experiment not asked for
                raise ValueError(
                    f"{id_file} names MLflow run {run.info.run_id} in experiment {found!r}, but "
                    f"mlflow.experiment is {experiment!r}; keep {found!r} to resume, or choose another "
                    f"run.name to start over"
                )
            super().__init__(tracking_uri, run.info.run_id)
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            artifact_dir = self.run_dir.parent / "mlartifacts" / experiment
            created = Run.start(tracking_uri, experiment, run_name, artifact_dir)
            super().__init__(tracking_uri, created.run_id)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run_id + "\n")

    def log_config(self, resolved: dict, config_path: str | Path, tags: dict[str, str]) -> None:
        """Params (flattened, capped; a reopened run keeps its own), tags, the config file as an artifact."""
        from bt_ray.config import flatten

        self.log_params(flatten(resolved), skip_logged=True)
        self.set_tags(tags)
        self.log_artifact(config_path)


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numeric metrics at ``step`` into an existing run (training rank 0 calls it every log step)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    if batch:
        client(tracking_uri).log_batch(run_id, metrics=batch)


# ---------------------------------------------------------------- lineage


def lineage_tags(model_name: str) -> dict[str, str]:
    """Tags that tie a run to the model it uses: the model dir and what its ``bt_ray.json`` records.

    A local dir gives ``lineage.model_dir``; a bt-ray dir adds the stage and git sha that made it and,
    when the stage was tracked, that training run's id and store. A preset or hub id gives nothing.
    """
    from bt_ray.models import read_metadata

    path = Path(model_name).expanduser()
    if not path.is_dir():
        return {}
    tags = {TAG_MODEL_DIR: str(path.resolve())}
    meta = read_metadata(path)
    if meta is not None:
        recorded = {TAG_MODEL_STAGE: meta.get("stage"), TAG_MODEL_GIT_SHA: meta.get("git_sha"),
                    TAG_TRAIN_RUN_ID: meta.get("mlflow_run_id"),
                    TAG_TRAIN_TRACKING_URI: meta.get("mlflow_tracking_uri")}
        tags |= {k: str(v) for k, v in recorded.items() if v}
    return tags
