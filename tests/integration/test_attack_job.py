"""jobs/attack.py end to end: Ray tasks per behaviour, resumable results, summary, MLflow, Table 2, and
bad input refused before any task starts."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest

from bt_ray import config
from bt_ray.attacks.config import AttackJobCfg
from bt_ray.config import ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _job():
    return runpy.run_path(str(REPO / "jobs" / "attack.py"), run_name="bt_ray_attack_job")


def _overrides(tmp_path, extra=()):
    return [f"run_dir={tmp_path / 'run'}", "models=[tiny, tiny]", "labels=[baseline, backtrack]",
            "compare=[[baseline, backtrack]]", "behaviours.dataset=synthetic", "behaviours.limit=6",
            "decode.max_new_tokens=8", "attack.kind=prefill", "attack.prefill.ks=[0, 2, 4]",
            "attack.num_cpus=0.5", *extra]


def test_prefill_job_writes_results_summary_table_and_mlflow(ray_cluster, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = _job()["main"](config.load(AttackJobCfg, None, _overrides(tmp_path)))
    run = tmp_path / "run"
    for label in ("baseline", "backtrack"):
        lines = (run / label / "prefill" / "results.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert sorted(r["behaviour"] for r in records) == sorted({r["behaviour"] for r in records})
        assert len(records) == 6 and all(len(r["rows"]) == 3 for r in records)  # one row per k
        per_k = json.loads((run / label / "prefill" / "summary.json").read_text())
        assert list(per_k) == ["k=0", "k=2", "k=4"] and per_k["k=2"]["asr"]["n"] == 6
        assert per_k["k=0"]["judge"] == ["synthetic-exact"] and per_k["k=0"]["stand_in"] is False
    table = (run / "table2.md").read_text()
    assert "| baseline |" in table and "| backtrack |" in table and "prefill (k=4)" in table
    # the same tiny model twice: the paired difference is exactly 0 at every k, with its interval
    assert "| prefill (baseline - backtrack) | k=2 | +0.0 pts |" in table
    assert set(summary["paired"]["baseline - backtrack"]["prefill"]) == {"k=0", "k=2", "k=4"}
    assert (run / "prefill_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["bt-ray-attack"], output_format="list")
    parent = summary["mlflow"]["parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.info.run_name for r in children) == ["prefill:backtrack", "prefill:baseline"]
    names = [set(r.data.metrics) for r in children]
    assert names[0] == names[1] and {"asr_k2", "reset_rate_k2", "asr_k2_ci_high"} <= names[0]


def test_a_killed_run_resumes_without_recomputing_finished_behaviours(ray_cluster, tmp_path):
    """Kill the job (SIGKILL) once some behaviours are written; the same command then finishes the rest,
    leaves what was written byte for byte, and every behaviour is in the table exactly once."""
    overrides = _overrides(tmp_path, ["models=[tiny]", "labels=[tiny]", "compare=[]", "behaviours.limit=12",
                                      "attack.num_cpus=1", "ray_num_cpus=1"])
    results = tmp_path / "run" / "tiny" / "prefill" / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "jobs/attack.py", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (results.exists() and len(results.read_text().splitlines()) >= 3):
            assert proc.poll() is None, "the job ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = results.read_text()
    done_before = [json.loads(line)["behaviour"] for line in before.splitlines() if line.endswith("}")]
    assert 3 <= len(done_before) < 12

    _job()["main"](config.load(AttackJobCfg, None, overrides))
    after = results.read_text()
    kept = before if before.endswith("\n") else before[: before.rfind("\n") + 1]  # a torn line is redone
    assert after.startswith(kept)  # nothing finished before was recomputed or rewritten
    ids = [json.loads(line)["behaviour"] for line in after.splitlines()]
    assert len(ids) == len(set(ids)) == 12
    summary = json.loads((tmp_path / "run" / "tiny" / "prefill" / "summary.json").read_text())
    assert summary["k=2"]["asr"]["n"] == 12


@pytest.mark.parametrize("override,message", [
    ("attack.kind=fgsm", "attack.kind must be one of"),
    ("attack.max_steps=0", "attack.max_steps must be >= 1"),
    ("attack.max_seconds=0", "attack.max_seconds must be > 0"),
])
def test_bad_attack_config_is_refused_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(AttackJobCfg, None, _overrides(tmp_path, [override]))


def test_a_k_beyond_a_targets_length_is_refused_before_any_task(tmp_path):
    cfg = config.load(AttackJobCfg, None, _overrides(tmp_path, ["attack.prefill.ks=[0, 100000]"]))
    with pytest.raises(ValueError, match="100000"):
        _job()["preflight"](cfg, ["baseline", "backtrack"])
    assert not (tmp_path / "run" / "baseline").exists()
