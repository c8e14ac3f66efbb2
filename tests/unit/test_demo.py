"""The demo means what it says: its model and its world reach every stage (review A5).

The training and eval jobs are replaced by recorders of the configs they would run: what is under test
is the demo's plumbing; `make demo` runs the real jobs.
"""

from __future__ import annotations

import dataclasses
import runpy
from pathlib import Path

import pytest

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.demo import DemoCfg

REPO = Path(__file__).resolve().parents[2]
DEMO = runpy.run_path(str(REPO / "jobs" / "demo.py"))


@pytest.fixture()
def demo_cfg(monkeypatch) -> DemoCfg:
    monkeypatch.chdir(REPO)
    overrides = ["synthetic.seed=1", "synthetic.decorate_prob=0.5"]
    return config.load(DemoCfg, REPO / "jobs/configs/demo.yaml", overrides)


def _record(kind, seen):
    def main(cfg):
        seen.append((kind, cfg))
        out = Path("/nowhere") / cfg.run.name
        return {"model_dir": str(out / "model"), "run_dir": str(out)}
    return main


def test_demo_world_and_model_reach_every_training_stage(demo_cfg, tmp_path):
    seen: list = []
    jobs = {"sft": _record("sft", seen), "dpo": _record("dpo", seen)}
    stages = DEMO["train_stages"](demo_cfg, tmp_path, tmp_path / "model-init", jobs)
    assert list(stages) == ["pretrain", "baseline-sft", "baseline-dpo", "backtrack-sft", "backtrack-dpo"]
    assert len(seen) == 5
    for _, cfg in seen:
        # synthetic.seed=1 used to change only the printed preview, never what was trained
        assert cfg.data.synthetic == demo_cfg.synthetic
        assert cfg.run.root == str(tmp_path / "runs")
    assert seen[0][1].model.name == str(tmp_path / "model-init")  # the demo's model is the one trained
    assert seen[1][1].model.name == "/nowhere/pretrain/model"
    assert seen[2][1].model.name == "/nowhere/sft-baseline/model"
    assert [cfg.data.recipe for _, cfg in seen] == ["baseline-sft", "baseline-sft", "baseline-dpo",
                                                    "backtrack-sft", "backtrack-dpo"]


def test_demo_world_reaches_eval_with_the_pairs_it_compares(demo_cfg, tmp_path):
    models = {"pretrain": "/m/p", "baseline-sft": "/m/bs", "baseline-dpo": "/m/bd",
              "backtrack-sft": "/m/ks", "backtrack-dpo": "/m/kd"}  # the order the stages ran in
    cfg = DEMO["eval_stage_cfg"](demo_cfg, tmp_path, models)
    assert cfg.synthetic == demo_cfg.synthetic
    assert list(cfg.models) == ["/m/bs", "/m/ks", "/m/bd", "/m/kd"]
    pairs = [["baseline-sft", "backtrack-sft"], ["baseline-dpo", "backtrack-dpo"]]
    assert [list(p) for p in cfg.compare] == pairs


def test_demo_refuses_stage_overrides_that_fork_its_model_or_world():
    with pytest.raises(ConfigError, match="stage_overrides"):
        DemoCfg(stage_overrides=("data.synthetic.seed=3",))
    with pytest.raises(ConfigError, match="stage_overrides"):
        DemoCfg(stage_overrides=("model.name=smollm2-135m",))
    assert DemoCfg(stage_overrides=("optim.max_steps=4",)).stage_overrides == ("optim.max_steps=4",)


def test_demo_config_has_no_settings_that_feed_only_the_preview():
    names = {f.name for f in dataclasses.fields(DemoCfg)}
    assert not names & {"sources", "recipes", "prefix", "max_length"}


def test_demo_sweep_starts_from_the_pretrained_base_on_the_demo_world(demo_cfg, tmp_path):
    """The opt-in sweep (sweep_config) trains from the demo's base model, in the demo's world."""
    from bt_ray.tune.grid import trial_configs

    cfg = dataclasses.replace(demo_cfg, sweep_config="jobs/configs/sweep_demo.yaml")
    seen = []
    DEMO["sweep_stage"](cfg, tmp_path, "/m/pretrain", sweep_main=lambda c: seen.append(c) or {"ok": 1})
    (sweep,) = seen
    assert sweep.run_dir == str(tmp_path / "sweep")
    trials, _ = trial_configs(sweep)
    assert len(trials) == 4
    for job in trials.values():
        assert job.model.name == "/m/pretrain" and job.data.synthetic == demo_cfg.synthetic
