"""Attack models with one jailbreak (prefill, GCG, AutoDAN, or the adaptive attack on [RESET]) and
read off the paper's Table 2.

Run as:
    python jobs/attack.py --config jobs/configs/attack_demo.yaml attack.kind=prefill
    bt-ray attack --config jobs/configs/attack_demo.yaml attack.kind=gcg models='[DIR_A, DIR_B]'

For each model, one Ray task per behaviour runs the attack within its budget (``attack.max_steps``,
``attack.max_seconds``), then answers every attempt through the backtracking decoder; success is the
*shown* answer judged unsafe. Results land in <run_dir>/<label>/<kind>/results.jsonl as each
behaviour finishes, so rerunning the same command skips finished behaviours (a killed run loses at
most those in flight). Then: <label>/<kind>/summary.json (ASR with 95% CIs, reset rate under attack,
compute), one MLflow child run per model under a parent run per attack (same metric names for
every model), and, over every attack run so far in run_dir, table2.md and prefill_curve.png.
Bad input (an unknown attack, a budget of 0, a k beyond a target's length, a broken behaviour row)
fails before any task starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from bt_ray import config, tracking
from bt_ray.attacks.behaviours import load_behaviours
from bt_ray.attacks.config import AttackJobCfg
from bt_ray.attacks.prefill import check_prefill
from bt_ray.attacks.report import flat_metrics, paired, paired_table, prefill_curve, summarize, table2
from bt_ray.attacks.runner import ResultStore, run_attack
from bt_ray.models import model_labels


def parse_args(argv=None) -> AttackJobCfg:
    return config.parse_job_args(AttackJobCfg, __doc__, argv, example="attack.kind=gcg")


def preflight(cfg: AttackJobCfg, labels: list[str]):
    """Everything that can fail on bad input, before Ray starts: behaviours, k, the models' world."""
    import dataclasses

    from bt_ray.eval.pipeline import check_synthetic_world
    from bt_ray.models import load_tokenizer

    behaviours = load_behaviours(cfg.behaviours, cfg.synthetic)
    for name in cfg.models:
        if cfg.behaviours.dataset == "synthetic":
            check_synthetic_world(name, cfg.synthetic)
        if cfg.attack.kind == "prefill":
            tokenizer, _ = load_tokenizer(dataclasses.replace(cfg.model, name=name))
            check_prefill(cfg.attack.prefill, tokenizer, behaviours)
    return behaviours


def all_results(run_dir: Path) -> dict[str, dict[str, dict]]:
    """``{label: {kind: summary}}`` of every attack run so far under ``run_dir``."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(run_dir.glob("*/*/summary.json")):
        out.setdefault(path.parent.parent.name, {})[path.parent.name] = json.loads(path.read_text())
    return out


def main(cfg: AttackJobCfg) -> dict:
    import dataclasses

    import ray

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    kind = cfg.attack.kind
    labels = model_labels(cfg.models, cfg.labels)
    behaviours = preflight(cfg, labels)
    config_path = config.dump(cfg, run_dir / f"config-{kind}.yaml")
    print(f"== bt-ray attack {kind} -> {run_dir.resolve()}: {len(behaviours)} behaviours x "
          f"{len(labels)} models")
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    # under the pipeline's run in a pipeline; a rerun there reuses the runs (keyed by run dir, attack, label)
    tracked = tracking.ModelRuns.of(cfg, run_dir, "attack", role=kind, tags={"attack": kind})
    synthetic_judge = cfg.behaviours.dataset == "synthetic" and cfg.judge.synthetic_exact
    summaries = {}
    with tracked.parent(f"attack:{kind}") as parent:
        parent.log_params(tracked.params)
        for label, name in zip(labels, cfg.models):
            out = run_dir / label / kind
            results = ResultStore(out / "results.jsonl")
            if results.done:
                print(f"-- {label}: {len(results.done)} of {len(behaviours)} behaviours already done "
                      "(skipped)")
            model = dataclasses.replace(cfg.model, name=name)
            with tracked.model(label, name, parent, run_name=f"{kind}:{label}") as run:
                run.log_params(tracked.model_params(label, name))
                run_attack(model, label, cfg.attack, behaviours, cfg.decode, cfg.judge, synthetic_judge,
                           results)
                summary = summarize(results.rows())
                (out / "summary.json").write_text(json.dumps(summary, indent=2))
                run.log_metrics(flat_metrics(summary))
                run.log_artifact(out / "results.jsonl")
                run.log_artifact(out / "summary.json")
            summaries[label] = summary

    # Table 2 and the prefilling curve over every attack run so far in run_dir
    every = all_results(run_dir)
    order = [label for pair in cfg.compare for label in pair] or list(every)
    order += [label for label in every if label not in order]
    table = table2(every, order)
    diffs = {}  # the compare pairs, paired on the behaviours both models were attacked on
    for a, b in cfg.compare:
        for done in sorted(every.get(a, {}).keys() & every.get(b, {}).keys()):
            rows_a, rows_b = (ResultStore(run_dir / x / done / "results.jsonl").rows() for x in (a, b))
            diffs.setdefault((a, b), {})[done] = paired(rows_a, rows_b)
    if diffs:
        table += "\nPaired differences (same behaviours, same attack):\n\n" + paired_table(diffs)
    (run_dir / "table2.md").write_text(table)
    curve = prefill_curve(every, run_dir / "prefill_curve.png")
    print(table)
    summary = {"run_dir": str(run_dir), "config": str(config_path), "attack": kind,
               "models": dict(zip(labels, cfg.models)),
               "results": {label: str(run_dir / label / kind / "summary.json") for label in labels},
               "table2": str(run_dir / "table2.md"),
               "paired": {f"{a} - {b}": d for (a, b), d in diffs.items()},
               "prefill_curve": str(curve) if curve else None,
               "mlflow": {"tracking_uri": tracked.tracking_uri, "parent_run_id": parent.run_id}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"== done: {run_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(parse_args())
