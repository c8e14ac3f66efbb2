"""The sweep job on local Ray: a 2x2 grid of tiny SFT runs, killed after one finished trial, restored.

One scenario, since every trial costs a TorchTrainer start (~30 s) plus its dev scoring here:

1. ``jobs/sweep.py`` runs in its own process group (it starts its own Ray); once one trial has its
   saved score, the whole group is SIGKILLed (the driver dies mid-sweep, as a lost head node would).
2. The same command runs again to the end. The finished trial is not retrained (its checkpoints and
   summary are byte-for-byte the same), the table holds each trial once, each trial's training run is
   a child of the one parent run (no duplicates), the best trial is the one the metric picks (ties by
   eval loss), and ``best/model`` loads with plain transformers with ``[RESET]`` a special token.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GRID = "params={optim.learning_rate: [1e-3, 3e-3], optim.max_steps: [1, 2]}"
FAST = ("base_overrides=[model.tiny.num_layers=1, data.synthetic.num_train_pairs=64, data.max_length=256, "
        "optim.global_batch_size=8, optim.micro_batch_size=2, optim.warmup_ratio=0, run.save_steps=1, "
        "run.num_to_keep=1]")
TRIALS = ["lr=0.001,steps=1", "lr=0.001,steps=2", "lr=0.003,steps=1", "lr=0.003,steps=2"]


def command(run_dir: Path) -> list[str]:
    config = REPO / "jobs/configs/sweep_demo.yaml"
    return [sys.executable, str(REPO / "jobs/sweep.py"), "--config", str(config), f"run_dir={run_dir}",
            "grid=params", GRID, FAST, "selection.dev.limit=8", "selection.dev.eval_loss_limit=8",
            "selection.decode.max_new_tokens=16", "mlflow_experiment=test-sweep"]


def start(run_dir: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_TRAIN_V2_ENABLED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(command(run_dir), cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def snapshot(trial_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under a trial's checkpoints and its summary: (size, mtime in ns)."""
    files = [p for p in trial_dir.glob("checkpoint-*/**/*") if p.is_file()] + [trial_dir / "summary.json"]
    return {str(p.relative_to(trial_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def test_sweep_completes_restores_and_selects_the_best(tmp_path):
    run_dir = tmp_path / "sweep"
    trials_dir = run_dir / "trials"

    # ---- 1. run until one trial is finished and scored, then kill the driver's whole process group
    proc = start(run_dir, tmp_path / "first.log")
    deadline = time.time() + 420
    try:
        while time.time() < deadline and proc.poll() is None:
            if list(trials_dir.glob("*/sweep_score.json")):
                break
            time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = [p.parent.name for p in trials_dir.glob("*/sweep_score.json")]
    assert finished, (tmp_path / "first.log").read_text()[-3000:]
    assert not (run_dir / "results.csv").exists(), "the sweep finished before it was killed"
    before = {name: snapshot(trials_dir / name) for name in finished}
    assert all(any(k.startswith("checkpoint-") for k in snap) for snap in before.values())

    # ---- 2. the same command again: the remaining trials run, the finished ones are not retrained
    proc = start(run_dir, tmp_path / "second.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-5000:]
    for name in finished:
        assert snapshot(trials_dir / name) == before[name], f"{name} was retrained"

    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in rows) == sorted(TRIALS)  # every trial exactly once

    # the best: lowest dev unsafe rate, ties by the lower eval loss, then grid order
    def key(i_r):
        i, r = i_r
        return (float(r["dev_unsafe_rate"]), float(r["eval_loss"]), i)

    expected = min(enumerate(rows), key=key)[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_trial"] == expected["trial"]
    best_model = run_dir / "best" / "model"
    assert best_model.resolve() == (trials_dir / expected["trial"] / "model").resolve()
    assert (run_dir / "heatmap.png").stat().st_size > 1000

    # MLflow: one parent; each trial's training run is its child, once, with the dev metrics
    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("test-sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == summary["mlflow"]["parent_run_id"]
    assert parents[0].data.tags["sweep.best_trial"] == expected["trial"]
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.csv", "heatmap.png", "loss_curves.png"} <= artifacts
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(TRIALS)
    assert len(runs) == 1 + len(TRIALS)  # no duplicate run after the restore
    for r in children:
        row = next(x for x in rows if x["trial"] == r.info.run_name)
        assert r.info.run_id == row["mlflow_run_id"]
        assert math.isclose(r.data.metrics["eval_loss"], float(row["eval_loss"]))
        assert r.data.params["optim.learning_rate"] == str(float(row["optim.learning_rate"]))

    # the chosen checkpoint loads with plain transformers, [RESET] intact
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(best_model)
    model = AutoModelForCausalLM.from_pretrained(best_model)
    assert "[RESET]" in tokenizer.all_special_tokens
    ids = tokenizer.encode("[RESET]", add_special_tokens=False)
    assert len(ids) == 1 and ids[0] < model.get_input_embeddings().weight.shape[0]
