"""The demo preset end to end, as a user runs it: killed mid-stage and rerun, and through ``ray job submit``.

Slow (each pipeline run is every real job on the tiny model: about 4-6 min on 2 shared cores):

* killed with SIGKILL (its whole process group, Ray's local processes included) while a training stage
  runs, then rerun: the stages done before are skipped, the killed stage resumes from its checkpoint, and
  the results (eval metrics, comparisons, attack results) equal those of an uninterrupted run;
* ``ray job submit --working-dir . -- python jobs/pipeline.py --preset demo`` against a local
  ``ray start --head`` (tests/integration/test_train_job_submit.py's cluster) succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.test_train_job_submit import head_node, submit  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Tiny sizes: few pairs, few steps, few eval prompts, no sweep, no DPO, an attack on 2 behaviours, serve on.
SMOKE = ["synthetic.num_train_pairs=32", "synthetic.num_pretrain_examples=64",
         "synthetic.num_eval_prompts=16", "model.tiny.num_layers=1", "dpo_config=null",
         "stage_overrides=[optim.max_steps=3,run.save_steps=1,data.max_length=256,optim.global_batch_size=8,"
         "optim.micro_batch_size=2]",
         'eval_overrides=[engine.kind=hf,engine.num_actors=1,"worst_of_k=[2]",bootstrap_resamples=200]',
         'attack_overrides=[behaviours.limit=2,"attack.prefill.ks=[0,5]"]', "ray_num_cpus=3"]
VOLATILE = ("wall", "throughput", "time", "seconds", "latency", "first_kept", "mlflow", "run_id", "started")


def pipeline(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "jobs/pipeline.py", "--preset", "demo", f"run_dir={run_dir}", *SMOKE, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def results(run_dir: Path) -> dict:
    """What the report is made of, without times, run ids or paths: eval metrics and comparisons, the
    attack results per behaviour, the serve check's answers."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not any(w in k for w in VOLATILE)}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x.replace(str(run_dir), "RUN") if isinstance(x, str) else x

    summary = json.loads((run_dir / "summary.json").read_text())
    attack_rows = {str(p.relative_to(run_dir)): [json.loads(line) for line in p.read_text().splitlines()]
                   for p in sorted((run_dir / "attacks").glob("*/*/results.jsonl"))}
    for rows in attack_rows.values():
        rows.sort(key=lambda r: (r.get("behaviour", ""), r.get("variant", "")))
    return clean({"eval": {k: m["metrics"] for k, m in summary["eval"]["models"].items()},
                  "comparisons": summary["eval"]["comparisons"], "attacks": attack_rows,
                  "served": summary["served"]})


def walk_lineage(run_dir: Path) -> None:
    """Every eval, attack and serve-check run of the pipeline names the training run behind its model
    (``lineage.train_run_id``), whose ``final_model`` is that model dir; all under one pipeline run."""
    from mlflow.tracking import MlflowClient

    from bt_ray.tracking import TAG_FINAL_MODEL, TAG_MODEL_DIR, TAG_PARENT_RUN_ID, TAG_TRAIN_RUN_ID

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    pipeline_run = client.get_run((run_dir / "stages" / "pipeline_run_id").read_text().strip())
    runs = client.search_runs([pipeline_run.info.experiment_id])
    ids = {r.info.run_id for r in runs}
    assert len({r.info.experiment_id for r in runs}) == 1
    children = [r for r in runs if r.info.run_id != pipeline_run.info.run_id]
    assert all(r.data.tags.get(TAG_PARENT_RUN_ID) in ids for r in children)  # all nested under the pipeline
    walked = set()
    for r in runs:
        stage = r.data.tags.get("stage")
        if stage in ("eval", "attack", "serve") and TAG_MODEL_DIR in r.data.tags:
            trained = client.get_run(r.data.tags[TAG_TRAIN_RUN_ID])
            assert trained.data.tags[TAG_FINAL_MODEL] == r.data.tags[TAG_MODEL_DIR], r.info.run_name
            walked.add(stage)
    assert walked == {"eval", "attack", "serve"}, walked


def test_killed_mid_stage_then_rerun_skips_done_stages_resumes_and_matches_an_uninterrupted_run(tmp_path):
    t0 = time.perf_counter()
    whole = tmp_path / "whole"
    out = finish(pipeline(whole))
    wall = time.perf_counter() - t0
    lines = out.splitlines()
    assert len(lines) <= 150, f"{len(lines)} lines printed"
    assert "Table 1" in out and f"report: {whole / 'report.md'}" in out and (whole / "report.md").is_file()
    assert not any("WARNING" in line or "(pid=" in line for line in lines), out  # worker logs stay in files
    print(f"uninterrupted smoke pipeline: {len(lines)} lines, {wall:.0f}s")
    walk_lineage(whole)

    killed = tmp_path / "killed"
    proc = pipeline(killed)
    stage = killed / "runs" / "sft-backtrack"
    deadline = time.time() + 900
    while not list(stage.glob("checkpoint-*")):  # sft-backtrack has saved a checkpoint: kill it there
        assert proc.poll() is None and time.time() < deadline, "the pipeline ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (killed / "stages" / "sft-backtrack.json").exists()
    assert (killed / "stages" / "sft-baseline.json").exists()
    parent = (killed / "stages" / "pipeline_run_id").read_text().strip()

    out = finish(pipeline(killed))
    for done in ("model", "pretrain", "sft-baseline"):
        assert f"-- {done}: done before with this config, skipped" in out, out
    assert "-> sft-backtrack" in out and "-> eval" in out
    assert "resuming from checkpoint-" in (killed / "logs" / "sft-backtrack.log").read_text()
    assert (killed / "stages" / "pipeline_run_id").read_text().strip() == parent  # the same MLflow parent run
    assert results(killed) == results(whole)

    out = finish(pipeline(killed))  # a third run: everything is done
    assert [line for line in out.splitlines() if line.startswith("-> ")] == ["-> report"], out


def test_ray_job_submit_runs_the_demo_preset(head_node, tmp_path):  # noqa: F811
    address, env = head_node
    run_dir = tmp_path / "submitted"
    out = submit(address, env, "jobs/pipeline.py", ["--preset", "demo", f"run_dir={run_dir}", *SMOKE])
    assert "== done" in out and "Table 1" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["models"]) == {"pretrain", "baseline-sft", "backtrack-sft"}
    assert summary["stages"]["skipped"] == [] and "eval" in summary["stages"]["ran"]
