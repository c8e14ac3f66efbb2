"""Typed configs: YAML + dotted overrides, every error at once, with file and line."""

from __future__ import annotations

import pytest
import yaml

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.data.build import DataBuildCfg
from tests.conftest import REPO


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_build_nested_frozen_config(tmp_path):
    p = write(tmp_path, "recipe:\n  name: backtrack-dpo\n  prefix:\n    seed: 3\nout: x.jsonl\n")
    cfg = config.load(DataBuildCfg, p, ["recipe.max_length=512", "recipe.prefix.max_fraction=0.5"])
    assert cfg.recipe.name == "backtrack-dpo"
    assert cfg.recipe.prefix.seed == 3
    assert cfg.recipe.prefix.max_fraction == 0.5
    assert cfg.recipe.max_length == 512
    assert cfg.out == "x.jsonl"
    with pytest.raises(AttributeError):
        cfg.out = "y.jsonl"  # frozen


def test_unknown_key_and_wrong_type_reported_together_with_lines(tmp_path):
    p = write(tmp_path, "recipe:\n  name: backtrack-sft\n  max_lenght: 10\nmodel:\n  seed: abc\n")
    with pytest.raises(ConfigError) as e:
        config.load(DataBuildCfg, p)
    msg = str(e.value)
    assert len(e.value.errors) == 2, msg
    assert f"{p}:3: recipe.max_lenght: unknown key (did you mean 'max_length'?)" in msg
    assert f"{p}:5: model.seed must be an integer; got 'abc'" in msg


def test_value_checks_and_overrides_collected_at_once(tmp_path):
    p = write(tmp_path, "recipe:\n  name: backtrak-sft\n")
    with pytest.raises(ConfigError) as e:
        config.load(DataBuildCfg, p, ["recipe.prefix.min_fraction=-1", "nonsense", "out=data.txt"])
    msg = str(e.value)
    assert "recipe.name must be one of" in msg and "did you mean 'backtrack-sft'" in msg
    assert f"{p}:2: recipe.name must be one of" in msg
    assert "override recipe.prefix.min_fraction must be in [0, 1]; got -1.0" in msg
    assert "override 'nonsense' must look like section.field=value" in msg
    assert "override out must be a .jsonl path; got 'data.txt'" in msg
    assert len(e.value.errors) == 4, msg


def test_float_from_yaml_exponent_string(tmp_path):
    cfg = config.load(DataBuildCfg, None, ["recipe.prefix.max_fraction=1e-1"])
    assert cfg.recipe.prefix.max_fraction == pytest.approx(0.1)


def test_list_of_sections_and_round_trip(tmp_path):
    sources = 'sources=[{"name": "synthetic", "limit": 5}, {"name": "hh-rlhf"}]'
    cfg = config.load(DataBuildCfg, None, [sources])
    assert [s.name for s in cfg.sources] == ["synthetic", "hh-rlhf"]
    out = config.dump(cfg, tmp_path / "resolved.yaml")
    again = config.load(DataBuildCfg, out)
    assert again == cfg
    flat = config.flatten(config.to_dict(cfg))
    assert flat["recipe.prefix.seed"] == 0


def test_an_override_below_a_value_is_an_error_not_a_replacement(tmp_path):
    """``recipe.max_length.x=1`` must not turn the YAML's 512 into a section (review B14)."""
    p = write(tmp_path, "recipe:\n  max_length: 512\nsources:\n  - name: synthetic\n")
    with pytest.raises(ConfigError) as e:
        config.load(DataBuildCfg, p, ["recipe.max_length.x=1", "sources.limit=5"])
    assert e.value.errors == [
        "override 'recipe.max_length.x=1': recipe.max_length is 512, not a section, so it has no field 'x'",
        "override 'sources.limit=5': sources is a list, so it has no field 'limit'; "
        "set the whole list (sources=[...])",
    ]


def test_overrides_set_one_key_and_fill_in_absent_or_null_sections():
    data = {"optim": {"lr": 0.1, "steps": 3}, "extra": None, "tags": ["a"]}
    out, bad = config.apply_overrides(data, ["optim.lr=0.2", "extra.seed=1", "new.deep.key=x", "tags=[b]",
                                             "optim.lr.x=1", "tags.0=c"])
    assert out == {"optim": {"lr": 0.2, "steps": 3}, "extra": {"seed": 1}, "new": {"deep": {"key": "x"}},
                   "tags": ["b"]}
    assert [b.split(":")[0] for b in bad] == ["override 'optim.lr.x=1'", "override 'tags.0=c'"]
    assert data["optim"]["lr"] == 0.1  # the input is not modified


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found: nope.yaml"):
        config.load(DataBuildCfg, "nope.yaml")


def _config_classes():
    """Config class of each job, keyed by the prefix of its YAML names (sft_*.yaml -> SFTJobCfg, ...)."""
    from bt_ray.attacks.config import AttackJobCfg
    from bt_ray.data.onpolicy import OnPolicyCfg
    from bt_ray.eval.calibrate import CalibrateCfg
    from bt_ray.eval.config import EvalCfg
    from bt_ray.pipeline.config import PipelineCfg
    from bt_ray.serve.config import ServeCfg
    from bt_ray.train.config import JOB_CONFIGS
    from bt_ray.tune.config import SweepCfg

    return {"data": DataBuildCfg, "pipeline": PipelineCfg, **JOB_CONFIGS, "eval": EvalCfg, "serve": ServeCfg,
            "attack": AttackJobCfg, "sweep": SweepCfg, "onpolicy": OnPolicyCfg, "calibrate": CalibrateCfg}


def test_every_yaml_under_jobs_configs_and_clusters_validates():
    """Each YAML config in the repo loads into its job's config class (recursive glob)."""
    CONFIG_CLASSES = _config_classes()
    paths = sorted(REPO.glob("jobs/configs/**/*.yaml")) + sorted(REPO.glob("clusters/**/*.yaml"))
    assert paths, "no configs found"
    for path in paths:
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path} must open with a header comment"
        cls = CONFIG_CLASSES.get(path.stem.split("_")[0]) if "jobs" in path.parts else None
        assert cls is not None or "clusters" in path.parts, f"{path}: name must start with data_ or demo"
        if cls is None:  # a cluster manifest, not a job config: must at least parse
            list(yaml.safe_load_all(path.read_text()))
            continue
        config.load(cls, path)


def test_every_job_parses_config_and_overrides_the_same_way(tmp_path, capsys):
    """``parse_job_args``: ``--config`` then dotted overrides, loaded with every error at once; ``--help``
    shows the first paragraph of the job's docstring."""
    path = write(tmp_path, "recipe:\n  name: baseline-sft\n")
    doc = "Build rows.\n\nMore detail that --help leaves out."
    cfg = config.parse_job_args(DataBuildCfg, doc, ["--config", str(path), "recipe.max_length=64"])
    assert (cfg.recipe.name, cfg.recipe.max_length) == ("baseline-sft", 64)
    assert config.parse_job_args(DataBuildCfg, doc, []) == DataBuildCfg()
    with pytest.raises(ConfigError, match="recipe.max_length must be an integer"):
        config.parse_job_args(DataBuildCfg, doc, ["recipe.max_length=long"])
    with pytest.raises(SystemExit) as e:
        config.parse_job_args(DataBuildCfg, doc, ["--help"], example="recipe.max_length=64")
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "Build rows." in out and "More detail" not in out
    assert "YAML config (DataBuildCfg)" in out and "recipe.max_length=64" in out
