"""The bt-ray demo on the embedded default: tiny model, synthetic safety world, local outputs.

Run as:
    make demo
    python jobs/demo.py --config jobs/configs/demo.yaml [dotted.key=value ...]
    bt-ray demo --config jobs/configs/demo.yaml

It (1) builds the model with [RESET] and saves it as an HF directory, (2) builds the training data
of the four recipes (baseline/backtrack x SFT/DPO) and shows backtracking rows token by token with
their loss mask, (3) trains a base model that complies with everything (the synthetic world's
"pretraining"), (4) trains baseline and backtracking SFT from it, then DPO from each, as Ray Train
jobs, (5) evaluates every model on the synthetic world's held-out prompts and prints them side by
side, (6) says whether backtracking is less unsafe than baseline by more than the 95% CI of the
difference, and (7) writes summary.json. Each stage is an ordinary job (jobs/sft.py, jobs/dpo.py,
jobs/eval.py) run with its own config; the demo only chains their outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

from bt_ray import config
from bt_ray.data.build import DataBuildCfg, build_dataset, format_rendered, render_row
from bt_ray.data.recipes import RecipeCfg
from bt_ray.demo import DemoCfg
from bt_ray.eval.report import compare_pairs, format_pairs
from bt_ray.models import describe, load_model, save_model

JOBS = Path(__file__).resolve().parent


def parse_args(argv=None) -> DemoCfg:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (DemoCfg)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. synthetic.seed=1")
    args = parser.parse_args(argv)
    return config.load(DemoCfg, args.config, args.overrides)


def main(cfg: DemoCfg) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.dump(cfg, run_dir / "config.yaml")
    # One MLflow store for every stage, so the UI compares them (an explicit setting wins).
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    print(f"== bt-ray demo -> {run_dir.resolve()} (MLflow {tracking_uri})")

    # ---- 1. the model with [RESET]
    t0 = time.perf_counter()
    model, tokenizer, reset = load_model(cfg.model)
    facts = describe(model, tokenizer, reset)
    model_dir = save_model(
        model, tokenizer, run_dir / "model-init",
        {"config": config.to_dict(cfg), "git_sha": config.git_sha(), "stage": "init"},
    )
    print(f"-- model {cfg.model.name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    print(f"   saved to {model_dir} ({time.perf_counter() - t0:.1f}s)")

    # ---- 2. the four recipes' data
    data = {}
    for recipe in cfg.recipes:
        build_cfg = DataBuildCfg(
            model=cfg.model,
            recipe=RecipeCfg(name=recipe, prefix=cfg.prefix, max_length=cfg.max_length),
            sources=cfg.sources,
            synthetic=cfg.synthetic,
            out=str(run_dir / "data" / f"{recipe}.jsonl"),
        )
        summary = build_dataset(build_cfg, log=lambda m: None)
        data[recipe] = summary
        rec = summary["recipe"]
        print(f"-- {recipe:14s} {summary['num_rows']:6d} rows {rec['rows']}  skipped {rec['skipped']}")
        print(f"   -> {summary['out']}")

    # ---- 3. what a backtracking row trains on
    for recipe in [r for r in cfg.recipes if r.startswith("backtrack")]:
        with open(data[recipe]["out"]) as f:
            rows = [json.loads(line) for line in f]
        for row in [r for r in rows if r["kind"].startswith("backtrack")][: cfg.num_inspect]:
            print(format_rendered(render_row(row, tokenizer), color=sys.stdout.isatty()))

    # ---- 4. training: base model, then baseline and backtracking SFT (and DPO) from it
    models: dict[str, str] = {}
    if cfg.sft_config is not None:
        models = train_stages(cfg, run_dir)

    # ---- 5. evaluation of every trained model, side by side
    evaluation = None
    if cfg.eval_config is not None and models:
        from bt_ray.eval.config import EvalCfg

        eval_main = runpy.run_path(str(JOBS / "eval.py"))["main"]
        eval_cfg = config.load(EvalCfg, cfg.eval_config, [
            f"run_dir={run_dir / 'eval'}",
            "models=" + json.dumps(list(models.values())),
            "labels=" + json.dumps(list(models)),
        ])
        evaluation = eval_main(eval_cfg)

    # ---- 6. the paper's claim: backtracking less unsafe than baseline, beyond the 95% CI
    comparisons = []
    if evaluation is not None:
        metrics = {label: m["metrics"] for label, m in evaluation["models"].items()}
        pairs = [(f"baseline-{s}", f"backtrack-{s}") for s in ("sft", "dpo")
                 if f"baseline-{s}" in metrics and f"backtrack-{s}" in metrics]
        keys = ["synthetic"] + [f"worst-of-{k}" for k in sorted(eval_cfg.worst_of_k) if k > 1]
        comparisons = [c for key in keys for c in compare_pairs(metrics, pairs, key)]
        print(format_pairs(comparisons))

    # ---- 7. summary
    summary = {
        "run_dir": str(run_dir),
        "config": str(config_path),
        "model": {"dir": str(model_dir), **facts},
        "data": {r: {"path": s["out"], "num_rows": s["num_rows"], **s["recipe"]} for r, s in data.items()},
        "models": models,
        "eval_summary": str(run_dir / "eval" / "summary.json") if evaluation is not None else None,
        "comparisons": comparisons,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"== done: {run_dir / 'summary.json'}")
    if models:
        print(f"   models: {json.dumps(models, indent=1)}")
        print(f"   MLflow, all stages side by side: mlflow ui --backend-store-uri {tracking_uri}")
    return summary


def train_stages(cfg: DemoCfg, run_dir: Path) -> dict[str, str]:
    """Run the training jobs in order; returns {label: final model dir}."""
    import ray

    from bt_ray.train.config import DPOJobCfg, SFTJobCfg

    if not ray.is_initialized():
        ray.init(num_cpus=cfg.ray_num_cpus)
    sft_main = runpy.run_path(str(JOBS / "sft.py"))["main"]
    dpo_main = runpy.run_path(str(JOBS / "dpo.py"))["main"]
    common = [f"run.root={run_dir / 'runs'}", *cfg.stage_overrides]
    base = cfg.model.name
    if cfg.pretrain_config is not None:
        pre = sft_main(config.load(SFTJobCfg, cfg.pretrain_config, [*common, "run.name=pretrain"]))
        base = pre["model_dir"]
    models = {}
    for kind in ("baseline", "backtrack"):
        sft = sft_main(config.load(SFTJobCfg, cfg.sft_config, [
            *common, f"model.name={base}", f"data.recipe={kind}-sft", f"run.name=sft-{kind}",
        ]))
        models[f"{kind}-sft"] = sft["model_dir"]
        if cfg.dpo_config is not None:
            dpo = dpo_main(config.load(DPOJobCfg, cfg.dpo_config, [
                *common, f"model.name={sft['model_dir']}", f"data.recipe={kind}-dpo", f"run.name=dpo-{kind}",
            ]))
            models[f"{kind}-dpo"] = dpo["model_dir"]
    return models


if __name__ == "__main__":
    main(parse_args())
