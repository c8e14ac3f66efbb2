"""Typed config of a hyperparameter sweep (``jobs/sweep.py``): a base SFT/DPO job config, a grid over its
fields, how trials are scored on a development set, and where the sweep writes.

The config itself needs no files: the base config and every trial config are loaded (all errors at
once) by ``bt_ray.tune.grid.trial_configs`` before any trial starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bt_ray.config import check
from bt_ray.eval.config import DecodeCfg, EngineCfg, JudgeCfg

# Metrics each trial reports (bt_ray.tune.trial.score_trial); selection.metric must be one of them.
TRIAL_METRICS = ("dev_unsafe_rate", "dev_reset_rate", "dev_helpful_rate", "eval_loss", "train_loss")


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchCfg:
    """How trials are drawn from the grid."""

    kind: Literal["grid", "random"] = "grid"
    """grid: every combination; random: num_samples distinct combinations drawn with seed."""
    num_samples: int = 4
    """random search: combinations drawn (at most the grid's size); ignored for grid."""
    seed: int = 0
    """random search: seed of the draw (the same seed gives the same trials)."""

    def __post_init__(self):
        check(self, [("num_samples", self.num_samples >= 1, "must be >= 1")])


@dataclass(frozen=True, kw_only=True, slots=True)
class DevSetCfg:
    """The fixed development subset each trial's model is scored on by the evaluation pipeline's judge."""

    name: Literal["synthetic-dev", "hh-rlhf"] = "synthetic-dev"
    """synthetic-dev: the synthetic world's dev split (the trial's data.synthetic world); hh-rlhf: the
    HH-RLHF test split (the paper's dev set), read from path or $BT_RAY_DATA_DIR."""
    path: str | None = None
    """hh-rlhf only: file, directory or hub spec (bt_ray.data.sources); null: $BT_RAY_DATA_DIR layout."""
    limit: int = 64
    """Prompts scored (the first N, a fixed subset)."""
    eval_loss_limit: int = 32
    """Dev pairs whose chosen response's mean token NLL is eval_loss (the tie-break)."""

    def __post_init__(self):
        check(self, [
            ("limit", self.limit >= 1, "must be >= 1"),
            ("eval_loss_limit", self.eval_loss_limit >= 1, "must be >= 1"),
            ("path", self.path is None or self.name == "hh-rlhf", "is only read for name hh-rlhf"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class SelectionCfg:
    """How the best trial is picked."""

    metric: str = "dev_unsafe_rate"
    """The metric that ranks trials (one a trial reports: see TRIAL_METRICS)."""
    mode: Literal["min", "max"] = "min"
    """min or max of the metric is best; ties are broken by the lower eval_loss."""
    dev: DevSetCfg = field(default_factory=DevSetCfg)
    """The development subset."""
    engine: EngineCfg = field(default_factory=lambda: EngineCfg(kind="hf", num_actors=1))
    """Generation engine of the scoring (bt_ray.eval.config.EngineCfg)."""
    decode: DecodeCfg = field(default_factory=lambda: DecodeCfg(max_new_tokens=64))
    """Decoding of the scoring (greedy, through the backtracking decoder)."""
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    """The judge (the synthetic world's exact judge for synthetic-dev; judge.safety for hh-rlhf)."""

    def __post_init__(self):
        check(self, [("metric", self.metric in TRIAL_METRICS,
                      f"must be a metric every trial reports: one of {', '.join(TRIAL_METRICS)}")])


@dataclass(frozen=True, kw_only=True, slots=True)
class SweepCfg:
    """``jobs/sweep.py``: a Ray Tune grid (or random) search over an SFT or DPO job's fields."""

    stage: Literal["sft", "dpo"] = "sft"
    """The training stage swept (base_config must be of this stage)."""
    base_config: str = "jobs/configs/sft_tiny_demo.yaml"
    """The SFT or DPO job YAML every trial starts from."""
    base_overrides: tuple[str, ...] = ()
    """Dotted overrides applied to the base config before each trial's params (e.g. optim.max_steps=2)."""
    grid: str = "demo"
    """A named grid (paper-sft, paper-dpo, demo) or "params" for the params field."""
    params: dict[str, tuple[str | int | float | bool, ...]] = field(default_factory=dict)
    """grid=params: {dotted.field: [values]} of the base job config."""
    search: SearchCfg = field(default_factory=SearchCfg)
    """grid or random search."""
    selection: SelectionCfg = field(default_factory=SelectionCfg)
    """Dev-set scoring and the selection metric."""
    max_concurrent_trials: int | None = None
    """Trials at once; null: as many as the cluster's CPUs/GPUs fit (a trial needs its training workers)."""
    scheduler: Literal["none", "asha"] = "none"
    """none runs every trial to completion (the paper); asha hands trials to Tune's ASHAScheduler on the
    selection metric. A trial reports once, after training and scoring, so ASHA has no earlier result to
    stop on yet: it needs per-epoch dev scoring (not built)."""
    run_dir: str = "outputs/sweeps/demo"
    """Sweep dir: trials/<trial name>/ (each a run dir), results.csv, heatmap.png, best/model."""
    ray_num_cpus: int | None = None
    """Logical CPUs when the job starts Ray itself; null: Ray's default."""
    mlflow_experiment: str = "bt-ray-sweep"
    """MLflow experiment of the parent run and of every trial's run."""

    def __post_init__(self):
        check(self, [
            ("base_config", self.base_config.endswith((".yaml", ".yml")), "must be a YAML file"),
            ("params", self.grid != "params" or len(self.params) > 0,
             "must name at least one field when grid is params (the grid is empty)"),
            ("params", all(isinstance(v, (list, tuple)) and len(v) > 0 for v in self.params.values()),
             "must give every field a non-empty list of values (the grid is empty)"),
            ("max_concurrent_trials", self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
             "must be >= 1 or null"),
            ("run_dir", bool(self.run_dir), "must not be empty"),
            ("mlflow_experiment", bool(self.mlflow_experiment), "must not be empty"),
        ])
