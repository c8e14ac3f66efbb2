"""One training stage (SFT or DPO) from its config to its final model: the body of ``jobs/sft.py`` and
``jobs/dpo.py``.

The driver checks the config (batch split, precision, GPUs, for DPO the SFT checkpoint), builds or
reads the rows, opens the MLflow run, then a TorchTrainer runs ``bt_ray.train.loop.train_loop_per_worker``
on ``scaling.num_workers`` workers. Outputs go to ``<run.root>/<run.name>/``: Ray's checkpoints
(``checkpoint-<step>``, each an HF model dir plus DeepSpeed state), ``model/`` (the final HF model),
``config.yaml``, ``metrics.jsonl`` and ``summary.json``. Running the same config again resumes from the
latest checkpoint; a finished run says so and returns its summary.

The steps that are not the orchestration itself (checks, rows, resume state, export) are in
``bt_ray.train.driver``.
"""

from __future__ import annotations

import json
import time

from bt_ray import config
from bt_ray.train.config import JOB_CONFIGS, DPOJobCfg, SFTJobCfg


def stage_of(cfg: SFTJobCfg | DPOJobCfg) -> str:
    """``"sft"`` or ``"dpo"``: the stage a job config trains (its key in ``JOB_CONFIGS``)."""
    for stage, cls in JOB_CONFIGS.items():
        if isinstance(cfg, cls):
            return stage
    raise TypeError(f"not a training job config: {type(cfg).__name__}")


def run_stage(cfg: SFTJobCfg | DPOJobCfg) -> dict:
    """Train one stage on Ray Train (see the module docstring).

    Returns:
        The run's summary, also written to ``<run dir>/summary.json`` (a finished run's saved one).

    Raises:
        ValueError: a config problem found before the cluster starts (``driver.preflight``,
            ``driver.check_resumable``, the rows).
        RuntimeError: the cluster lacks the GPUs or CPUs the workers ask for.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bt_ray.tracking import StageRun, experiment_name, lineage_tags, resolve_tracking_uri
    from bt_ray.train import driver
    from bt_ray.train.loop import make_loop_config, train_loop_per_worker

    stage = stage_of(cfg)

    # ---- 1. checks that need no cluster: a bad config fails here, before anything starts
    plan = driver.preflight(cfg)
    run_dir = driver.run_dir_of(cfg)
    driver.check_resumable(cfg, run_dir)  # same config as the run dir's, or an error
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"== bt-ray {stage} -> {run_dir}\n   {plan}")

    # ---- 2. rows (deterministic order), and whether a previous run already finished
    rows = driver.load_rows(cfg, run_dir, plan)
    num_steps = driver.planned_steps(cfg, len(rows))
    done = driver.checkpoints(run_dir)
    if done and driver.checkpoint_step(done[-1]) >= num_steps and (run_dir / "model").is_dir():
        print(f"== nothing to do: {run_dir} already finished {num_steps} steps "
              f"(latest checkpoint {done[-1].name}); final model at {run_dir / 'model'}")
        summary_path = run_dir / "summary.json"
        return json.loads(summary_path.read_text()) if summary_path.is_file() else {"run_dir": str(run_dir)}
    if done:
        print(f"   resuming from {done[-1].name} (step {driver.checkpoint_step(done[-1])} of {num_steps})")

    # ---- 3. the cluster (connects to RAY_ADDRESS / a `ray start` cluster, else starts one here)
    if not ray.is_initialized():
        ray.init()
    driver.check_cluster(cfg)
    config_path = config.dump(cfg, run_dir / "config.yaml")
    git_sha = config.git_sha()

    # ---- 4. MLflow: one run per stage, reopened on restart
    tracking, mlflow_info = None, None
    if cfg.mlflow.enabled:
        uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.run.root)
        experiment = experiment_name(cfg.mlflow, "experiment", "mlflow.experiment")  # or the pipeline's
        tracking = StageRun(uri, experiment, run_dir, cfg.run.name)  # a child of the pipeline's run, if any
        tracking.log_config(config.to_dict(cfg), config_path, {
            "stage": stage, "recipe": cfg.data.recipe, "model": cfg.model.name, "git_sha": git_sha,
        } | lineage_tags(cfg.model.name))  # DPO: the SFT model dir and the run that trained it
        mlflow_info = {"tracking_uri": uri, "run_id": tracking.run_id}
        print(f"   MLflow run {tracking.run_id} in {uri}{' (reopened)' if tracking.resumed else ''}")

    # ---- 5. the Ray Train job
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
    keep_by_loss = cfg.run.keep_by == "loss"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=make_loop_config(stage, cfg, ray.put(rows), run_dir, mlflow_info, git_sha),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep,
                checkpoint_score_attribute="loss" if keep_by_loss else None,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": driver.worker_env()},
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException:
        if tracking is not None:
            tracking.end("FAILED")
        raise
    elapsed = time.perf_counter() - t0

    # ---- 6. the final model: the last checkpoint's HF files
    last = driver.checkpoints(run_dir)[-1]
    model_dir = driver.export_model(last, run_dir / "model")
    summary = {
        "stage": stage,
        "run_dir": str(run_dir),
        "config": str(config_path),
        "model_dir": str(model_dir),
        "checkpoint": str(last),
        "global_step": driver.checkpoint_step(last),
        "num_rows": len(rows),
        "batch": str(plan),
        "fit_seconds": round(elapsed, 1),
        "metrics": result.metrics,
        "mlflow_run_id": tracking.run_id if tracking else None,
        "mlflow_tracking_uri": mlflow_info["tracking_uri"] if mlflow_info else None,
        "git_sha": git_sha,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if tracking is not None:
        tracking.set_tags({"final_model": str(model_dir), "global_step": summary["global_step"]})
        tracking.log_artifact(run_dir / "summary.json")
        tracking.end("FINISHED")
    print(f"== done in {elapsed:.0f}s: model {model_dir}\n   summary {run_dir / 'summary.json'}")
    if tracking is not None:
        print(f"   MLflow: mlflow ui --backend-store-uri {mlflow_info['tracking_uri']}")
    return summary
