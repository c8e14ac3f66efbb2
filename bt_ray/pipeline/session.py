"""The process around the pipeline's stages: warnings a user cannot act on, the MLflow parent run, Ray,
and a training stage's progress."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from bt_ray import config, tracking
from bt_ray.pipeline.config import PipelineCfg
from bt_ray.pipeline.console import count_lines

PARENT_RUN_FILE = "pipeline_run_id"


def quiet(cfg: PipelineCfg) -> None:
    """Silence what a user cannot act on (here and in the Ray workers, which inherit the environment)."""
    if cfg.verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import logging

    import mlflow  # noqa: F401 - it sets its loggers up on import; quiet them after that

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # e.g. "Creating initial MLflow database tables"
    warnings.filterwarnings("ignore", message=".*gradient accumulation.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def parent_run(uri: str, cfg: PipelineCfg, run_dir: Path) -> tracking.Run:
    """The pipeline's MLflow parent run: reopened from stages/pipeline_run_id, else created."""
    id_file = run_dir / "stages" / PARENT_RUN_FILE
    if id_file.is_file():
        from mlflow.exceptions import MlflowException

        try:
            run = tracking.Run(uri, id_file.read_text().strip())
            run._client.update_run(run.run_id, status="RUNNING")
            return run
        except MlflowException:
            pass  # the store was moved or deleted: start a new parent run
    run = tracking.Run.start(uri, cfg.experiment, f"pipeline:{cfg.preset}", run_dir / "mlflow-artifacts",
                             tags={"stage": "pipeline", "preset": cfg.preset, "git_sha": config.git_sha()})
    run.log_params(config.flatten(config.to_dict(cfg)))
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.run_id + "\n")
    return run


def start_ray(cfg: PipelineCfg) -> None:
    """Ray for every stage: this process is the driver, so worker output reaches logs/<stage>.log."""
    import ray

    from bt_ray.train.driver import worker_env

    if not ray.is_initialized():
        local = not os.environ.get("RAY_ADDRESS")
        ray.init(num_cpus=cfg.ray_num_cpus if local else None, include_dashboard=False,
                 runtime_env={"env_vars": worker_env()})


def train_progress(job_cfg):
    """Logged steps of a training stage (metrics.jsonl grows a line per logged step)."""
    path = Path(job_cfg.run.root) / job_cfg.run.name / "metrics.jsonl"
    total = job_cfg.optim.max_steps if job_cfg.optim.max_steps > 0 else None
    return lambda: (count_lines(path), total)
