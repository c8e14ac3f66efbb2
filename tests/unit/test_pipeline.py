"""The pipeline's plumbing: presets load, stages get the pipeline's model and world, a stage runs once per
config, and the terminal stays within its line budget.

The jobs are replaced by recorders of the configs they would run (what is under test is the pipeline's
wiring); tests/integration/test_pipeline_job.py runs the real jobs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.pipeline import stages
from bt_ray.pipeline.config import PipelineCfg, load_preset, presets
from bt_ray.pipeline.console import Console
from bt_ray.pipeline.runner import StageRunner

REPO = Path(__file__).resolve().parents[2]
PRESETS = ["demo", "smollm2-cpu", "paper-gemma2-2b", "paper-llama3-8b"]


@pytest.fixture()
def demo(monkeypatch) -> PipelineCfg:
    monkeypatch.chdir(REPO)
    return load_preset("demo", overrides=["synthetic.seed=1", "synthetic.decorate_prob=0.5"])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_every_stage_config_validates(preset, monkeypatch, tmp_path):
    """A preset is only valid if each stage's job config, with the pipeline's overrides, is valid too."""
    monkeypatch.chdir(REPO)
    cfg = load_preset(preset)
    assert cfg.preset == preset and cfg.experiment == f"bt-ray-{preset}"
    assert (cfg.pretrain_config is not None) == (preset == "demo")
    assert cfg.cluster_only == preset.startswith("paper-")
    models = {label: f"/m/{label}" for label in stages.ALIGNED}
    for kind in ("baseline", "backtrack"):
        sft = stages.sft_cfg(cfg, tmp_path, "/m/base", kind)
        assert sft.model.name == "/m/base" and sft.data.recipe == f"{kind}-sft"
        assert sft.mlflow.experiment == cfg.experiment and sft.data.synthetic == cfg.synthetic
        assert stages.dpo_cfg(cfg, tmp_path, "/m/sft", kind).model.name == "/m/sft"
    if cfg.sweep_config:
        assert stages.sweep_cfg(cfg, tmp_path, "/m/base").mlflow_experiment == cfg.experiment
    ev = stages.eval_cfg(cfg, tmp_path, models)
    assert list(ev.labels) == stages.ALIGNED and ev.mlflow_experiment == cfg.experiment
    for kind in cfg.attacks:
        at = stages.attack_cfg(cfg, tmp_path, models, kind)
        assert at.attack.kind == kind and list(at.labels) == ["baseline-dpo", "backtrack-dpo"]
        assert [list(p) for p in at.compare] == [["baseline-dpo", "backtrack-dpo"]]
    assert stages.serve_cfg(cfg, "/m/kd").model.name == "/m/kd"
    if cfg.onpolicy_config:  # the on-policy file is made from the base model and read by SFT and DPO
        data = stages.onpolicy_cfg(cfg, tmp_path, "/m/base")
        assert data.model.name == "/m/base" and data.out == str(tmp_path / stages.ONPOLICY_FILE)
        for train in (stages.sft_cfg(cfg, tmp_path, "/m/base", "backtrack"),
                      stages.dpo_cfg(cfg, tmp_path, "/m/sft", "backtrack")):
            assert [(s.name, s.path) for s in train.data.sources] == [("jsonl", data.out)]
            assert train.data.judge_filter == "column" and train.data.path is None
    if cfg.eval_base:
        ev = stages.eval_cfg(cfg, tmp_path, {"base": "/m/base", **models})
        assert list(ev.labels) == ["base", *stages.ALIGNED] and ev.models[0] == "/m/base"
        assert [list(p) for p in ev.compare] == [["baseline-sft", "backtrack-sft"],
                                                 ["baseline-dpo", "backtrack-dpo"]]
    if cfg.calibrate_config:
        cal = stages.calibrate_cfg(cfg, tmp_path, {"base": "/m/base", **models})
        assert list(cal.labels) == ["backtrack-sft", "backtrack-dpo"]
        assert cal.mlflow_experiment == cfg.experiment
        assert list(cal.models) == ["/m/backtrack-sft", "/m/backtrack-dpo"]
    text = Path(config_path := REPO / f"jobs/configs/pipeline_{preset.replace('-', '_')}.yaml").read_text()
    if preset.startswith("paper-"):
        assert text.startswith("# CLUSTER-ONLY"), config_path
    if preset == "smollm2-cpu":
        assert "issue 11" in text.split("\npreset:")[0]


def test_presets_are_listed_and_an_unknown_one_is_named():
    assert presets() == sorted(PRESETS)
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known: demo"):
        load_preset("nope")


def test_pipeline_world_and_model_reach_every_training_stage(demo, tmp_path):
    """synthetic.seed=1 used to change only a printed preview, never what was trained (review A5)."""
    pre = stages.pretrain_cfg(demo, tmp_path, str(tmp_path / "model-init"))
    assert pre.model.name == str(tmp_path / "model-init") and pre.run.name == "pretrain"
    for job in (pre, stages.sft_cfg(demo, tmp_path, "/m/p", "backtrack"),
                stages.dpo_cfg(demo, tmp_path, "/m/s", "baseline")):
        assert job.data.synthetic == demo.synthetic
        assert job.run.root == str(tmp_path / "runs")


def test_pipeline_world_reaches_eval_and_attacks_with_the_pairs_they_compare(demo, tmp_path):
    models = {"pretrain": "/m/p", "baseline-sft": "/m/bs", "baseline-dpo": "/m/bd",
              "backtrack-sft": "/m/ks", "backtrack-dpo": "/m/kd"}  # the order the stages ran in
    cfg = stages.eval_cfg(demo, tmp_path, models)
    assert cfg.synthetic == demo.synthetic
    assert list(cfg.models) == ["/m/bs", "/m/ks", "/m/bd", "/m/kd"]
    pairs = [["baseline-sft", "backtrack-sft"], ["baseline-dpo", "backtrack-dpo"]]
    assert [list(p) for p in cfg.compare] == pairs
    attack = stages.attack_cfg(demo, tmp_path, models, "prefill")
    assert list(attack.models) == ["/m/bd", "/m/kd"] and attack.synthetic == demo.synthetic
    assert attack.behaviours.limit == 20  # the demo preset keeps the attack small
    no_dpo = stages.attack_cfg(demo, tmp_path, {"baseline-sft": "/m/bs", "backtrack-sft": "/m/ks"}, "prefill")
    assert list(no_dpo.labels) == ["baseline-sft", "backtrack-sft"]


def test_pipeline_refuses_overrides_that_fork_its_model_or_world():
    with pytest.raises(ConfigError, match="stage_overrides"):
        PipelineCfg(stage_overrides=("data.synthetic.seed=3",))
    with pytest.raises(ConfigError, match="stage_overrides"):
        PipelineCfg(stage_overrides=("model.name=smollm2-135m",))
    with pytest.raises(ConfigError, match="attacks"):
        PipelineCfg(attacks=("prefill", "nope"))
    assert PipelineCfg(stage_overrides=("optim.max_steps=4",)).stage_overrides == ("optim.max_steps=4",)


def test_pipeline_sweep_starts_from_the_base_model_on_the_pipeline_world(demo, tmp_path):
    from bt_ray.tune.grid import trial_configs

    sweep = stages.sweep_cfg(demo, tmp_path, "/m/pretrain")
    assert sweep.run_dir == str(tmp_path / "sweep")
    trials, _ = trial_configs(config.load(type(sweep), "jobs/configs/sweep_demo.yaml",
                                          ["base_overrides=" + json.dumps(list(sweep.base_overrides))]))
    assert len(trials) == 4
    for job in trials.values():
        assert job.model.name == "/m/pretrain" and job.data.synthetic == demo.synthetic


# ---------------------------------------------------------------- skip / resume markers


class Stub:
    """A stage that counts its runs, writes one output file and prints a lot (which must not show)."""

    def __init__(self, out: Path):
        self.out, self.calls = out, 0

    def __call__(self) -> dict:
        self.calls += 1
        for i in range(500):
            print(f"noisy worker line {i}")
        os.write(2, b"C-level stderr line\n")
        self.out.write_text(str(self.calls))
        return {"path": str(self.out)}


def _runner(tmp_path, stream) -> StageRunner:
    return StageRunner(tmp_path, Console(tmp_path / "logs", stream=stream))


def test_a_stage_runs_once_per_config_and_reruns_when_it_or_its_upstream_changes(tmp_path):
    log = open(tmp_path / "terminal.txt", "w")
    a, b = Stub(tmp_path / "a.txt"), Stub(tmp_path / "b.txt")

    def pipeline(cfg_a: dict, cfg_b: dict) -> StageRunner:
        run = _runner(tmp_path, log)
        with run.console.session():
            run.run("a", cfg_a, a, requires=lambda o: [o["path"]])
            run.run("b", cfg_b, b, after=("a",), requires=lambda o: [o["path"]])
        return run

    first = pipeline({"lr": 1}, {"k": 1})
    assert (a.calls, b.calls, first.ran) == (1, 1, ["a", "b"])
    mark = json.loads((tmp_path / "stages" / "a.json").read_text())
    assert mark["config"] == {"lr": 1} and mark["outputs"] == {"path": str(tmp_path / "a.txt")}

    again = pipeline({"lr": 1}, {"k": 1})  # same config: both skipped, outputs as recorded
    assert (a.calls, b.calls, again.skipped) == (1, 1, ["a", "b"])

    changed = pipeline({"lr": 1}, {"k": 2})  # b's own config changed: only b reruns
    assert (a.calls, b.calls, changed.ran) == (1, 2, ["b"])

    upstream = pipeline({"lr": 2}, {"k": 2})  # a changed: b starts from a new model, so it reruns too
    assert (a.calls, b.calls, upstream.ran) == (2, 3, ["a", "b"])

    (tmp_path / "b.txt").unlink()  # an output that is gone: the marker is not trusted
    assert pipeline({"lr": 2}, {"k": 2}).ran == ["b"]


def test_a_killed_stage_has_no_marker_and_reruns(tmp_path):
    run = _runner(tmp_path, open(os.devnull, "w"))

    def dies():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), run.console.session():
        run.run("a", {"x": 1}, dies)
    assert not (tmp_path / "stages" / "a.json").exists()
    stub = Stub(tmp_path / "a.txt")
    run = _runner(tmp_path, open(os.devnull, "w"))
    with run.console.session():
        run.run("a", {"x": 1}, stub)
    assert stub.calls == 1 and run.ran == ["a"]


def test_the_terminal_gets_two_lines_per_stage_and_the_log_gets_the_rest(tmp_path):
    """The line budget: a stage that prints 500 lines (and C-level stderr) shows 2 lines on the terminal;
    a skipped one shows 1; everything the stage printed is in logs/<stage>.log."""
    terminal = tmp_path / "terminal.txt"
    with open(terminal, "w") as stream:
        run = _runner(tmp_path, stream)
        with run.console.session():
            for i in range(10):
                run.run(f"s{i}", {"i": i}, Stub(tmp_path / f"{i}.txt"))
            print("between stages")  # goes to logs/pipeline.log, never the terminal
        run = _runner(tmp_path, stream)
        with run.console.session():
            for i in range(10):
                run.run(f"s{i}", {"i": i}, Stub(tmp_path / f"{i}.txt"))
    lines = terminal.read_text().splitlines()
    assert len(lines) == 10 * 2 + 10, lines
    assert lines[0] == "-> s0" and lines[1].startswith("   s0 done in ") and "logs/s0.log" in lines[1]
    assert lines[-1].startswith("-- s9: done before with this config, skipped")
    stage_log = (tmp_path / "logs" / "s0.log").read_text()
    assert "noisy worker line 499" in stage_log and "C-level stderr line" in stage_log
    assert "between stages" in (tmp_path / "logs" / "pipeline.log").read_text()
