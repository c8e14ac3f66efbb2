"""One sweep trial inside Ray Tune: train (``run_stage``), score on the dev subset, report.

Ray Train V2 pattern (STACK.md): Tune runs this plain function per trial, which builds and fits the
trial's TorchTrainer through ``bt_ray.train.job.run_stage``; the function itself holds no CPU.

A trial is restartable at every point: ``run_stage`` resumes from the trial's latest checkpoint, or
returns a finished run's summary at once (its MLflow run reopened, never duplicated), and the dev
score is written to ``<trial run dir>/sweep_score.json``, so a finished trial that Tune runs again
(a restored sweep) reports its saved metrics without training or scoring anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from bt_ray import config

SCORE_FILE = "sweep_score.json"


def dev_items(job, selection) -> list[dict]:
    """The fixed dev prompts as eval pipeline items: the trial world's dev split, or HH-RLHF test."""
    dev = selection.dev
    if dev.name == "synthetic-dev":
        from bt_ray.data.synthetic import preference_examples

        examples, _ = preference_examples(job.data.synthetic, "dev")
        return [{"dataset": "synthetic", "prompt_index": i, "cluster": ex.meta["cluster"],
                 "location": ex.location, "category": ex.meta["category"], "harmful": ex.meta["harmful"],
                 "turns": [m.content for m in ex.prompt if m.role == "user"]}
                for i, ex in enumerate(examples[: dev.limit])]
    from bt_ray.data.sources import load_prompts

    prompts, _ = load_prompts("hh-rlhf", dev.path, limit=dev.limit)
    return [{"dataset": p.dataset, "prompt_index": i, "cluster": f"prompt:{i}", "location": p.location,
             "category": p.category, "harmful": p.harmful, "turns": list(p.turns)}
            for i, p in enumerate(prompts)]


def dev_pairs(job, selection) -> list:
    """Dev preference pairs whose chosen responses give eval_loss."""
    dev = selection.dev
    if dev.name == "synthetic-dev":
        from bt_ray.data.synthetic import preference_examples

        return preference_examples(job.data.synthetic, "dev")[0][: dev.eval_loss_limit]
    from bt_ray.data.sources import load_preferences

    return load_preferences("hh-rlhf", dev.path, limit=dev.eval_loss_limit, split="test")[0]


def eval_loss(model_dir: str, model_cfg, pairs: list) -> float:
    """Mean token NLL of each pair's chosen response after its prompt, under the trial's model.

    The prompt is encoded as generation sees it (``encode_chat_prompt``); the response as plain text
    plus the end of turn, the same for every trial, so the numbers compare across the grid.
    """
    import torch

    from bt_ray.models import load_model
    from bt_ray.reset import encode_chat_prompt, encode_text, end_of_turn_ids

    model, tokenizer, _ = load_model(dataclasses.replace(model_cfg, name=model_dir))
    model.eval()
    end = end_of_turn_ids(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for pair in pairs:
            prompt = encode_chat_prompt(tokenizer, pair.prompt_dicts())
            answer = encode_text(tokenizer, pair.chosen) + end
            ids = torch.tensor([prompt + answer])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            out = model(input_ids=ids, labels=labels)
            total += float(out.loss) * len(answer)
            count += len(answer)
    return total / count if count else math.nan


def score_trial(job, summary: dict, selection, out_dir: Path) -> dict:
    """The trial's reported metrics: dev unsafe/reset/helpful rates (eval pipeline + judge), eval_loss."""
    from bt_ray.eval.pipeline import evaluate_model, expand

    model_dir = summary["model_dir"]
    model = dataclasses.replace(job.model, name=model_dir)
    metrics = evaluate_model(expand(dev_items(job, selection)), out_dir, model=model, engine=selection.engine,
                             decode=selection.decode, judge=selection.judge, num_resamples=0)
    stats = next(iter(metrics["datasets"].values()))
    train_loss = (summary.get("metrics") or {}).get("loss")
    return {
        "dev_unsafe_rate": stats["unsafe"]["rate"],
        "dev_reset_rate": stats["reset"]["rate"],
        "dev_helpful_rate": (stats.get("score") or {}).get("mean"),
        "eval_loss": eval_loss(model_dir, job.model, dev_pairs(job, selection)),
        "train_loss": float(train_loss) if train_loss is not None else None,
        "dev_num_prompts": stats["num_rows"],
        "dev_num_errors": stats["num_errors"],
    }


def run_trial(tune_config: dict, *, plan: dict) -> None:
    """Tune's trainable: ``plan`` holds every trial's resolved job config, the selection config, the
    sweep's parent MLflow run and the driver's working dir; ``tune_config["trial"]`` names this trial."""
    from ray import tune

    from bt_ray import tracking
    from bt_ray.train.config import JOB_CONFIGS
    from bt_ray.train.job import run_stage
    from bt_ray.tune.config import SelectionCfg

    os.chdir(plan["cwd"])  # Tune starts a trial in its own dir; the configs' relative paths are the driver's
    name = tune_config["trial"]
    job = config.build(JOB_CONFIGS[plan["stage"]], plan["trials"][name])
    selection = config.build(SelectionCfg, plan["selection"])
    run_dir = Path(job.run.root) / job.run.name
    saved = run_dir / SCORE_FILE
    if saved.is_file():  # finished and scored in an earlier run of the sweep: nothing to redo
        tune.report(json.loads(saved.read_text()))
        return
    summary = run_stage(job)  # resumes, or returns at once when the training already finished
    metrics = score_trial(job, summary, selection, run_dir / "dev_eval")
    result = {**metrics, "trial": name, "model_dir": summary["model_dir"], "run_dir": str(run_dir),
              "mlflow_run_id": summary.get("mlflow_run_id")}
    if summary.get("mlflow_run_id") and plan.get("parent_run_id"):
        run = tracking.Run(job.mlflow.tracking_uri, summary["mlflow_run_id"])
        run.set_tags({"mlflow.parentRunId": plan["parent_run_id"], "sweep.trial": name})
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    saved.write_text(json.dumps(result, indent=2))
    tune.report(result)
