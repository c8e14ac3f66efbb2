"""MLflow lineage of a pipeline on a real local sqlite store: with the pipeline's experiment and parent
run in the environment (as ``jobs/pipeline.py`` exports them), runs opened the way the jobs open them
nest under the pipeline's run, and an eval run walks through its tags to the training run that made its
model (and a DPO run to its SFT run); a crashed stage's run is FAILED and its rerun reuses it; the
experiment precedence rule and its error; metric names identical for every model."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from bt_ray import tracking
from bt_ray.attacks.config import AttackJobCfg
from bt_ray.config import ConfigError
from bt_ray.eval.config import EvalCfg
from bt_ray.models import BT_RAY_METADATA
from bt_ray.train.callbacks import checkpoint_metadata
from bt_ray.train.config import MLflowCfg
from bt_ray.tune.config import SweepCfg

PIPELINE_EXPERIMENT = "bt-ray-pipeline-demo"


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    """A store, the pipeline's experiment and parent run, exported as jobs/pipeline.py exports them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking.ENV_EXPERIMENT, PIPELINE_EXPERIMENT)
    monkeypatch.delenv(tracking.ENV_PARENT_RUN_ID, raising=False)
    parent = tracking.Run.start(uri, PIPELINE_EXPERIMENT, "pipeline:demo", tmp_path / "mlartifacts")
    monkeypatch.setenv(tracking.ENV_PARENT_RUN_ID, parent.run_id)
    return SimpleNamespace(uri=uri, parent=parent, root=tmp_path, client=tracking.client(uri))


def _train(p, name: str, start_model: str) -> tuple[tracking.StageRun, str]:
    """A training stage's run as ``bt_ray.train.job.run_stage`` opens it, and its model dir with the
    ``bt_ray.json`` the checkpoint callback writes (Ray Train itself is the integration tests')."""
    run_dir = p.root / "runs" / name
    experiment = tracking.experiment_name(MLflowCfg(), "experiment", "mlflow.experiment")
    run = tracking.StageRun(p.uri, experiment, run_dir, name)
    run.set_tags({"stage": "sft", "model": start_model} | tracking.lineage_tags(start_model))
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True)
    loop_config = {"stage": "sft", "cfg": {}, "git_sha": "abc",
                   "mlflow": {"tracking_uri": p.uri, "run_id": run.run_id}}
    meta = checkpoint_metadata(loop_config, SimpleNamespace(global_step=2, max_steps=2))
    (model_dir / BT_RAY_METADATA).write_text(json.dumps(meta))
    run.set_tags({tracking.TAG_FINAL_MODEL: str(model_dir), "global_step": 2})
    run.end("FINISHED")
    return run, str(model_dir)


def _eval(p, models: dict[str, str]) -> dict[str, str]:
    """Eval runs as ``jobs/eval.py`` opens them: a parent for several models, a child per model."""
    experiment = tracking.experiment_name(EvalCfg(), "mlflow_experiment")
    store = dict(tracking_uri=p.uri, experiment=experiment, artifact_dir=p.root / "eval" / "mlflow-artifacts")
    key = f"eval:{p.root / 'eval'}"
    ids = {}
    with tracking.Run.start(**store, run_name="eval:eval", tags={"stage": "eval"}, reuse_key=key) as parent:
        for label, name in models.items():
            tags = {"stage": "eval", "model": name} | tracking.lineage_tags(name)
            with tracking.Run.start(**store, run_name=label, parent=parent, tags=tags,
                                    reuse_key=f"{key}:{label}") as run:
                run.log_metrics({"synthetic.unsafe_rate": 0.25})
                ids[label] = run.run_id
    ids["parent"] = parent.run_id
    return ids


def test_an_eval_run_walks_to_the_training_runs_under_one_pipeline_run(pipeline):
    p = pipeline
    sft, sft_model = _train(p, "sft-backtrack", "tiny")
    dpo, dpo_model = _train(p, "dpo-backtrack", sft_model)
    ids = _eval(p, {"sft-backtrack": sft_model, "dpo-backtrack": dpo_model})

    run = p.client.get_run(ids["dpo-backtrack"])
    tags = run.data.tags
    assert tags[tracking.TAG_MODEL_DIR] == dpo_model
    trained = p.client.get_run(tags[tracking.TAG_TRAIN_RUN_ID])  # the number's model -> its training run
    assert trained.info.run_id == dpo.run_id
    assert trained.data.tags[tracking.TAG_FINAL_MODEL] == tags[tracking.TAG_MODEL_DIR]
    assert tags[tracking.TAG_TRAIN_TRACKING_URI] == p.uri
    # the DPO run names the SFT run it started from, whose final model is the DPO run's start
    sft_run = p.client.get_run(trained.data.tags[tracking.TAG_TRAIN_RUN_ID])
    assert sft_run.info.run_id == sft.run_id
    assert sft_run.data.tags[tracking.TAG_FINAL_MODEL] == sft_model
    assert trained.data.tags[tracking.TAG_MODEL_DIR] == sft_model
    assert tracking.TAG_TRAIN_RUN_ID not in sft_run.data.tags  # it started from a preset

    # one experiment; the training runs and the eval's top run are children of the pipeline's run
    experiment = p.client.get_experiment_by_name(PIPELINE_EXPERIMENT).experiment_id
    runs = {r.info.run_id: r for r in p.client.search_runs([experiment])}
    assert set(runs) == {p.parent.run_id, sft.run_id, dpo.run_id, *ids.values()}
    parent_of = {i: r.data.tags.get(tracking.TAG_PARENT_RUN_ID) for i, r in runs.items()}
    assert parent_of[sft.run_id] == parent_of[dpo.run_id] == parent_of[ids["parent"]] == p.parent.run_id
    assert parent_of[ids["sft-backtrack"]] == parent_of[ids["dpo-backtrack"]] == ids["parent"]
    assert parent_of[p.parent.run_id] is None


def test_a_crashed_stage_run_is_failed_and_its_rerun_reuses_it(pipeline):
    p = pipeline
    store = dict(tracking_uri=p.uri, experiment=PIPELINE_EXPERIMENT, artifact_dir=p.root / "art",
                 reuse_key=f"attack:{p.root}:prefill")
    with pytest.raises(RuntimeError, match="judge died"):
        with tracking.Run.start(**store, run_name="attack:prefill") as run:
            run.log_params({"attack.kind": "prefill", "seed": 0})
            raise RuntimeError("judge died")
    first = p.client.get_run(run.run_id)
    assert first.info.status == "FAILED" and not run.resumed

    with tracking.Run.start(**store, run_name="attack:prefill") as again:
        assert again.run_id == run.run_id and again.resumed
        assert p.client.get_run(again.run_id).info.status == "RUNNING"
        again.log_params({"attack.kind": "prefill", "seed": 1})  # a reused run keeps its first params
    done = p.client.get_run(run.run_id)
    assert done.info.status == "FINISHED" and done.data.params["seed"] == "0"
    named = p.client.search_runs([first.info.experiment_id], "attributes.run_name = 'attack:prefill'")
    assert [r.info.run_id for r in named] == [run.run_id]
    # the same key under another parent, or another key (another run dir) with the same name: new runs
    with tracking.Run.start(**store, run_name="attack:prefill", parent=again) as other:
        assert other.run_id != run.run_id and not other.resumed
    store["reuse_key"] = f"attack:{p.root / 'elsewhere'}:prefill"
    with tracking.Run.start(**store, run_name="attack:prefill") as elsewhere:
        assert elsewhere.run_id != run.run_id and not elsewhere.resumed


def test_an_eval_run_named_like_a_training_run_is_not_that_run(pipeline):
    """Under the pipeline's run, a one-model eval's run and the training run share the label."""
    p = pipeline
    sft, model = _train(p, "sft-backtrack", "tiny")
    experiment = tracking.experiment_name(EvalCfg(), "mlflow_experiment")
    with tracking.Run.start(p.uri, experiment, "sft-backtrack", p.root, tags=tracking.lineage_tags(model),
                            reuse_key=f"eval:{p.root / 'eval'}:sft-backtrack") as run:
        assert run.run_id != sft.run_id and not run.resumed
    assert p.client.get_run(run.run_id).data.tags[tracking.TAG_TRAIN_RUN_ID] == sft.run_id


def test_a_resumed_training_run_stays_under_its_parent(pipeline, monkeypatch):
    p = pipeline
    run_dir = p.root / "runs" / "sft-baseline"
    first = tracking.StageRun(p.uri, PIPELINE_EXPERIMENT, run_dir, "sft-baseline")
    first.end("FAILED")
    again = tracking.StageRun(p.uri, PIPELINE_EXPERIMENT, run_dir, "sft-baseline")
    assert again.resumed and again.run_id == first.run_id
    assert p.client.get_run(again.run_id).data.tags[tracking.TAG_PARENT_RUN_ID] == p.parent.run_id


def test_without_a_pipeline_runs_are_top_level_and_not_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.ENV_PARENT_RUN_ID, raising=False)
    monkeypatch.delenv(tracking.ENV_EXPERIMENT, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a = tracking.Run.start(uri, "bt-ray-eval", "baseline", tmp_path, reuse_key="eval:x:baseline")
    b = tracking.Run.start(uri, "bt-ray-eval", "baseline", tmp_path, reuse_key="eval:x:baseline")
    assert a.run_id != b.run_id
    assert tracking.TAG_PARENT_RUN_ID not in tracking.client(uri).get_run(a.run_id).data.tags


@pytest.mark.parametrize("owner, field, where", [
    (MLflowCfg(), "experiment", "mlflow.experiment"), (EvalCfg(), "mlflow_experiment", None),
    (AttackJobCfg(), "mlflow_experiment", None), (SweepCfg(), "mlflow_experiment", None)])
def test_the_pipeline_experiment_wins_over_a_default_and_a_different_explicit_one_is_an_error(
        owner, field, where, monkeypatch):
    monkeypatch.delenv(tracking.ENV_EXPERIMENT, raising=False)
    default = getattr(owner, field)
    assert tracking.experiment_name(owner, field, where) == default
    mine = dataclasses.replace(owner, **{field: "mine"})
    assert tracking.experiment_name(mine, field, where) == "mine"
    monkeypatch.setenv(tracking.ENV_EXPERIMENT, "pipe")
    assert tracking.experiment_name(owner, field, where) == "pipe"  # the job's default gives way
    assert tracking.experiment_name(dataclasses.replace(owner, **{field: "pipe"}), field, where) == "pipe"
    with pytest.raises(ConfigError) as e:
        tracking.experiment_name(mine, field, where)
    assert f"{where or field}='mine'" in str(e.value) and "MLFLOW_EXPERIMENT_NAME='pipe'" in str(e.value)


def test_a_parent_run_of_another_experiment_or_store_is_an_error(pipeline, monkeypatch):
    p = pipeline
    with pytest.raises(ValueError, match=f"is in experiment '{PIPELINE_EXPERIMENT}'.*'elsewhere'"):
        tracking.Run.start(p.uri, "elsewhere", "eval:x", p.root)
    monkeypatch.setenv(tracking.ENV_PARENT_RUN_ID, "0" * 32)
    with pytest.raises(ValueError, match="is not a live run of the MLflow store"):
        tracking.Run.start(p.uri, PIPELINE_EXPERIMENT, "eval:x", p.root)


def _eval_row(harmful: bool, unsafe: bool, reset: bool, kept: float | None, prompt: int) -> dict:
    return {"dataset": "synthetic", "harmful": harmful, "unsafe": unsafe, "reset": reset,
            "reset_last_turn": reset, "score": 0.5, "num_discarded_tokens": 3 if reset else 0,
            "num_output_tokens": 10, "error": None, "prompt_index": prompt, "sample": 0,
            "time_to_first_kept_token_s": kept, "cluster": None, "stopped": True, "empty_shown": kept is None,
            "turns": ["hi"], "judge": "synthetic-exact", "stand_in": False}


def test_eval_metric_names_are_the_same_for_baseline_and_backtracking():
    """Even for a backtracking model that reset on every prompt and kept no token (no latency)."""
    from bt_ray.eval.metrics import summarize, throughput
    from bt_ray.eval.report import flat_metrics

    harmful = [True, True, False, False]
    baseline = summarize([_eval_row(h, h, False, 0.1, i) for i, h in enumerate(harmful)])
    backtrack = summarize([_eval_row(h, False, True, None, i) for i, h in enumerate(harmful)])
    for m in (baseline, backtrack):
        m["throughput"] = throughput([], 1.0)
    a, b = flat_metrics(baseline), flat_metrics(backtrack)
    assert a.keys() == b.keys()
    assert a["synthetic.unsafe_rate"] == 1.0 and b["synthetic.unsafe_rate"] == 0.0
    assert math.isnan(b["synthetic.time_to_first_kept_token_s.p50"])
    assert a["synthetic.time_to_first_kept_token_s.p50"] == pytest.approx(0.1)


def test_attack_metric_names_are_the_same_when_a_model_has_no_judged_behaviour():
    from bt_ray.attacks.report import flat_metrics, summarize

    def row(unsafe, reset, variant="k=5"):
        return {"variant": variant, "unsafe": unsafe, "reset": reset, "empty_shown": False, "judge": "j",
                "stand_in": False, "cluster": 0, "compute": {"steps": 1, "seconds": 0.1, "forward": 1,
                                                             "backward": 0}}

    judged = flat_metrics(summarize([row(True, False), row(False, True)], num_resamples=10))
    errored = flat_metrics(summarize([row(None, False), row(None, False)], num_resamples=10))
    assert judged.keys() == errored.keys()
    assert judged["asr_k5"] == 0.5 and math.isnan(errored["asr_k5"]) and math.isnan(errored["asr_k5_ci_low"])
