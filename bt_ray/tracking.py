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

Pipeline lineage (``jobs/pipeline.py`` runs the stage jobs in one process after exporting):

* ``$MLFLOW_EXPERIMENT_NAME``: the pipeline's experiment. Every job's experiment field goes through
  ``experiment_name``: the variable wins over a field left at its default; a field set to another
  value is an error naming both (a user's explicit choice is never silently overridden);
* ``$BT_RAY_PARENT_RUN_ID``: the pipeline's parent run. ``Run.start`` without a ``parent`` makes the
  run its child (so a training stage, an eval's or an attack's top run nest under the pipeline's run);
  the parent must live in the store and experiment the run goes to, else an error;
* ``Run.start(..., reuse_key=K)`` (eval and attack runs; K names the job's run dir and the run's
  role in it, e.g. ``eval:<run dir>:<label>``): the run under the same parent whose ``bt_ray.reuse_key``
  tag is K is reopened, not duplicated, so a crashed stage (its run FAILED) is rerun in the same run.
  A tag, not the run name: an eval's run is named after its model's label, which is often also the
  name of the training run beside it under the pipeline's run. A reopened run keeps the params it
  first logged (``log_params`` skips those it holds). Without a parent there is nothing to key on and
  a new run starts. Training reopens its run from the run id file instead; a reopened run keeps its
  parent tag.

Walking from a number to the run that made it: an eval or attack run's ``lineage.train_run_id`` is
the training run (``get_run``), whose ``final_model`` tag equals the eval's ``lineage.model_dir``; a DPO
run's own ``lineage.*`` tags name the SFT run it started from.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"
# What jobs/pipeline.py exports before it runs the stage jobs (see the module docstring).
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"
ENV_PARENT_RUN_ID = "BT_RAY_PARENT_RUN_ID"
TAG_PARENT_RUN_ID = "mlflow.parentRunId"
# A training run's final model dir (absolute): what ``lineage.model_dir`` of a run using it equals.
TAG_FINAL_MODEL = "final_model"
TAG_REUSE_KEY = "bt_ray.reuse_key"
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


def experiment_name(owner: Any, field_name: str, where: str | None = None) -> str:
    """The experiment a job logs into, from its config field ``owner.<field_name>`` and the pipeline's.

    Precedence: with ``$MLFLOW_EXPERIMENT_NAME`` set (the pipeline's experiment), it wins over a field
    left at its dataclass default (each job has its own default, e.g. ``bt-ray-eval``); a field set to
    the same name is fine; a field set to another name is an error naming both, since silently
    logging elsewhere than a user asked would be wrong either way. Without the variable: the field.

    Args:
        owner: the config dataclass holding the field (``cfg`` or ``cfg.mlflow``).
        field_name: the field (``mlflow_experiment``, ``experiment``).
        where: the field's dotted name for the error (default ``field_name``).

    Raises:
        ConfigError: the field is set, not to its default, and differs from the variable.
    """
    from bt_ray.config import ConfigError

    value = getattr(owner, field_name)
    env = os.environ.get(ENV_EXPERIMENT)
    if not env or value == env:
        return value
    default = next(f.default for f in dataclasses.fields(owner) if f.name == field_name)
    if value == default:
        return env
    raise ConfigError([f"{where or field_name}={value!r} disagrees with ${ENV_EXPERIMENT}={env!r} (the "
                       f"pipeline's experiment): leave {where or field_name} at its default ({default!r}) "
                       f"or set it to {env!r}, or unset ${ENV_EXPERIMENT}"])


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

    def __init__(self, tracking_uri: str, run_id: str, resumed: bool = False):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.resumed = resumed
        """True when the run was reopened (``start(reuse_key=...)``, a ``StageRun``'s restart)."""
        self._client = client(tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str, artifact_dir: str | Path,
              parent: Run | None = None, tags: dict[str, Any] | None = None,
              reuse_key: str | None = None) -> Run:
        """A run in ``experiment`` (created with ``artifact_dir``), a child of ``parent`` if given, else of
        ``$BT_RAY_PARENT_RUN_ID`` if set (the pipeline's run; it must be in this store and experiment).

        ``reuse_key``: reopen (status RUNNING again, tags updated) the oldest live run tagged with this
        key under the same parent instead of creating another; with no parent a new run starts. The run
        carries MLflow's context tags (user, source, git commit), as ``mlflow.start_run`` adds.

        Raises:
            ValueError: ``$BT_RAY_PARENT_RUN_ID`` names no run of this store, or one in another
                experiment (MLflow nests runs only within an experiment).
        """
        from mlflow.tracking.context.registry import resolve_tags

        exp_id = experiment_id(tracking_uri, experiment, artifact_dir)
        parent_id = parent.run_id if parent is not None else _env_parent(tracking_uri, exp_id, experiment)
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id is not None:
            all_tags[TAG_PARENT_RUN_ID] = parent_id
        if reuse_key is not None:
            all_tags[TAG_REUSE_KEY] = reuse_key
        if reuse_key is not None and parent_id is not None:
            found = _child_keyed(tracking_uri, exp_id, parent_id, reuse_key)
            if found is not None:
                run = cls(tracking_uri, found, resumed=True)
                run._client.update_run(found, status="RUNNING")
                run.set_tags(all_tags)
                return run
        created = client(tracking_uri).create_run(exp_id, run_name=run_name, tags=resolve_tags(all_tags))
        return cls(tracking_uri, created.info.run_id)

    def log_params(self, params: dict[str, Any], skip_logged: bool = False) -> None:
        """Params capped to MLflow's limits. ``skip_logged`` (always for a reused run): keep the values a
        reopened run already has (MLflow rejects re-logging a param with a new value)."""
        from mlflow.entities import Param

        capped = cap_params(params)
        logged = self._client.get_run(self.run_id).data.params if skip_logged or self.resumed else {}
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


def _env_parent(tracking_uri: str, exp_id: str, experiment: str) -> str | None:
    """``$BT_RAY_PARENT_RUN_ID`` checked: a live run of this store in experiment ``exp_id``; or None."""
    run_id = os.environ.get(ENV_PARENT_RUN_ID)
    if not run_id:
        return None
    run = _reopenable(client(tracking_uri), run_id)
    if run is None:
        raise ValueError(f"${ENV_PARENT_RUN_ID}={run_id} is not a live run of the MLflow store "
                         f"{tracking_uri} (set $MLFLOW_TRACKING_URI to the pipeline's store)")
    if run.info.experiment_id != exp_id:
        found = client(tracking_uri).get_experiment(run.info.experiment_id).name
        raise ValueError(f"${ENV_PARENT_RUN_ID}={run_id} is in experiment {found!r}, but this run goes to "
                         f"{experiment!r}; set ${ENV_EXPERIMENT}={found!r} (and leave the job's experiment "
                         f"at its default)")
    return run_id


def _child_keyed(tracking_uri: str, exp_id: str, parent_id: str, key: str) -> str | None:
    """The oldest live run tagged ``bt_ray.reuse_key`` = ``key`` whose parent is ``parent_id``, or None."""
    q = '"' if "'" in key else "'"  # MLflow's filter strings have no escapes
    found = client(tracking_uri).search_runs(
        [exp_id], filter_string=f"tags.`{TAG_PARENT_RUN_ID}` = '{parent_id}' and "
                                f"tags.`{TAG_REUSE_KEY}` = {q}{key}{q}",
        order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


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
        if run is not None:
            found = client(tracking_uri).get_experiment(run.info.experiment_id).name
            if found != experiment:  # MLflow cannot move a run; never log into an experiment not asked for
                raise ValueError(
                    f"{id_file} names MLflow run {run.info.run_id} in experiment {found!r}, but "
                    f"mlflow.experiment is {experiment!r}; keep {found!r} to resume, or choose another "
                    f"run.name to start over"
                )
            super().__init__(tracking_uri, run.info.run_id, resumed=True)
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


# ---------------------------------------------------------------- jobs over several models


@dataclasses.dataclass(frozen=True)
class ModelRuns:
    """The MLflow runs of a job that works on several models (eval, calibrate, attack).

    One run per model, tagged with the stage, the model and its ``lineage_tags``, under an optional
    parent run of the job; under the pipeline's run in a pipeline. Every run carries a reuse key made
    of ``key`` (the job's run dir and role), so a rerun in the same run dir reopens its runs instead
    of duplicating them.

    Attributes:
        tracking_uri: the store (``resolve_tracking_uri(None, run_dir)``).
        experiment: the job's experiment (``experiment_name(cfg, "mlflow_experiment")``).
        artifact_dir: ``<run dir>/mlflow-artifacts``.
        key: reuse key of the parent run; a model's run gets ``<key>:<label>``.
        tags: tags of every run (stage, git sha, and what the job adds).
        params: the flattened resolved config, logged by each model's run with its name and label.
    """

    tracking_uri: str
    experiment: str
    artifact_dir: Path
    key: str
    tags: dict[str, str]
    params: dict[str, str]

    @classmethod
    def of(cls, cfg: Any, run_dir: Path, stage: str, *, role: str = "", tags: dict[str, str] | None = None,
           params: dict[str, str] | None = None) -> ModelRuns:
        """The runs of ``cfg``'s job writing to ``run_dir``; ``role`` tells apart jobs sharing a run
        dir (an attack's kind); ``params`` are logged beside the config's. Prints where the store is."""
        from bt_ray import config

        uri = resolve_tracking_uri(None, run_dir)
        experiment = experiment_name(cfg, "mlflow_experiment")  # or the pipeline's
        print(f"-- MLflow store {uri}, experiment {experiment} (mlflow ui --backend-store-uri {uri})")
        key = f"{stage}:{Path(run_dir).resolve()}" + (f":{role}" if role else "")
        flat = {k: str(v)[:500] for k, v in config.flatten(config.to_dict(cfg)).items()}
        return cls(uri, experiment, Path(run_dir) / "mlflow-artifacts", key,
                   {"stage": stage, "git_sha": config.git_sha()} | (tags or {}), flat | (params or {}))

    def parent(self, run_name: str) -> Run:
        """The job's run, parent of the models' runs."""
        return Run.start(self.tracking_uri, self.experiment, run_name, self.artifact_dir, tags=self.tags,
                         reuse_key=self.key)

    def model(self, label: str, name: str, parent: Run | None, run_name: str | None = None) -> Run:
        """One model's run (named ``run_name``, else its label), a child of ``parent``."""
        return Run.start(self.tracking_uri, self.experiment, run_name or label, self.artifact_dir,
                         parent=parent, tags=self.tags | {"model": name} | lineage_tags(name),
                         reuse_key=f"{self.key}:{label}")

    def model_params(self, label: str, name: str) -> dict[str, str]:
        return self.params | {"model.name": name, "model.label": label}
