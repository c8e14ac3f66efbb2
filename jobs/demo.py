"""The bt-ray demo on the embedded default: tiny model, synthetic safety world, local outputs.

Run as:
    make demo
    python jobs/demo.py --config jobs/configs/demo.yaml [dotted.key=value ...]
    bt-ray demo --config jobs/configs/demo.yaml

Today it (1) builds the model with [RESET] and saves it as an HF directory, (2) builds the
training data of the four recipes (baseline/backtrack x SFT/DPO), (3) shows backtracking rows token
by token with the loss mask, and (4) writes summary.json. Later stages (training, evaluation) extend it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bt_ray import config
from bt_ray.data.build import DataBuildCfg, build_dataset, format_rendered, render_row
from bt_ray.data.recipes import RecipeCfg
from bt_ray.demo import DemoCfg
from bt_ray.models import describe, load_model, save_model


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
    print(f"== bt-ray demo -> {run_dir.resolve()}")

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

    # ---- 4. summary
    summary = {
        "run_dir": str(run_dir),
        "config": str(config_path),
        "model": {"dir": str(model_dir), **facts},
        "data": {r: {"path": s["out"], "num_rows": s["num_rows"], **s["recipe"]} for r, s in data.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"== done: {run_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(parse_args())
