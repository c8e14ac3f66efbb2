"""DPO (baseline or backtracking pairs) from an SFT checkpoint as a Ray Train job with DeepSpeed.

Run as:
    python jobs/dpo.py --config jobs/configs/dpo_tiny_demo.yaml [dotted.key=value ...]
    bt-ray dpo --config jobs/configs/dpo_tiny_demo.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/dpo.py --config jobs/configs/dpo_tiny_demo.yaml

``model.name`` is the SFT model's HF directory: DPO starts from it and uses it as the reference
(kept as a frozen copy, or only its log-probs with ``dpo.precompute_ref_log_probs=true``). The driver
checks the config (SFT checkpoint present, batch split, precision, GPUs), builds or reads the pairs,
opens the MLflow run, then a TorchTrainer runs ``bt_ray.train.loop.train_loop_per_worker`` on
``scaling.num_workers`` workers. Outputs go to ``<run.root>/<run.name>/`` as for SFT: Ray's
checkpoints, ``model/``, ``config.yaml``, ``metrics.jsonl`` and ``summary.json``. Running the same
command again resumes from the latest checkpoint; a finished run says so and exits.
"""

from __future__ import annotations

import argparse
import json
import time

from bt_ray import config
from bt_ray.train.config import DPOJobCfg

STAGE = "dpo"


def parse_args(argv=None) -> DPOJobCfg:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (DPOJobCfg)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.learning_rate=1e-5")
    args = parser.parse_args(argv)
    return config.load(DPOJobCfg, args.config, args.overrides)


def main(cfg: DPOJobCfg) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bt_ray.tracking import StageRun, resolve_tracking_uri
    from bt_ray.train import driver
    from bt_ray.train.loop import make_loop_config, train_loop_per_worker

    # ---- 1. checks that need no cluster: a bad config fails here, before anything starts
    plan = driver.preflight(cfg)
    run_dir = driver.run_dir_of(cfg)
    driver.check_resumable(cfg, run_dir)  # same config as the run dir's, or an error
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"== bt-ray {STAGE} -> {run_dir}\n   {plan}")

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
        tracking = StageRun(uri, cfg.mlflow.experiment, run_dir, cfg.run.name)
        tracking.log_config(config.to_dict(cfg), config_path, {
            "stage": STAGE, "recipe": cfg.data.recipe, "model": cfg.model.name, "git_sha": git_sha,
        })
        mlflow_info = {"tracking_uri": uri, "run_id": tracking.run_id}
        print(f"   MLflow run {tracking.run_id} in {uri}{' (reopened)' if tracking.resumed else ''}")

    # ---- 5. the Ray Train job
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
    keep_by_loss = cfg.run.keep_by == "loss"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=make_loop_config(STAGE, cfg, ray.put(rows), run_dir, mlflow_info, git_sha),
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
        "stage": STAGE,
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


if __name__ == "__main__":
    main(parse_args())
