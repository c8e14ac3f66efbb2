"""Sweep grids and trial configs (no Ray): the paper's grids, deterministic names, bad input caught early."""

from __future__ import annotations

import math

import pytest

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.tune.config import SweepCfg
from bt_ray.tune.grid import expand, trial_configs, trial_name
from bt_ray.tune.report import pick_best
from tests.conftest import REPO

SFT_LRS = (2e-6, 5e-6, 1e-5, 2e-5, 5e-5)
DPO_LRS = (1e-7, 2e-7, 5e-7, 1e-6, 2e-6)
BETAS = (0.025, 0.05, 0.1, 0.2)


def sweep(tmp_path, *overrides: str, path: str | None = None) -> SweepCfg:
    return config.load(SweepCfg, path, [f"run_dir={tmp_path / 'sweep'}", *overrides])


@pytest.mark.parametrize("recipe", ["backtrack-sft", "baseline-sft"])
def test_paper_sft_grid_is_ten_trials_of_the_papers_values(tmp_path, recipe):
    cfg = sweep(tmp_path, f"base_overrides=[data.recipe={recipe}]",
                path=REPO / "jobs/configs/sweep_paper_sft.yaml")
    trials = expand(cfg)
    assert len(trials) == 10
    assert sorted((t.params["optim.learning_rate"], t.params["optim.num_epochs"]) for t in trials) == \
        sorted((lr, e) for lr in SFT_LRS for e in (1, 3))
    jobs, _ = trial_configs(cfg)
    assert set(jobs) == {t.name for t in trials}
    for t in trials:
        job = jobs[t.name]
        assert job.data.recipe == recipe
        assert (job.optim.learning_rate, job.optim.num_epochs) == (t.params["optim.learning_rate"],
                                                                   t.params["optim.num_epochs"])
        assert job.optim.global_batch_size == 128
        assert job.run.name == t.name and job.run.root == str(tmp_path.resolve() / "sweep" / "trials")
        assert job.mlflow.experiment == cfg.mlflow_experiment


@pytest.mark.parametrize("recipe", ["backtrack-dpo", "baseline-dpo"])
def test_paper_dpo_grid_is_twenty_trials_of_the_papers_values(tmp_path, recipe):
    cfg = sweep(tmp_path, f"base_overrides=[data.recipe={recipe}]",
                path=REPO / "jobs/configs/sweep_paper_dpo.yaml")
    trials = expand(cfg)
    assert len(trials) == 20
    jobs, _ = trial_configs(cfg)
    got = sorted((jobs[t.name].dpo.beta, jobs[t.name].optim.learning_rate) for t in trials)
    assert got == sorted((b, lr) for b in BETAS for lr in DPO_LRS)
    assert {(j.optim.num_epochs, j.optim.global_batch_size, j.data.recipe) for j in jobs.values()} == \
        {(1.0, 128, recipe)}


def test_trial_names_are_readable_and_deterministic(tmp_path):
    assert trial_name({"optim.learning_rate": 1e-5, "optim.num_epochs": 3}) == "lr=1e-05,epochs=3"
    assert trial_name({"dpo.beta": 0.025, "optim.learning_rate": 2e-7}) == "beta=0.025,lr=2e-07"
    cfg = sweep(tmp_path, path=REPO / "jobs/configs/sweep_paper_sft.yaml")
    first, again = [t.name for t in expand(cfg)], [t.name for t in expand(cfg)]
    assert first == again and len(set(first)) == 10
    assert first[:2] == ["lr=2e-06,epochs=1", "lr=2e-06,epochs=3"]


def test_user_params_grid_and_seeded_random_search(tmp_path):
    base = ["grid=params", "params={optim.learning_rate: [1e-3, 2e-3, 3e-3], optim.seed: [0, 1]}"]
    cfg = sweep(tmp_path, *base)
    assert [t.name for t in expand(cfg)][:3] == ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.002,seed=0"]
    jobs, _ = trial_configs(cfg)
    assert jobs["lr=0.003,seed=1"].optim.learning_rate == 3e-3 and jobs["lr=0.003,seed=1"].optim.seed == 1
    rand = [*base, "search.kind=random", "search.num_samples=3"]
    drawn = [t.name for t in expand(sweep(tmp_path, *rand))]
    assert len(drawn) == 3 and len(set(drawn)) == 3
    assert drawn == [t.name for t in expand(sweep(tmp_path, *rand))]
    other = [t.name for t in expand(sweep(tmp_path, *rand, "search.seed=7"))]
    assert set(drawn) <= {t.name for t in expand(cfg)} and set(other) <= {t.name for t in expand(cfg)}


def test_empty_grid_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="params must name at least one field"):
        sweep(tmp_path, "grid=params")
    with pytest.raises(ConfigError, match="non-empty list of values"):
        sweep(tmp_path, "grid=params", "params={optim.learning_rate: []}")


def test_unknown_grid_name_and_wrong_stage_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="grid must be one of paper-sft, paper-dpo, demo.*got 'paper-xyz'"):
        expand(sweep(tmp_path, "grid=paper-xyz"))
    with pytest.raises(ConfigError, match="grid 'paper-dpo' sweeps the dpo stage, but stage is 'sft'"):
        expand(sweep(tmp_path, "grid=paper-dpo"))


def test_a_field_that_does_not_exist_is_refused_for_every_trial_at_once(tmp_path):
    cfg = sweep(tmp_path, "grid=params", "params={optim.lr: [1e-3, 2e-3]}", "base_overrides=[optim.warmup=0]")
    with pytest.raises(ConfigError) as e:
        trial_configs(cfg)
    text = str(e.value)
    assert "optim.lr: unknown key" in text and "optim.warmup: unknown key" in text
    assert "lr=0.001; lr=0.002" in text  # each problem names the trials it concerns
    bad_value = sweep(tmp_path, "grid=params", "params={optim.learning_rate: [-1.0, 1e-3]}")
    with pytest.raises(ConfigError, match=r"optim.learning_rate.*must be > 0.*\(trials: lr=-1\)"):
        trial_configs(bad_value)
    with pytest.raises(ConfigError, match="base_config: file not found"):
        trial_configs(sweep(tmp_path, "base_config=missing.yaml"))


def test_a_metric_no_trial_reports_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="selection.metric must be a metric every trial reports"):
        sweep(tmp_path, "selection.metric=dev_accuracy")
    with pytest.raises(ValueError, match="no trial reported a value"):
        pick_best([{"trial": "a", "dev_unsafe_rate": None, "eval_loss": 1.0}], "dev_unsafe_rate", "min")


def test_best_trial_by_metric_then_eval_loss():
    rows = [{"trial": "a", "dev_unsafe_rate": 0.5, "eval_loss": 1.0},
            {"trial": "b", "dev_unsafe_rate": 0.25, "eval_loss": 2.0},
            {"trial": "c", "dev_unsafe_rate": 0.25, "eval_loss": 1.5},
            {"trial": "d", "dev_unsafe_rate": math.nan, "eval_loss": 0.1}]
    assert pick_best(rows, "dev_unsafe_rate", "min")["trial"] == "c"
    assert pick_best(rows, "dev_unsafe_rate", "max")["trial"] == "a"
    assert pick_best(rows, "eval_loss", "min")["trial"] == "d"


def test_concurrency_comes_from_the_resources_a_trial_needs_and_the_cluster_has(tmp_path):
    from bt_ray.tune.resources import concurrency

    gpu = ["base_overrides=[scaling.use_gpu=true, scaling.num_workers=2, scaling.cpus_per_worker=1]",
           "selection.engine.num_gpus_per_actor=1"]
    jobs, _ = trial_configs(sweep(tmp_path, *gpu))
    assert concurrency(sweep(tmp_path, *gpu), jobs, {"CPU": 64, "GPU": 8}) == 4  # 8 GPUs at 2 per trial
    assert concurrency(sweep(tmp_path, *gpu, "max_concurrent_trials=3"), jobs, {"CPU": 64, "GPU": 8}) == 3
    cpu_jobs, _ = trial_configs(sweep(tmp_path))
    assert concurrency(sweep(tmp_path), cpu_jobs, {"CPU": 4}) == 2  # 2 workers x 1 CPU


def test_a_trial_needing_more_than_the_cluster_has_is_refused(tmp_path):
    from bt_ray.tune.resources import concurrency

    cfg = sweep(tmp_path, "base_overrides=[scaling.use_gpu=true, scaling.num_workers=16]")
    jobs, _ = trial_configs(cfg)
    with pytest.raises(RuntimeError, match=r"lr=0.0005,epochs=1: needs 16 GPU but the cluster has 8"):
        concurrency(cfg, jobs, {"CPU": 256, "GPU": 8})
    cfg = sweep(tmp_path, "base_overrides=[scaling.num_workers=8]")
    with pytest.raises(RuntimeError, match="needs 8 CPU but the cluster has 4"):
        concurrency(cfg, trial_configs(cfg)[0], {"CPU": 4})
