"""The whole method as one job: data -> (sweep) -> (pretrain) -> (on-policy data) -> SFT -> DPO -> eval ->
(calibration) -> attacks -> serve check -> report, for baseline and backtracking.

Run as:
    make demo                                    # = python jobs/pipeline.py --preset demo
    python jobs/pipeline.py --preset demo [dotted.key=value ...]
    bt-ray pipeline --preset smollm2-cpu
    python jobs/pipeline.py --config my_pipeline.yaml
    ray job submit --working-dir . -- python jobs/pipeline.py --preset demo

A preset is jobs/configs/pipeline_<preset>.yaml (demo, smollm2-cpu, paper-gemma2-2b, paper-llama3-8b).
Each stage is an ordinary job (jobs/sft.py, dpo.py, sweep.py, onpolicy.py, eval.py, calibrate.py, attack.py,
serve.py) run in this process with its own config; a stage that completes writes
<run_dir>/stages/<stage>.json, and a rerun with the same config skips it, so a killed run resumes at the
stage that was running (training from its checkpoints). The terminal shows one line per stage start and
end and a progress bar; each stage's output (Ray and vLLM worker logs included) goes to
<run_dir>/logs/<stage>.log unless verbose=true.
Every job logs into one MLflow experiment, under one parent run per pipeline run (reopened on rerun).
At the end: Table 1, the comparisons in plain words, and the report's path.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

from bt_ray import config, tracking
from bt_ray.pipeline import stages
from bt_ray.pipeline.config import PipelineCfg, load_preset, presets
from bt_ray.pipeline.console import Console, count_lines, elapsed
from bt_ray.pipeline.results import print_results, report_stage
from bt_ray.pipeline.runner import StageRunner
from bt_ray.pipeline.session import parent_run, quiet, start_ray, train_progress

JOBS = Path(__file__).resolve().parent


def parse_args(argv=None) -> PipelineCfg:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help=f"one of {', '.join(presets())} (default: demo)")
    parser.add_argument("--config", default=None, help="YAML config (PipelineCfg), instead of a preset")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. synthetic.seed=1 verbose=true")
    args = parser.parse_args(argv)
    if args.preset and args.config:
        parser.error("give --preset or --config, not both")
    return load_preset(args.preset or (None if args.config else "demo"), args.config, args.overrides)


def run_stages(cfg: PipelineCfg, run_dir: Path, run: StageRunner) -> dict:
    """Every stage in order; returns the summary the report and the final table read."""
    job = {name: runpy.run_path(str(JOBS / f"{name}.py"))["main"]
           for name in ("sft", "dpo", "sweep", "eval", "attack", "onpolicy", "calibrate")}
    model_dir = run_dir / "model-init"

    # ---- data + model: the model with [RESET], which the first training stage starts from
    def build_model() -> dict:
        from bt_ray.models import describe, load_model, save_model

        model, tokenizer, reset = load_model(cfg.model)
        facts = describe(model, tokenizer, reset)
        save_model(model, tokenizer, model_dir, {"config": config.to_dict(cfg.model), "stage": "init",
                                                 "git_sha": config.git_sha()})
        return {"dir": str(model_dir), **facts}
    init = run.run("model", cfg.model, build_model, requires=lambda o: [o["dir"]], what=cfg.model.name)
    if cfg.sft_config is None:
        return {"model": init}
    start_ray(cfg)

    trained: dict[str, dict] = {}
    base, base_stage = str(model_dir), "model"
    if cfg.pretrain_config is not None:
        c = stages.pretrain_cfg(cfg, run_dir, base)
        trained["pretrain"] = run.run("pretrain", c, lambda: job["sft"](c), after=("model",),
                                      requires=lambda o: [o["model_dir"]], progress=train_progress(c),
                                      what="the base model (complies with everything)")
        base, base_stage = trained["pretrain"]["model_dir"], "pretrain"

    # ---- optional sweep, from the base model
    sweep = None
    if cfg.sweep_config is not None:
        c = stages.sweep_cfg(cfg, run_dir, base)
        sweep = run.run("sweep", c, lambda: job["sweep"](c), after=(base_stage,),
                        what="the hyperparameter grid")

    # ---- on-policy data: the base model's own judged answers become y- (and its benign answers y+)
    data = None
    if cfg.onpolicy_config is not None:
        c = stages.onpolicy_cfg(cfg, run_dir, base)
        data = run.run("onpolicy", c, lambda: job["onpolicy"](c), after=(base_stage,),
                       requires=lambda o: [c.out], what="the base model's judged answers to training prompts")
        base_stage = "onpolicy"

    # ---- SFT, then DPO from it, per recipe
    for kind in ("baseline", "backtrack"):
        c = stages.sft_cfg(cfg, run_dir, base, kind)
        trained[f"{kind}-sft"] = run.run(f"sft-{kind}", c, lambda c=c: job["sft"](c), after=(base_stage,),
                                         requires=lambda o: [o["model_dir"]], progress=train_progress(c),
                                         what=f"{kind} SFT from {Path(base).parent.name or base}")
        if cfg.dpo_config is not None:
            c = stages.dpo_cfg(cfg, run_dir, trained[f"{kind}-sft"]["model_dir"], kind)
            trained[f"{kind}-dpo"] = run.run(f"dpo-{kind}", c, lambda c=c: job["dpo"](c),
                                             after=(f"sft-{kind}",), requires=lambda o: [o["model_dir"]],
                                             progress=train_progress(c),
                                             what=f"{kind} DPO from sft-{kind}")
    models = {label: t["model_dir"] for label, t in trained.items()}
    # the stage that made each aligned model: baseline-sft -> sft-baseline
    model_stage = {label: f"{label.split('-')[1]}-{label.split('-')[0]}"
                   for label in models if label != "pretrain"}

    # ---- eval: every aligned model side by side, baseline vs backtracking per stage
    evaluation = None
    if cfg.eval_config is not None:
        c = stages.eval_cfg(cfg, run_dir, {"base": base, **models} if cfg.eval_base else models)
        evaluation = run.run("eval", c, lambda: job["eval"](c), after=tuple(model_stage.values()),
                             requires=lambda o: [o["run_dir"] + "/summary.json"],
                             what=f"{len(c.models)} models, {', '.join(d.name for d in c.datasets)}")

    # ---- calibration of the backtracking models' [RESET] bias on a safe dev set
    calibration = None
    if cfg.calibrate_config is not None:
        c = stages.calibrate_cfg(cfg, run_dir, models)
        calibration = run.run("calibrate", c, lambda: job["calibrate"](c), after=("eval",),
                              what=f"the [RESET] bias of {', '.join(c.labels)}")

    # ---- attacks on the DPO models (SFT without DPO)
    attacks = {}
    if cfg.attack_config is not None:
        for kind in cfg.attacks:
            c = stages.attack_cfg(cfg, run_dir, models, kind)
            per = Path(c.run_dir)
            total = c.behaviours.limit * len(c.models) if c.behaviours.limit else None
            def progress(per=per, kind=kind, total=total):
                return ((sum(count_lines(p) for p in per.glob(f"*/{kind}/results.jsonl")), total))
            attacks[kind] = run.run(f"attack-{kind}", c, lambda c=c: job["attack"](c),
                                    after=tuple(model_stage[m] for m in c.labels), progress=progress,
                                    requires=lambda o: [o["table2"]], what=f"{kind} on {', '.join(c.labels)}")

    # ---- serve check: the backtracking model behind the OpenAI API
    served = None
    target = next((m for m in ("backtrack-dpo", "backtrack-sft") if m in models), None)
    if cfg.serve_config is not None and target:
        c = stages.serve_cfg(cfg, models[target])
        served = run.run("serve", c, lambda: stages.serve_check(cfg, c, JOBS), after=(model_stage[target],),
                         what=f"{target} behind the OpenAI API, asked with the openai client")

    return {"model": init, "models": models, "trained": trained, "sweep": sweep, "data": data,
            "eval": evaluation, "calibration": calibration, "attacks": attacks, "served": served}


def main(cfg: PipelineCfg) -> dict:
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.cluster_only:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"preset {cfg.preset} is cluster-only (cluster_only: true): it needs GPUs; "
                             "submit it to a GPU Ray cluster (docs/), or override cluster_only=false")
    config.dump(cfg, run_dir / "config.yaml")
    quiet(cfg)
    console = Console(run_dir / "logs", cfg.verbose)
    uri = tracking.use_one_store(run_dir)
    parent = parent_run(uri, cfg, run_dir)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = cfg.experiment
    os.environ["BT_RAY_PARENT_RUN_ID"] = parent.run_id
    console.say(f"== bt-ray pipeline {cfg.preset} -> {run_dir}")
    console.say(f"   MLflow: experiment {cfg.experiment}, run {parent.run_id} "
                f"(mlflow ui --backend-store-uri {uri})")
    runner = StageRunner(run_dir, console)
    status = "FAILED"
    try:
        with console.session():
            out = run_stages(cfg, run_dir, runner)
            status = "FINISHED"
    finally:
        parent.end(status)
    summary = {"run_dir": str(run_dir), "preset": cfg.preset, "command": " ".join(sys.argv),
               "git_sha": config.git_sha(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **out,
               "stages": {"ran": runner.ran, "skipped": runner.skipped},
               "mlflow": {"tracking_uri": uri, "experiment": cfg.experiment, "parent_run_id": parent.run_id}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report = report_stage(run_dir, console) if cfg.report else None

    print_results(console, out)
    console.say(f"== done in {elapsed(t0)}: {run_dir / 'summary.json'}"
                + (f"\n   report: {report}" if report else ""))
    return summary


if __name__ == "__main__":
    main(parse_args())
