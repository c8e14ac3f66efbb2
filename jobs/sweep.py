"""Sweep an SFT or DPO job over a grid with Ray Tune, score each trial on a dev set, keep the best model.

Run as:
    python jobs/sweep.py --config jobs/configs/sweep_demo.yaml
    bt-ray sweep --config jobs/configs/sweep_paper_sft.yaml base_config=jobs/configs/sft_llama3_8b.yaml

Every trial is the base job config plus its grid point, trained by ``run_stage`` (Ray Train) in a Tune
function trial, then scored on a fixed dev subset by the evaluation pipeline's judge
(``bt_ray.tune.trial``). Outputs in <run_dir>: trials/<trial name>/ (each a training run dir),
results.csv (every trial once), heatmap.png (the selection metric over the grid), loss_curves.png
(training loss per trial), best/model (a link to the best trial's model, which the next stage reads)
and summary.json. MLflow: one parent run per sweep holding the CSV and PNGs; each trial's training
run is its child, with the dev metrics.

Bad input (an empty grid, an unknown grid name or field, a metric no trial reports, a trial that needs
more than the cluster has) fails before any trial starts. Restore: run the same command again; Tune
restores its experiment, finished trials report their saved scores without training, and MLflow runs
are reopened, not duplicated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bt_ray import config, tracking
from bt_ray.tune.config import SweepCfg
from bt_ray.tune.grid import expand, grid_of, trial_configs
from bt_ray.tune.report import format_table, heatmap, link_best, loss_curves, pick_best, results_table
from bt_ray.tune.resources import concurrency
from bt_ray.tune.trial import SCORE_FILE, run_trial


def parse_args(argv=None) -> SweepCfg:
    return config.parse_job_args(SweepCfg, __doc__, argv, example="grid=paper-sft")


def tuner_for(cfg: SweepCfg, plan: dict, names: list[str], max_concurrent: int):
    """A Tune Tuner over the trial names; the experiment at <run_dir>/tune is restored when it exists."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                                    {"CPU": 0, "memory": 100 * 1024 * 1024})  # STACK.md: Train V2 pattern
    path = Path(cfg.run_dir).resolve() / "tune"
    if tune.Tuner.can_restore(str(path)):
        print(f"-- restoring the Tune experiment at {path}")
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True)
    sel = cfg.selection
    scheduler = ASHAScheduler(metric=sel.metric, mode=sel.mode) if cfg.scheduler == "asha" else None
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(names)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler,
                                    trial_name_creator=lambda t: t.config["trial"],
                                    trial_dirname_creator=lambda t: t.config["trial"]),
        run_config=tune.RunConfig(name="tune", storage_path=str(path.parent)),
    )


def main(cfg: SweepCfg) -> dict:
    import ray

    from bt_ray.train.driver import worker_env

    run_dir = Path(cfg.run_dir).resolve()
    # ---- 1. every trial config, before anything starts (all problems at once)
    trials = expand(cfg)
    jobs, uri = trial_configs(cfg)
    params = list(grid_of(cfg)[0])
    print(f"== bt-ray sweep -> {run_dir}: {len(trials)} trials of {cfg.stage} ({cfg.grid}), "
          f"selecting on {cfg.selection.metric} ({cfg.selection.mode})")
    # ---- 2. the cluster, and how many trials fit at once
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False, runtime_env={"env_vars": worker_env()})
    max_concurrent = concurrency(cfg, jobs, ray.cluster_resources())  # or: a trial that cannot fit
    experiment = tracking.experiment_name(cfg, "mlflow_experiment")  # or the pipeline's (as trial_configs)
    print(f"-- {max_concurrent} trial(s) at once; MLflow store {uri}, experiment {experiment}")
    # ---- 3. the parent MLflow run (reopened on restore), then the trials
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.dump(cfg, run_dir / "config.yaml")
    tracking.experiment_id(uri, experiment, run_dir / "mlartifacts")  # artifacts in the sweep dir
    parent = tracking.StageRun(uri, experiment, run_dir, f"sweep:{run_dir.name}")
    parent.log_config(config.to_dict(cfg), config_path, {"stage": "sweep", "sweep.stage": cfg.stage,
                                                         "sweep.grid": cfg.grid, "git_sha": config.git_sha()})
    plan = {"stage": cfg.stage, "selection": config.to_dict(cfg.selection), "parent_run_id": parent.run_id,
            "cwd": os.getcwd(),
            "trials": {name: config.to_dict(job) for name, job in jobs.items()}}
    try:
        grid = tuner_for(cfg, plan, [t.name for t in trials], max_concurrent).fit()
        failed = [f"{r.config.get('trial')}: {r.error}" for r in grid if r.error is not None]
        if failed:
            raise RuntimeError("trials failed (rerun the same command to retry them):\n  "
                               + "\n  ".join(failed))
        # ---- 4. the table (each trial's saved score, once), the best trial, its model, the heatmap
        results = {}
        for t in trials:
            saved = Path(jobs[t.name].run.root) / t.name / SCORE_FILE
            if saved.is_file():
                results[t.name] = json.loads(saved.read_text())
        rows = results_table(trials, results, run_dir / "results.csv")
        best = pick_best(rows, cfg.selection.metric, cfg.selection.mode)
        link = link_best(best, run_dir / "best")
        png = heatmap(rows, params, cfg.selection.metric, run_dir / "heatmap.png", best["trial"])
        curves = loss_curves(rows, run_dir / "trials", run_dir / "loss_curves.png")
        table = format_table(rows, cfg.selection.metric, best["trial"])
        for path in (run_dir / "results.csv", png, curves, run_dir / "best" / "trial.json"):
            parent.log_artifact(path)
        parent.set_tags({"sweep.best_trial": best["trial"], "sweep.best_model": str(link)})
        parent.log_metrics({f"best.{k}": float(best[k]) for k in ("dev_unsafe_rate", "eval_loss")
                            if best.get(k) is not None})
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    summary = {"run_dir": str(run_dir), "stage": cfg.stage, "grid": cfg.grid, "metric": cfg.selection.metric,
               "mode": cfg.selection.mode, "best_trial": best["trial"], "best_model": str(link),
               "results": str(run_dir / "results.csv"), "heatmap": str(png), "loss_curves": str(curves),
               "table": table,
               "mlflow": {"tracking_uri": uri, "experiment": experiment,
                          "parent_run_id": parent.run_id}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"== best: {best['trial']} -> {link}\n   {run_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(parse_args())
