"""jobs/eval.py end to end: rows, summary.json, one MLflow run per model under a parent, plots."""

from __future__ import annotations

import dataclasses
import json
import runpy
import shutil

import pytest

from bt_ray import config
from bt_ray.eval.config import EvalCfg
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _job():
    return runpy.run_path(str(REPO / "jobs" / "eval.py"), run_name="bt_ray_eval_job")


def _overrides(tmp_path, extra=()):
    return [f"run_dir={tmp_path / 'run'}", "models=[tiny, tiny]", "labels=[baseline, backtrack]",
            "engine.kind=hf", "engine.num_actors=1", "engine.batch_size=8", "decode.max_new_tokens=8",
            'datasets=[{"name": "synthetic", "limit": 6}]', "worst_of_k=[]", "bias_sweep=[]", *extra]


def _mlflow_runs(summary):
    import mlflow

    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    return mlflow.search_runs(experiment_names=[summary["mlflow"]["experiment"]], output_format="list")


def _trained_copy(model_cfg, dest):
    """The tiny model as a tracked training stage leaves it: a dir whose bt_ray.json names its MLflow run."""
    from bt_ray.models import materialize

    shutil.copytree(materialize(dataclasses.replace(model_cfg, name="tiny")), dest)
    meta = json.loads((dest / "bt_ray.json").read_text())
    recorded = {"stage": "sft", "git_sha": "abc123", "mlflow_run_id": "f" * 32, "mlflow_tracking_uri": "sqlite:///t.db"}
    (dest / "bt_ray.json").write_text(json.dumps(meta | recorded))
    return dest


def test_eval_job_two_models_parent_and_children(ray_cluster, tmp_path, monkeypatch):
    from bt_ray import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = _job()
    base = REPO / "jobs" / "configs" / "eval_tiny_synthetic.yaml"
    # "backtrack" is the same tiny model as a training run's dir: same outputs, plus lineage tags
    trained = _trained_copy(config.load(EvalCfg, base, []).model, tmp_path / "sft-model")
    cfg = config.load(EvalCfg, base, _overrides(tmp_path, [f"models=[tiny, {trained}]",
                                                           "compare=[[baseline, backtrack]]",
                                                           "bootstrap_resamples=200"]))
    summary = job["main"](cfg)

    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["models"].keys() == {"baseline", "backtrack"}
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    for label in ("baseline", "backtrack"):
        rows = (run / label / "main" / "rows.jsonl").read_text().splitlines()
        assert len(rows) == 6
    runs = {r.info.run_name: r for r in _mlflow_runs(summary)}
    parent = runs[f"eval:{run.name}"]
    children = [runs["baseline"], runs["backtrack"]]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert children[0].data.metrics.keys() == children[1].data.metrics.keys()  # compare view lines up
    assert "synthetic.unsafe_rate" in children[0].data.metrics
    assert summary["models"]["baseline"]["mlflow_run_id"] == runs["baseline"].info.run_id
    assert summary["mlflow"]["parent_run_id"] == parent.info.run_id
    assert all(r.info.status == "FINISHED" and r.data.tags["stage"] == "eval" for r in [parent, *children])
    # lineage: the model dir and the training run its bt_ray.json records; a preset has none
    tags = runs["backtrack"].data.tags
    assert tags[tracking.TAG_MODEL_DIR] == str(trained.resolve()) and tags[tracking.TAG_MODEL_STAGE] == "sft"
    assert tags[tracking.TAG_TRAIN_RUN_ID] == "f" * 32 and tags[tracking.TAG_MODEL_GIT_SHA] == "abc123"
    assert not any(k.startswith("lineage.") for k in runs["baseline"].data.tags)
    assert runs["baseline"].data.params.keys() == runs["backtrack"].data.params.keys()
    # artifacts under the run dir (explicit artifact_location), not Ray's temp dir
    assert (run / "mlflow-artifacts").is_dir()
    assert "unsafe % synthetic" in summary["table"] and "errors synthetic" in summary["table"]
    # paired comparison from the rows files: the same model twice, greedy, so every pair agrees
    (c,) = json.loads((run / "summary.json").read_text())["comparisons"]
    assert (c["baseline"], c["backtrack"], c["key"]) == ("baseline", "backtrack", "synthetic")
    lines = (run / "baseline" / "main" / "rows.jsonl").read_text().splitlines()
    synthetic = [json.loads(line) for line in lines]
    judged = [r for r in synthetic if r["harmful"] and not r["error"]]
    assert c["n"] == len(judged) and c["num_clusters"] == len({r["cluster"] for r in judged})
    assert c["difference"] == 0 and c["counts"]["baseline_only"] == c["counts"]["backtrack_only"] == 0
    assert c["mcnemar_p"] == 1.0 and c["holds"] is False


def test_eval_job_rejects_bad_config_naming_the_field(tmp_path):
    from bt_ray.config import ConfigError

    with pytest.raises(ConfigError) as e:
        config.load(EvalCfg, None, ["engine.num_actors=0", "labels=[a]", "models=[x, y]",
                                    'datasets=[{"name": "advbnech"}]', "decode.top_p=0"])
    msg = str(e.value)
    assert "engine.num_actors must be >= 1; got 0" in msg
    assert "labels must be empty or give one label per model" in msg
    assert "datasets[0].name must be one of" in msg and "decode.top_p must be in (0, 1]" in msg


@pytest.mark.slow
def test_eval_job_sweep_worst_of_k_and_plot(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.load(EvalCfg, REPO / "jobs" / "configs" / "eval_tiny_synthetic.yaml",
                      _overrides(tmp_path, ["models=[tiny]", "labels=[]", "worst_of_k=[1, 3]",
                                            "bias_sweep=[-100.0, 100.0]"]))
    summary = _job()["main"](cfg)
    metrics = summary["models"]["tiny"]["metrics"]
    low, high = metrics["bias_sweep"]
    assert low["reset_rate_safe"] == 0.0 and high["reset_rate_safe"] == 1.0  # b = +100 always resets
    assert metrics["worst_of_k"][1]["rate"] <= metrics["worst_of_k"][3]["rate"]
    png = tmp_path / "run" / "tiny" / "bias_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in summary["figures"]


def test_eval_job_rejects_a_missing_model_dir_naming_it(tmp_path):
    cfg = config.load(EvalCfg, None, [f"models=[tiny, {tmp_path / 'nope'}]"])
    with pytest.raises(ValueError, match=r"models\[1\] must be a preset .*no such directory"):
        _job()["labels_of"](cfg)
