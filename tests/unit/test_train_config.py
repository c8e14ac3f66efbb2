"""Training configs: bad input is an error before any worker starts, naming the field."""

from __future__ import annotations

import json

import pytest

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.train.batch import plan_batch
from bt_ray.train.config import DeepSpeedCfg, DPOJobCfg, SFTJobCfg
from bt_ray.train.deepspeed import deepspeed_config
from bt_ray.train.driver import preflight
from tests.conftest import REPO


def test_zero_stage_4_is_rejected():
    with pytest.raises(ConfigError, match=r"override deepspeed.zero_stage must be one of 0, 1, 2, 3; got 4"):
        config.load(SFTJobCfg, None, ["deepspeed.zero_stage=4"])


def test_several_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        config.load(SFTJobCfg, None, ["deepspeed.offload_param=true", "scaling.num_workers=0",
                                      "data.recipe=backtrack-dpo", "optim.learning_rate=0"])
    msg = str(e.value)
    assert "deepspeed.offload_param needs zero_stage 3" in msg
    assert "scaling.num_workers must be >= 1" in msg
    assert "optim.learning_rate must be > 0" in msg
    assert "data.recipe must be baseline-sft or backtrack-sft for SFT" in msg


def test_indivisible_global_batch_fails_in_preflight():
    cfg = config.load(SFTJobCfg, None, ["optim.global_batch_size=10", "optim.micro_batch_size=null",
                                        "scaling.num_workers=4"])
    with pytest.raises(ValueError, match="not divisible by scaling.num_workers=4"):
        preflight(cfg)


def test_dpo_with_missing_sft_checkpoint_fails_in_preflight(tmp_path):
    cfg = config.load(DPOJobCfg, REPO / "jobs/configs/dpo_tiny_demo.yaml",
                      [f"model.name={tmp_path / 'no-such-sft'}"])
    with pytest.raises(ValueError, match=r"model.name must be the HF directory of the SFT checkpoint"):
        preflight(cfg)


def test_bf16_on_cpu_without_native_bf16_and_missing_data_file_fail_in_preflight(tmp_path, monkeypatch):
    from bt_ray.train import deepspeed as ds

    bf16 = config.load(SFTJobCfg, None, ["deepspeed.precision=bf16", "optim.global_batch_size=8"])
    monkeypatch.setattr(ds, "cpu_has_bf16", lambda: True)
    assert ds.resolve_precision(bf16.deepspeed, use_gpu=False) == "bf16"
    monkeypatch.setattr(ds, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match=r"deepspeed.precision='bf16' needs scaling.use_gpu=true or a CPU"):
        preflight(bf16)
    with pytest.raises(ValueError, match="data.path must be an existing JSONL file"):
        preflight(config.load(SFTJobCfg, None, [f"data.path={tmp_path / 'x.jsonl'}",
                                                "optim.global_batch_size=8"]))


def test_deepspeed_config_per_stage():
    plan = plan_batch(32, 2, 4)
    z2 = deepspeed_config(DeepSpeedCfg(zero_stage=2), plan, use_gpu=False, max_grad_norm=1.0)
    assert z2["train_batch_size"] == 32 and z2["train_micro_batch_size_per_gpu"] == 4
    assert z2["gradient_accumulation_steps"] == 4
    assert z2["zero_optimization"]["stage"] == 2 and not z2["bf16"]["enabled"]
    assert "optimizer" not in z2  # HF's torch AdamW: nothing to JIT-compile on CPU
    z3 = deepspeed_config(DeepSpeedCfg(zero_stage=3, offload_optimizer=True, offload_param=True), plan,
                          use_gpu=True, max_grad_norm=1.0)
    zero = z3["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] and z3["bf16"]["enabled"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert z3["optimizer"]["type"] == "AdamW"


def test_every_train_yaml_has_a_valid_batch_split():
    for path in sorted(REPO.glob("jobs/configs/sft_*.yaml")) + sorted(REPO.glob("jobs/configs/dpo_*.yaml")):
        cls = SFTJobCfg if path.name.startswith("sft_") else DPOJobCfg
        cfg = config.load(cls, path)
        plan_batch(cfg.optim.global_batch_size, cfg.scaling.num_workers, cfg.optim.micro_batch_size)


def test_workers_get_absolute_local_paths_and_the_saved_config_keeps_the_users(tmp_path, monkeypatch):
    """Ray Train workers run elsewhere than the driver: relative paths would point at nothing there."""
    from bt_ray.train.driver import worker_env
    from bt_ray.train.loop import make_loop_config

    (tmp_path / "sft" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BT_RAY_CACHE", ".cache/bt-ray")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config.load(DPOJobCfg, None, ["model.name=sft/model"])
    loop_cfg = make_loop_config("dpo", cfg, None, tmp_path / "run", None, "sha")
    assert loop_cfg["cfg"]["model"]["name"] == str(tmp_path / "sft" / "model")
    assert cfg.model.name == "sft/model" and config.to_dict(cfg)["model"]["name"] == "sft/model"
    # a preset or hub id is not a local path: left as is
    preset = make_loop_config("sft", config.load(SFTJobCfg, None, []), None, tmp_path, None, "")
    assert preset["cfg"]["model"]["name"] == "tiny"
    env = worker_env()
    assert env["BT_RAY_CACHE"] == str(tmp_path / ".cache" / "bt-ray") and env["HF_HUB_OFFLINE"] == "1"


def test_a_run_dir_is_resumed_only_with_its_own_config(tmp_path):
    from bt_ray.train.driver import check_resumable

    cfg = config.load(SFTJobCfg, None, [])
    check_resumable(cfg, tmp_path)  # nothing saved yet
    config.dump(cfg, tmp_path / "config.yaml")
    check_resumable(cfg, tmp_path)
    check_resumable(config.load(SFTJobCfg, None, ["run.max_failures=3", "mlflow.enabled=false"]), tmp_path)
    changed = config.load(SFTJobCfg, None, ["optim.learning_rate=0.5", "data.recipe=baseline-sft"])
    with pytest.raises(ValueError) as e:
        check_resumable(changed, tmp_path)
    msg = str(e.value)
    assert "optim.learning_rate: 2e-05 -> 0.5" in msg
    assert "data.recipe: 'backtrack-sft' -> 'baseline-sft'" in msg
    assert "choose another run.name" in msg


# ---------------------------------------------------------------- never train on what is evaluated


def hh_job(path, split=None, *more):
    source = {"name": "hh-rlhf"} | ({"path": str(path)} if path else {}) | ({"split": split} if split else {})
    return config.load(SFTJobCfg, None, ["optim.global_batch_size=8", f"data.sources={json.dumps([source])}",
                                         *more])


def test_training_on_the_hh_rlhf_test_split_fails_in_preflight(shared_datasets, monkeypatch):
    """Review A1: the paper configs trained on harmless-base test, which eval_paper.yaml evaluates on."""
    monkeypatch.setenv("BT_RAY_DATA_DIR", str(shared_datasets))
    test_file = shared_datasets / "hh-rlhf/harmless-base/test.jsonl.gz"
    for cfg in (hh_job(test_file, "test"), hh_job(shared_datasets / "hh-rlhf", "test"), hh_job(None, "test"),
                hh_job("Anthropic/hh-rlhf@harmless-base", "test")):
        with pytest.raises(ValueError, match="never train on what is evaluated") as e:
            preflight(cfg)
        assert "data.sources[0] (hh-rlhf" in str(e.value)
        assert "is the evaluation test set 'hh-rlhf'" in str(e.value)
    # The test file without split: its name says test, the training default is train.
    with pytest.raises(ValueError, match=r"data.sources\[0\] \(hh-rlhf\): .*is the test split"):
        preflight(hh_job(test_file))
    # The default is train, which is not shipped: a clear error, never the test file.
    with pytest.raises(FileNotFoundError, match=r"data.sources\[0\] \(hh-rlhf\): .*train split is not shipp"):
        preflight(hh_job(None))


def test_training_on_the_hh_rlhf_train_split_passes_preflight(shared_datasets, tmp_path, monkeypatch):
    monkeypatch.setenv("BT_RAY_DATA_DIR", str(shared_datasets))
    (tmp_path / "harmless-base").mkdir()
    row = {"chosen": "\n\nHuman: q\n\nAssistant: no", "rejected": "\n\nHuman: q\n\nAssistant: yes"}
    (tmp_path / "harmless-base" / "train.jsonl").write_text(json.dumps(row) + "\n")
    preflight(hh_job(tmp_path))
    preflight(hh_job(tmp_path, "train"))
    preflight(hh_job("Anthropic/hh-rlhf@harmless-base", "train"))


def test_prebuilt_rows_from_an_eval_test_set_fail_in_preflight(shared_datasets, tmp_path, monkeypatch):
    monkeypatch.setenv("BT_RAY_DATA_DIR", str(shared_datasets))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n")
    origin = str(shared_datasets / "hh-rlhf/harmless-base/test.jsonl.gz")
    summary = {"sources": [{"source": "hh-rlhf", "origin": origin}]}
    rows.with_suffix(".summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"data.path=.*rows.jsonl was built from .* the evaluation test set"):
        preflight(config.load(SFTJobCfg, None, ["optim.global_batch_size=8", f"data.path={rows}"]))


def test_source_split_is_checked_against_the_source():
    sources = [{"name": "oasst2", "split": "train"}, {"name": "hh-rlhf", "split": "dev"},
               {"name": "synthetic", "split": "test"}]
    with pytest.raises(ConfigError) as e:
        config.load(SFTJobCfg, None, [f"data.sources={json.dumps(sources)}"])
    msg = str(e.value)
    assert "data.sources[0].split must be null: source 'oasst2' has no splits" in msg
    assert "data.sources[1].split must be null (= train) or one of train, test for source 'hh-rlhf'" in msg
    assert "data.sources[2].split must be null (= train) or one of train, dev for source 'synthetic'" in msg


def test_a_dpo_loss_type_typo_fails_on_the_driver_naming_the_field():
    with pytest.raises(ConfigError, match=r"dpo.loss_type\[1\] must be one of .*; got 'sigmod_norm' "
                                          r"\(did you mean 'sigmoid_norm'\?\)"):
        config.load(DPOJobCfg, None, ["dpo.loss_type=[sft, sigmod_norm]"])
    assert config.load(DPOJobCfg, None, ["dpo.loss_type=[sigmoid, sft]"]).dpo.loss_type == ("sigmoid", "sft")


def test_dpo_loss_types_are_the_installed_trls():
    """DPOLossType is what the installed TRL's DPOConfig names: a TRL upgrade that changes them fails."""
    import re
    import typing

    from trl import DPOConfig

    from bt_ray.train.config import DPOLossType

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    named = re.findall(r"`'(\w+)'`", help_text.split("If multiple")[0])
    assert set(typing.get_args(DPOLossType)) == set(named), named


def test_the_stage_of_a_job_config():
    from bt_ray.train.job import stage_of

    assert stage_of(SFTJobCfg()) == "sft" and stage_of(DPOJobCfg()) == "dpo"
    with pytest.raises(TypeError, match="not a training job config"):
        stage_of(DeepSpeedCfg())
