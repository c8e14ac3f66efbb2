"""The config each stage's job runs with, derived from the pipeline's model, world and earlier outputs.

Each function returns the job's own config object (``SFTJobCfg``, ``EvalCfg``, ...), loaded from the
stage's YAML with the pipeline's overrides on top, so the stage is an ordinary job run and its resolved
config is what the skip markers hash. The MLflow experiment is forwarded to every job: one experiment.
"""

from __future__ import annotations

import json
from pathlib import Path

from bt_ray import config
from bt_ray.pipeline.config import PipelineCfg

# Eval columns pair up: baseline-sft, backtrack-sft, baseline-dpo, backtrack-dpo (after base, when evaluated).
ALIGNED = [f"{kind}-{stage}" for stage in ("sft", "dpo") for kind in ("baseline", "backtrack")]
ONPOLICY_FILE = "data/onpolicy.jsonl"


def world_overrides(cfg: PipelineCfg, prefix: str) -> list[str]:
    """``<prefix>.<field>=<value>`` for every field of the pipeline's world (values in JSON, as YAML)."""
    return [f"{prefix}.{k}={json.dumps(v)}" for k, v in config.flatten(config.to_dict(cfg.synthetic)).items()]


def _training(cfg: PipelineCfg, run_dir: Path) -> list[str]:
    return [f"run.root={run_dir / 'runs'}", f"mlflow.experiment={cfg.experiment}",
            *world_overrides(cfg, "data.synthetic"), *cfg.stage_overrides]


def _onpolicy_data(cfg: PipelineCfg, run_dir: Path) -> list[str]:
    """SFT and DPO read the on-policy file, with the labels it holds, when the pipeline made one."""
    if cfg.onpolicy_config is None:
        return []
    source = [{"name": "jsonl", "path": str(run_dir / ONPOLICY_FILE)}]
    return ["data.path=null", "data.sources=" + json.dumps(source), 'data.judge_filter="column"']


def onpolicy_cfg(cfg: PipelineCfg, run_dir: Path, base: str):
    """The on-policy data step from ``base``: its judged answers to the training prompts."""
    from bt_ray.data.onpolicy import OnPolicyCfg

    return config.load(OnPolicyCfg, cfg.onpolicy_config, [
        f"model.name={base}", f"out={run_dir / ONPOLICY_FILE}",
        *cfg.onpolicy_overrides])


def pretrain_cfg(cfg: PipelineCfg, run_dir: Path, model_dir: str):
    """The base model's SFT (the synthetic world's "pretraining"), from the pipeline's model."""
    from bt_ray.train.config import SFTJobCfg

    return config.load(SFTJobCfg, cfg.pretrain_config,
                       [*_training(cfg, run_dir), f"model.name={model_dir}", "run.name=pretrain"])


def sft_cfg(cfg: PipelineCfg, run_dir: Path, base: str, kind: str):
    """SFT of recipe ``kind`` (baseline | backtrack) from ``base``, run as ``sft-<kind>``."""
    from bt_ray.train.config import SFTJobCfg

    return config.load(SFTJobCfg, cfg.sft_config, [
        *_training(cfg, run_dir), *_onpolicy_data(cfg, run_dir), f"model.name={base}",
        f"data.recipe={kind}-sft", f"run.name=sft-{kind}"])


def dpo_cfg(cfg: PipelineCfg, run_dir: Path, sft_model: str, kind: str):
    """DPO of recipe ``kind`` from its SFT model (also DPO's reference model), run as ``dpo-<kind>``."""
    from bt_ray.train.config import DPOJobCfg

    return config.load(DPOJobCfg, cfg.dpo_config, [
        *_training(cfg, run_dir), *_onpolicy_data(cfg, run_dir), f"model.name={sft_model}",
        f"data.recipe={kind}-dpo", f"run.name=dpo-{kind}"])


def sweep_cfg(cfg: PipelineCfg, run_dir: Path, base_model: str):
    """The sweep (``sweep_config``) from ``base_model`` on the pipeline's world; best model under
    <run_dir>/sweep/best/model."""
    from bt_ray.tune.config import SweepCfg

    own = config.load(SweepCfg, cfg.sweep_config).base_overrides
    overrides = [f"model.name={base_model}", *(o for o in own if not o.startswith("model.name=")),
                 *world_overrides(cfg, "data.synthetic")]
    return config.load(SweepCfg, cfg.sweep_config, [
        f"run_dir={run_dir / 'sweep'}", "base_overrides=" + json.dumps(overrides),
        f"mlflow_experiment={cfg.experiment}"])


def aligned_models(models: dict[str, str]) -> dict[str, str]:
    """The aligned models in table order (base when present, then baseline, backtrack per stage), from
    ``{label: model dir}``."""
    return {label: models[label] for label in ("base", *ALIGNED) if label in models}


def eval_cfg(cfg: PipelineCfg, run_dir: Path, models: dict[str, str]):
    """Eval of every aligned model on the pipeline's world, baseline vs backtracking per stage."""
    from bt_ray.eval.config import EvalCfg

    aligned = aligned_models(models)
    pairs = [[f"baseline-{s}", f"backtrack-{s}"] for s in ("sft", "dpo")
             if f"baseline-{s}" in aligned and f"backtrack-{s}" in aligned]
    return config.load(EvalCfg, cfg.eval_config, [
        f"run_dir={run_dir / 'eval'}",
        "models=" + json.dumps(list(aligned.values())),
        "labels=" + json.dumps(list(aligned)),
        "compare=" + json.dumps(pairs),
        f"mlflow_experiment={cfg.experiment}",
        *world_overrides(cfg, "synthetic"),
        *cfg.eval_overrides,
    ])


def calibrate_cfg(cfg: PipelineCfg, run_dir: Path, models: dict[str, str]):
    """Calibration of the backtracking models' [RESET] bias (``calibrate_config``)."""
    from bt_ray.eval.calibrate import CalibrateCfg

    back = {k: v for k, v in aligned_models(models).items() if k.startswith("backtrack-")}
    return config.load(CalibrateCfg, cfg.calibrate_config, [
        f"run_dir={run_dir / 'calibrate'}",
        "models=" + json.dumps(list(back.values())),
        "labels=" + json.dumps(list(back)),
        f"mlflow_experiment={cfg.experiment}",
        *world_overrides(cfg, "synthetic"),
        *cfg.calibrate_overrides,
    ])


def attack_targets(models: dict[str, str]) -> dict[str, str]:
    """What the attacks hit: the DPO models, else the SFT models."""
    aligned = aligned_models(models)
    dpo = {k: v for k, v in aligned.items() if k.endswith("-dpo")}
    return dpo or {k: v for k, v in aligned.items() if k.endswith("-sft")}


def attack_cfg(cfg: PipelineCfg, run_dir: Path, models: dict[str, str], kind: str):
    """Attack ``kind`` on the attack targets, paired baseline vs backtracking, on the pipeline's world."""
    from bt_ray.attacks.config import AttackJobCfg

    targets = attack_targets(models)
    labels = list(targets)
    pairs = [[a, b] for a in labels for b in labels
             if a.startswith("baseline-") and b == a.replace("baseline-", "backtrack-")]
    return config.load(AttackJobCfg, cfg.attack_config, [
        f"run_dir={run_dir / 'attacks'}",
        "models=" + json.dumps(list(targets.values())),
        "labels=" + json.dumps(labels),
        "compare=" + json.dumps(pairs),
        f"attack.kind={kind}",
        f"mlflow_experiment={cfg.experiment}",
        *world_overrides(cfg, "synthetic"),
        *cfg.attack_overrides,
    ])


def serve_cfg(cfg: PipelineCfg, model_dir: str):
    """The serve check's config: ``model_dir`` on loopback (its port is picked when it runs)."""
    from bt_ray.serve.config import ServeCfg

    return config.load(ServeCfg, cfg.serve_config, [
        f"model.name={model_dir}", "http.host=127.0.0.1", "deployment.log_level=WARNING",
        *cfg.serve_overrides])


def serve_check(cfg: PipelineCfg, serve_cfg_, jobs_dir: Path) -> list[dict]:
    """Serve the model (on a free loopback port), ask it one harmful and one benign held-out prompt of the
    pipeline's world with the ``openai`` client, shut down; returns each answer and whether it reset.

    The check has its MLflow run under the pipeline's run, tagged with the training run behind the
    model (``tracking.lineage_tags``), with the answers as an artifact.
    """
    from bt_ray import tracking

    model_dir = serve_cfg_.model.name
    run = tracking.Run.start(tracking.resolve_tracking_uri(None, cfg.run_dir), cfg.experiment, "serve-check",
                             Path(cfg.run_dir) / "mlflow-artifacts", reuse_key=f"serve:{model_dir}",
                             tags={"stage": "serve", "model": model_dir, **tracking.lineage_tags(model_dir)})
    with run:
        out = _ask(cfg, serve_cfg_, jobs_dir)
        run.log_metrics({"serve_check.answers": len(out),
                         "serve_check.resets_harmful": sum(a["num_resets"] for a in out if a["harmful"]),
                         "serve_check.resets_benign": sum(a["num_resets"] for a in out if not a["harmful"])})
        answers = Path(cfg.run_dir) / "serve" / "answers.json"
        answers.parent.mkdir(parents=True, exist_ok=True)
        answers.write_text(json.dumps(out, indent=2))
        run.log_artifact(answers)
    return out


def _ask(cfg: PipelineCfg, serve_cfg_, jobs_dir: Path) -> list[dict]:
    import dataclasses
    import runpy
    import socket

    from openai import OpenAI

    from bt_ray.data.synthetic import eval_prompts
    from bt_ray.serve.app import read_api_key

    serve_job = runpy.run_path(str(jobs_dir / "serve.py"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_cfg_ = dataclasses.replace(serve_cfg_, http=dataclasses.replace(serve_cfg_.http, port=port))
    url = serve_job["start"](serve_cfg_)
    items, _ = eval_prompts(cfg.synthetic)
    asked = [next(it for it in items if it.harmful), next(it for it in items if not it.harmful)]
    out = []
    try:
        client = OpenAI(base_url=url, api_key=read_api_key(serve_cfg_.auth) or "unused")
        model = client.models.list().data[0].id
        for item in asked:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": item.turns[0]}], temperature=0.7, seed=0,
            ).choices[0]
            facts = reply.model_extra["backtracking"]
            kind = "harmful" if item.harmful else "benign"
            print(f"[{kind}] {item.turns[0]!r} -> {reply.message.content!r}")
            out.append({"harmful": item.harmful, "prompt": item.turns[0], "answer": reply.message.content,
                        **facts})
    finally:
        serve_job["stop"](serve_cfg_)
    return out
