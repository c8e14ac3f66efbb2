"""The bt-ray demo on the embedded default: tiny model, synthetic safety world, local outputs.

Run as:
    make demo
    python jobs/demo.py --config jobs/configs/demo.yaml [dotted.key=value ...]
    bt-ray demo --config jobs/configs/demo.yaml

It (1) builds the model with [RESET] and saves it as an HF directory, which the first training stage
starts from, (2) trains a base model that complies with everything (the synthetic world's
"pretraining"), (3) trains baseline and backtracking SFT from it, then DPO from each, as Ray Train
jobs (with ``sweep_config=jobs/configs/sweep_demo.yaml``, also a 2x2 learning-rate x epochs sweep of
backtracking SFT from the base, selected on the world's dev split: jobs/sweep.py), (4) shows
backtracking rows token by token with their loss mask, read from the rows those stages trained on,
(5) evaluates every model on the synthetic world's held-out prompts and prints
them side by side with paired, cluster-aware comparisons of baseline and backtracking, (6) serves
the last backtracking model behind the OpenAI-compatible API (jobs/serve.py) and asks it one harmful
and one benign held-out prompt with the ``openai`` client, and (7) writes summary.json. Each stage
is an ordinary job (jobs/sft.py, jobs/dpo.py, jobs/eval.py, jobs/serve.py) run with its own config;
the demo chains their outputs and forwards its model and its world to every stage.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

from bt_ray import config, tracking
from bt_ray.data.build import format_rendered, render_row
from bt_ray.demo import DemoCfg
from bt_ray.models import describe, load_model, save_model

JOBS = Path(__file__).resolve().parent


def parse_args(argv=None) -> DemoCfg:
    return config.parse_job_args(DemoCfg, __doc__, argv, example="synthetic.seed=1")


def world_overrides(cfg: DemoCfg, prefix: str) -> list[str]:
    """``<prefix>.<field>=<value>`` for every field of the demo's world (values as JSON, which YAML reads)."""
    return [f"{prefix}.{k}={json.dumps(v)}" for k, v in config.flatten(config.to_dict(cfg.synthetic)).items()]


def main(cfg: DemoCfg) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.dump(cfg, run_dir / "config.yaml")
    # One MLflow store for every stage, so the UI compares them (an explicit setting wins).
    tracking_uri = tracking.use_one_store(run_dir)
    print(f"== bt-ray demo -> {run_dir.resolve()} (MLflow {tracking_uri})")

    # ---- 1. the model with [RESET]: the first training stage starts from this directory
    t0 = time.perf_counter()
    model, tokenizer, reset = load_model(cfg.model)
    facts = describe(model, tokenizer, reset)
    model_dir = save_model(
        model, tokenizer, run_dir / "model-init",
        {"config": config.to_dict(cfg), "git_sha": config.git_sha(), "stage": "init"},
    )
    del model  # the stages load their own copies; ids are shared, so `tokenizer` renders their rows
    print(f"-- model {cfg.model.name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    print(f"   saved to {model_dir} ({time.perf_counter() - t0:.1f}s)")

    # ---- 2-3. training: base model, then baseline and backtracking SFT (and DPO) from it
    stages: dict[str, dict] = {}
    if cfg.sft_config is not None:
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=cfg.ray_num_cpus)
        stages = train_stages(cfg, run_dir, model_dir)
    models = {label: s["model_dir"] for label, s in stages.items()}
    sweep = None
    if cfg.sweep_config is not None and "pretrain" in stages:
        sweep = sweep_stage(cfg, run_dir, stages["pretrain"]["model_dir"])

    # ---- 4. what a backtracking row trains on: the rows the backtracking stages were given
    data = {}
    for label, stage in stages.items():
        recipe = label if label != "pretrain" else "baseline-sft"
        rows_path = Path(stage["run_dir"]) / "data" / f"{recipe}.jsonl"
        counts_path = rows_path.with_suffix(".summary.json")
        if counts_path.is_file():
            counts = json.loads(counts_path.read_text())
            data[label] = {"path": str(rows_path), "num_rows": counts["num_rows"], **counts["recipe"]}
            print(f"-- {label:14s} trained on {stage.get('num_rows', '?')} of {counts['num_rows']} rows "
                  f"{counts['recipe']['rows']}; skipped {counts['recipe']['skipped']} -> {rows_path}")
        if label.startswith("backtrack") and rows_path.is_file() and cfg.num_inspect:
            with rows_path.open() as f:
                rows = [json.loads(line) for line in f]
            for row in [r for r in rows if r["kind"].startswith("backtrack")][: cfg.num_inspect]:
                print(format_rendered(render_row(row, tokenizer), color=sys.stdout.isatty()))

    # ---- 5. evaluation of every trained model, side by side, baseline vs backtracking per stage
    evaluation = None
    if cfg.eval_config is not None and models:
        eval_main = runpy.run_path(str(JOBS / "eval.py"))["main"]
        evaluation = eval_main(eval_stage_cfg(cfg, run_dir, models))

    # ---- 6. serving: the backtracking model behind the OpenAI API, asked with the openai client
    served = None
    backtracking = [models[k] for k in ("backtrack-dpo", "backtrack-sft") if k in models]
    if cfg.serve_config is not None and backtracking:
        served = serve_stage(cfg, backtracking[0])

    # ---- 7. summary
    summary = {
        "run_dir": str(run_dir),
        "config": str(config_path),
        "model": {"dir": str(model_dir), **facts},
        "data": data,
        "models": models,
        "eval_summary": str(run_dir / "eval" / "summary.json") if evaluation is not None else None,
        "comparisons": evaluation.get("comparisons", []) if evaluation is not None else [],
        "served": served,
        "sweep": sweep,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"== done: {run_dir / 'summary.json'}")
    if models:
        print(f"   models: {json.dumps(models, indent=1)}")
        print(f"   MLflow, all stages side by side: mlflow ui --backend-store-uri {tracking_uri}")
    return summary


def train_stages(cfg: DemoCfg, run_dir: Path, model_dir: Path, jobs: dict | None = None) -> dict[str, dict]:
    """Run the training jobs in order, each with the demo's world; returns {label: job summary}.

    ``jobs`` maps ``sft``/``dpo`` to the job's ``main`` (default: jobs/sft.py and jobs/dpo.py).
    """
    from bt_ray.train.config import DPOJobCfg, SFTJobCfg

    jobs = jobs or {name: runpy.run_path(str(JOBS / f"{name}.py"))["main"] for name in ("sft", "dpo")}
    sft_main, dpo_main = jobs["sft"], jobs["dpo"]
    common = [f"run.root={run_dir / 'runs'}", *world_overrides(cfg, "data.synthetic"), *cfg.stage_overrides]
    stages: dict[str, dict] = {}
    base = str(model_dir)
    if cfg.pretrain_config is not None:
        stages["pretrain"] = sft_main(config.load(SFTJobCfg, cfg.pretrain_config,
                                                  [*common, f"model.name={base}", "run.name=pretrain"]))
        base = stages["pretrain"]["model_dir"]
    for kind in ("baseline", "backtrack"):
        sft = sft_main(config.load(SFTJobCfg, cfg.sft_config, [
            *common, f"model.name={base}", f"data.recipe={kind}-sft", f"run.name=sft-{kind}",
        ]))
        stages[f"{kind}-sft"] = sft
        if cfg.dpo_config is not None:
            stages[f"{kind}-dpo"] = dpo_main(config.load(DPOJobCfg, cfg.dpo_config, [
                *common, f"model.name={sft['model_dir']}", f"data.recipe={kind}-dpo", f"run.name=dpo-{kind}",
            ]))
    return stages


def eval_stage_cfg(cfg: DemoCfg, run_dir: Path, models: dict[str, str]):
    """The eval config of the demo: every aligned model, the demo's world, baseline vs backtracking pairs."""
    from bt_ray.eval.config import EvalCfg

    # Columns pair up: baseline-sft, backtrack-sft, baseline-dpo, backtrack-dpo.
    order = [f"{kind}-{stage}" for stage in ("sft", "dpo") for kind in ("baseline", "backtrack")]
    aligned = {label: models[label] for label in order if label in models}
    pairs = [[f"baseline-{s}", f"backtrack-{s}"] for s in ("sft", "dpo")
             if f"baseline-{s}" in aligned and f"backtrack-{s}" in aligned]
    return config.load(EvalCfg, cfg.eval_config, [
        f"run_dir={run_dir / 'eval'}",
        "models=" + json.dumps(list(aligned.values())),
        "labels=" + json.dumps(list(aligned)),
        "compare=" + json.dumps(pairs),
        *world_overrides(cfg, "synthetic"),
    ])


def sweep_stage(cfg: DemoCfg, run_dir: Path, base_model: str, sweep_main=None) -> dict:
    """The demo sweep (``sweep_config``) from the pretrained base, on the demo's world; its best model
    is at <run_dir>/sweep/best/model. ``sweep_main``: the job's main (default: jobs/sweep.py's)."""
    from bt_ray.tune.config import SweepCfg

    sweep_main = sweep_main or runpy.run_path(str(JOBS / "sweep.py"))["main"]
    own = config.load(SweepCfg, cfg.sweep_config).base_overrides
    overrides = [f"model.name={base_model}", *(o for o in own if not o.startswith("model.name=")),
                 *world_overrides(cfg, "data.synthetic")]
    return sweep_main(config.load(SweepCfg, cfg.sweep_config, [
        f"run_dir={run_dir / 'sweep'}", "base_overrides=" + json.dumps(overrides),
    ]))


def serve_stage(cfg: DemoCfg, model_dir: str) -> list[dict]:
    """Serve ``model_dir`` (on a free loopback port), ask it one harmful and one benign held-out prompt
    of the demo's world with the ``openai`` client, print each answer and whether it reset, shut down."""
    import socket

    from openai import OpenAI

    from bt_ray.data.synthetic import eval_prompts
    from bt_ray.serve.app import read_api_key
    from bt_ray.serve.config import ServeCfg

    serve_job = runpy.run_path(str(JOBS / "serve.py"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_cfg = config.load(ServeCfg, cfg.serve_config, [
        f"model.name={model_dir}", f"http.port={port}", "http.host=127.0.0.1", "deployment.log_level=WARNING",
    ])
    t0 = time.perf_counter()
    url = serve_job["start"](serve_cfg)
    items, _ = eval_prompts(cfg.synthetic)
    asked = [next(it for it in items if it.harmful), next(it for it in items if not it.harmful)]
    client = OpenAI(base_url=url, api_key=read_api_key(serve_cfg.auth) or "unused")
    model = client.models.list().data[0].id
    print(f"-- serving {model_dir} as {model!r} at {url} (up in {time.perf_counter() - t0:.0f} s)")
    out = []
    try:
        for item in asked:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": item.turns[0]}], temperature=0.7, seed=0,
            ).choices[0]
            facts = reply.model_extra["backtracking"]
            print(f"   [{'harmful' if item.harmful else 'benign'}] {item.turns[0]}\n"
                  f"     -> {reply.message.content!r} (reset: {facts['reset']}, "
                  f"discarded tokens: {facts['discarded_tokens']})")
            out.append({"harmful": item.harmful, "prompt": item.turns[0], "answer": reply.message.content,
                        **facts})
    finally:
        serve_job["stop"](serve_cfg)
    return out


if __name__ == "__main__":
    main(parse_args())
