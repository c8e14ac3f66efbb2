"""Calibrate the [RESET] logit bias b: the largest b whose reset rate on a safe dev set meets a target.

Run as:
    python jobs/calibrate.py --config jobs/configs/calibrate_demo.yaml [dotted.key=value ...]
    bt-ray calibrate --config jobs/configs/calibrate_demo.yaml target_reset_rate=0.02

For each model: a bisection over b in [bias_low, bias_high], each probe one pass of the eval pipeline
(generate on an actor pool -> backtracking post-processing -> judge) over the dev set, every model's
probes of a round in one pipeline (``bt_ray.eval.calibrate``); then one pipeline over the harmful report
sets (and the dev set) at b=0 and at the chosen b. Written to run_dir: calibration.json (every probe:
b, reset rate, n; the chosen b and why the search stopped; unsafe rates per set and pooled at b=0 and
at b), calibration.png (the trade-off), each pass's rows and metrics under <label>/. One MLflow run
per model (children of one parent when there are several; FAILED if it raises), tagged with the model
dir and the training run that made it; the store is $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from bt_ray import config, tracking
from bt_ray.eval.calibrate import CalibrateCfg, calibrate, format_results, plot_calibration
from bt_ray.eval.engines import resolve_kind
from bt_ray.eval.pipeline import check_synthetic_world
from bt_ray.eval.report import flat_metrics
from bt_ray.models import model_labels


def parse_args(argv=None) -> CalibrateCfg:
    return config.parse_job_args(CalibrateCfg, __doc__, argv, example="target_reset_rate=0.02")


def point_metrics(prefix: str, point: dict | None) -> dict[str, float]:
    """Flat MLflow metrics of one ``point_summary`` (``b0.``/``chosen.`` prefixed; NaN when missing)."""
    if point is None:
        return {}
    out = {f"{prefix}.reset_bias": point["reset_bias"]}
    rates = {"dev_reset": point["dev_reset_rate"], "all_harmful.unsafe": point["all_harmful_unsafe"],
             "pooled.unsafe": point["pooled_unsafe"], "harmful_reset": point["harmful_reset_rate"]}
    rates |= {f"{name}.unsafe": r for name, r in point["unsafe"].items()}
    for name, r in rates.items():
        for k in ("rate", "ci_low", "ci_high", "num"):
            out[f"{prefix}.{name}_{k}"] = float("nan") if r is None else float(r[k])
    return out


def main(cfg: CalibrateCfg) -> dict:
    import ray

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.dump(cfg, run_dir / "config.yaml")
    engine = resolve_kind(cfg.engine.kind)
    print(f"== bt-ray calibrate -> {run_dir.resolve()} (engine {engine}); target reset rate "
          f"{cfg.target_reset_rate:g} on {', '.join(d.name for d in cfg.dev_datasets)}, b in "
          f"[{cfg.bias_low:g}, {cfg.bias_high:g}], tolerance {cfg.tolerance:g}, <= {cfg.max_evals} probes")
    labels = model_labels(cfg.models, cfg.labels)
    if any(d.name == "synthetic" for d in (*cfg.dev_datasets, *cfg.report_datasets)):
        for name in cfg.models:
            check_synthetic_world(name, cfg.synthetic)
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False)
    tracked = tracking.ModelRuns.of(cfg, run_dir, "calibrate", params={"engine.resolved": engine})
    with contextlib.ExitStack() as stack:
        parent = None
        if len(labels) > 1:
            parent = stack.enter_context(tracked.parent(f"calibrate:{run_dir.name}"))
        # One run per model, open during the search, so a failure marks them FAILED.
        runs = {label: stack.enter_context(tracked.model(label, name, parent))
                for label, name in zip(labels, cfg.models)}
        t0 = time.perf_counter()
        results = calibrate(cfg, labels)
        print(f"-- searched and reported in {time.perf_counter() - t0:.0f}s")
        summary = {"run_dir": str(run_dir), "config": str(config_path), "engine": engine,
                   "target_reset_rate": cfg.target_reset_rate, "bracket": [cfg.bias_low, cfg.bias_high],
                   "tolerance": cfg.tolerance, "max_evals": cfg.max_evals,
                   "dev_datasets": [config.to_dict(d) for d in cfg.dev_datasets],
                   "report_datasets": [config.to_dict(d) for d in cfg.report_datasets],
                   "models": results}
        png = plot_calibration(results, cfg.target_reset_rate, run_dir / "calibration.png")
        out = run_dir / "calibration.json"
        summary |= {"mlflow": {"tracking_uri": tracked.tracking_uri, "experiment": tracked.experiment,
                               "parent_run_id": parent.run_id if parent else None,
                               "run_ids": {label: run.run_id for label, run in runs.items()}},
                    "figures": [str(png)]}
        out.write_text(json.dumps(summary, indent=2))
        for label, run in runs.items():
            res = results[label]
            run.log_params(tracked.model_params(label, res["model"]))
            for i, p in enumerate(res["probes"]):  # sorted by b: the curve, step by step
                run.log_metrics({"probe.reset_bias": p["reset_bias"], "probe.dev_reset_rate": p["reset_rate"],
                                 "probe.num": p["num"]}, step=i)
            chosen = res["chosen_bias"]
            run.log_metrics({"chosen_bias": float("nan") if chosen is None else chosen,
                             "converged": float(res["converged"]), "num_probes": res["num_probes"]}
                            | point_metrics("b0", res["at_zero"]) | point_metrics("chosen", res["at_chosen"]))
            report = run_dir / label / ("report_chosen" if chosen is not None else "report_b0")
            run.log_metrics({f"report.{k}": v for k, v in
                             flat_metrics(json.loads((report / "metrics.json").read_text())).items()})
            run.set_tags({"chosen_bias": "none" if chosen is None else f"{chosen:+.4f}",
                          "status": res["status"]})
            for path in (out, png, config_path, report / "rows.jsonl"):
                run.log_artifact(path)
    print(format_results(results))
    print(f"== done: {out}")
    return summary


if __name__ == "__main__":
    main(parse_args())
