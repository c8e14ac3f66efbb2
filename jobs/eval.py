"""Evaluate one or more models: safety sets and the synthetic world through the backtracking decoder.

Run as:
    python jobs/eval.py --config jobs/configs/eval_tiny_synthetic.yaml [dotted.key=value ...]
    bt-ray eval --config jobs/configs/eval_tiny_synthetic.yaml models='[outputs/demo/sft, outputs/demo/dpo]'

For each model (a preset or an HF directory): the Ray Data pipeline (generate on an actor pool ->
backtracking post-processing -> judge) writes <run_dir>/<label>/main/rows.jsonl and metrics.json;
optional worst-of-k sampling and a [RESET] bias sweep add their own rows and a trade-off plot. One
MLflow run per model (children of one parent when there are several; FAILED if it raises) with
identical metric names, tagged with the model dir and the training run that made it
(``tracking.lineage_tags``); the store is $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
(``bt_ray.tracking``). summary.json ties it together,
with the paired, cluster-aware comparisons of the ``compare`` pairs (``report.compare_pairs``).

Before Ray starts, a model trained on a synthetic world with another train/eval split than
``synthetic`` is refused (``pipeline.check_synthetic_world``). A run with more error rows than
``max_error_fraction`` fails, naming the engine or judge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from bt_ray import config, tracking
from bt_ray.eval.config import EvalCfg
from bt_ray.eval.engines import resolve_kind
from bt_ray.eval.metrics import POOLED_SAFETY_SETS, worst_of_k
from bt_ray.eval.pipeline import Pass, check_synthetic_world, expand, load_items, run_passes, write_pass
from bt_ray.eval.report import (
    compare_pairs,
    flat_metrics,
    format_pairs,
    plot_sweep,
    side_by_side,
    sweep_point,
)
from bt_ray.models import model_labels


def parse_args(argv=None) -> EvalCfg:
    return config.parse_job_args(EvalCfg, __doc__, argv, example="decode.reset_bias=-5")


def labels_of(cfg: EvalCfg) -> list[str]:
    """Model names for tables and runs; also checks local model paths exist (before Ray starts)."""
    return model_labels(cfg.models, cfg.labels)


def passes_of(cfg: EvalCfg, labels: list[str], items: list[dict]) -> list[Pass]:
    """Every pass of the eval, model by model: the main table, worst-of-k samples, bias points.

    They all go through one pipeline (``run_passes``), so the generation actors start once, not once
    per model and pass.
    """
    passes = []
    harmful = [it for it in items if it["harmful"]]
    for label, name in zip(labels, cfg.models):
        model = dataclasses.replace(cfg.model, name=name)
        # ---- 1. main table: greedy (by default) through the backtracking decoder
        passes.append(Pass(f"{label}::main", model, cfg.decode, expand(items)))
        # ---- 2. worst-of-k under temperature sampling, harmful prompts only
        if cfg.worst_of_k:
            sampled = dataclasses.replace(cfg.decode, temperature=cfg.worst_of_k_temperature)
            passes.append(Pass(f"{label}::worst_of_k", model, sampled, expand(harmful, max(cfg.worst_of_k))))
        # ---- 3. [RESET] bias sweep: safety vs efficiency
        for b in cfg.bias_sweep:
            biased = dataclasses.replace(cfg.decode, reset_bias=b)
            passes.append(Pass(f"{label}::bias_{b:+g}", model, biased, expand(items)))
    return passes


def write_one(cfg: EvalCfg, label: str, name: str, out: Path, done: dict) -> tuple[dict, list[dict]]:
    """Write one model's passes (rows and metrics under ``out``); returns its metrics and bias sweep."""
    run = dict(where=f"model {name} ({cfg.engine.kind} engine)", max_error_fraction=cfg.max_error_fraction,
               num_resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)
    metrics = write_pass(*done[f"{label}::main"], out / "main", **run)
    if cfg.worst_of_k:
        rows, timing = done[f"{label}::worst_of_k"]
        write_pass(rows, timing, out / "worst_of_k", **run)
        metrics["worst_of_k"] = worst_of_k(rows, cfg.worst_of_k, num_resamples=cfg.bootstrap_resamples,
                                           seed=cfg.bootstrap_seed)
    sweep = []
    for b in cfg.bias_sweep:
        point_metrics = write_pass(*done[f"{label}::bias_{b:+g}"], out / f"bias_{b:+g}", **run)
        sweep.append(sweep_point(b, point_metrics))
    if sweep:
        metrics["bias_sweep"] = sweep
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics, sweep


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def compare_keys_of(cfg: EvalCfg, harmful: set[str] | None = None) -> list[str]:
    """``compare_keys``, or by default every dataset (of those in ``harmful``, the names with harmful
    rows, when given: a set of safe prompts only has no unsafe rate to compare), pooled (with 2+ pooled
    sets), every worst-of-K."""
    if cfg.compare_keys:
        return list(cfg.compare_keys)
    # XSTest's halves by their rows' names, as the metrics key them
    names = [n for n in cfg.row_datasets() if harmful is None or n in harmful]
    pooled = ["pooled"] if len(set(names) & set(POOLED_SAFETY_SETS)) > 1 else []
    return names + pooled + [f"worst-of-{k}" for k in cfg.worst_of_k]


def comparisons(cfg: EvalCfg, run_dir: Path) -> list[dict]:
    """The ``compare`` pairs from the rows files under ``run_dir`` (paired, cluster-aware)."""
    rows = {}
    for label in {label for pair in cfg.compare for label in pair}:
        rows[label] = {"main": read_rows(run_dir / label / "main" / "rows.jsonl")}
        if cfg.worst_of_k:
            rows[label]["worst_of_k"] = read_rows(run_dir / label / "worst_of_k" / "rows.jsonl")
    harmful = {r["dataset"] for by_pass in rows.values() for r in by_pass["main"] if r["harmful"]}
    return compare_pairs(rows, cfg.compare, compare_keys_of(cfg, harmful),
                         num_resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)


def main(cfg: EvalCfg) -> dict:
    import ray

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.dump(cfg, run_dir / "config.yaml")
    engine = resolve_kind(cfg.engine.kind)
    print(f"== bt-ray eval -> {run_dir.resolve()} (engine {engine})")
    labels = labels_of(cfg)
    if any(d.name == "synthetic" for d in cfg.datasets):
        for name in cfg.models:
            check_synthetic_world(name, cfg.synthetic)
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False)
    tracked = tracking.ModelRuns.of(cfg, run_dir, "eval", params={"engine.resolved": engine})
    items = load_items(cfg)
    print(f"-- {len(items)} prompts: " + ", ".join(f"{d.name}" + (f"[:{d.limit}]" if d.limit else "")
                                                  for d in cfg.datasets))
    results, sweeps, run_ids = {}, {}, {}
    # One run per model, under one parent run when there are several (and under the pipeline's run in a
    # pipeline); each ends FAILED if it raises, and a rerun there reuses them (keyed by run dir and label).
    with contextlib.ExitStack() as stack:
        parent = None
        if len(labels) > 1:
            parent = stack.enter_context(tracked.parent(f"eval:{run_dir.name}"))
        passes = passes_of(cfg, labels, items)
        t0 = time.perf_counter()
        print(f"-- {len(passes)} passes ({len(labels)} models), {sum(len(p.rows) for p in passes)} rows: "
              "one actor pool")
        done = run_passes(passes, engine=cfg.engine, judge=cfg.judge)
        print(f"-- generated and judged in {time.perf_counter() - t0:.0f}s")
        for label, name in zip(labels, cfg.models):
            with tracked.model(label, name, parent) as run:  # tagged with the model's lineage
                run.log_params(tracked.model_params(label, name))
                metrics, sweep = write_one(cfg, label, name, run_dir / label, done)
                run.log_metrics(flat_metrics(metrics))
                for i, point in enumerate(sweep):
                    run.log_metrics({f"sweep.{k}": v for k, v in point.items() if v is not None}, step=i)
                if sweep:
                    sweeps[label] = sweep
                    png = plot_sweep({label: sweep}, run_dir / label / "bias_sweep.png")
                    run.log_artifact(png)
                run.log_artifact(run_dir / label / "main" / "rows.jsonl")
                run.log_artifact(run_dir / label / "metrics.json")
                run.log_artifact(config_path)
                run_ids[label] = run.run_id
            results[label] = metrics
            speed = metrics["throughput"]["output_tokens_per_s"]
            print(f"-- {label}: {metrics['num_rows']} rows, {metrics['num_errors']} errors, "
                  f"{speed:.1f} tok/s over its generation span -> {run_dir / label}")

    figures = []
    if len(sweeps) > 1:
        figures.append(str(plot_sweep(sweeps, run_dir / "bias_sweep.png")))
    figures += [str(run_dir / label / "bias_sweep.png") for label in sweeps]
    table = side_by_side(results)
    print(table)
    compared = comparisons(cfg, run_dir)
    if compared:
        print(format_pairs(compared))
    summary = {
        "run_dir": str(run_dir),
        "config": str(config_path),
        "engine": engine,
        "models": {label: {"name": name, "rows": str(run_dir / label / "main" / "rows.jsonl"),
                           "metrics": results[label], "mlflow_run_id": run_ids[label]}
                   for label, name in zip(labels, cfg.models)},
        "mlflow": {"tracking_uri": tracked.tracking_uri, "experiment": tracked.experiment,
                   "parent_run_id": parent.run_id if parent else None},
        "figures": figures,
        "table": table,
        "comparisons": compared,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"== done: {run_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(parse_args())
