"""Grids, trials and trial configs of a sweep: pure functions, no Ray.

A trial is the base job config plus its params plus where it writes (``run.root=<sweep>/trials``,
``run.name=<trial name>``). Names are built from the params alone (``lr=1e-05,epochs=3``), so the same
sweep config always gives the same trials, run dirs and MLflow runs: that is what restore relies on.
Every trial config is loaded before any trial starts, and all their problems are reported at once.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.tune.config import SweepCfg


@dataclass(frozen=True)
class NamedGrid:
    """A grid of one stage: the swept fields (first two are the heatmap's axes) and fixed settings."""

    stage: str
    params: dict[str, tuple[Any, ...]]
    fixed: tuple[str, ...] = ()


# PAPER.md section 8: global batch 128; SFT lr x epochs, DPO beta x lr at 1 epoch.
NAMED_GRIDS = {
    "paper-sft": NamedGrid("sft", {"optim.learning_rate": (2e-6, 5e-6, 1e-5, 2e-5, 5e-5),
                                   "optim.num_epochs": (1, 3)},
                           ("optim.global_batch_size=128",)),
    "paper-dpo": NamedGrid("dpo", {"dpo.beta": (0.025, 0.05, 0.1, 0.2),
                                   "optim.learning_rate": (1e-7, 2e-7, 5e-7, 1e-6, 2e-6)},
                           ("optim.num_epochs=1", "optim.global_batch_size=128")),
    # The synthetic world's tiny model: 2 x 2, a few minutes on a 2-core machine.
    "demo": NamedGrid("sft", {"optim.learning_rate": (5e-4, 2e-3), "optim.num_epochs": (1, 2)}),
    "demo-dpo": NamedGrid("dpo", {"dpo.beta": (0.1, 0.2), "optim.learning_rate": (1e-5, 2e-5)}),
}
# Short names of fields in trial names; any other field is named by its last part.
SHORT_NAMES = {"optim.learning_rate": "lr", "optim.num_epochs": "epochs", "dpo.beta": "beta",
               "optim.global_batch_size": "batch", "optim.max_steps": "steps"}


@dataclass(frozen=True)
class Trial:
    """One point of the grid: its readable name and its ``{dotted.field: value}`` params."""

    name: str
    params: dict[str, Any]

    def overrides(self) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in self.params.items()]  # JSON is YAML


def format_value(value: Any) -> str:
    """``1e-05`` for 1e-5, ``3`` for 3 or 3.0, ``true`` for True: short and the same on every run."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def trial_name(params: dict[str, Any]) -> str:
    """``lr=1e-05,epochs=3``: the params in grid order, with short field names."""
    short = [SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in params]
    return ",".join(f"{s}={format_value(v)}" for s, v in zip(short, params.values()))


def _number(value: Any) -> Any:
    """YAML reads ``1e-5`` (no dot) as a string; a config float field accepts it, so the grid does too."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def grid_of(cfg: SweepCfg) -> tuple[dict[str, tuple[Any, ...]], tuple[str, ...]]:
    """The swept fields and the fixed overrides of the sweep's grid.

    Raises:
        ConfigError: an unknown grid name, a named grid of another stage, an empty grid.
    """
    if cfg.grid == "params":
        params, fixed = {k: tuple(_number(x) for x in v) for k, v in cfg.params.items()}, ()
    elif cfg.grid in NAMED_GRIDS:
        named = NAMED_GRIDS[cfg.grid]
        if named.stage != cfg.stage:
            raise ConfigError([f"grid {cfg.grid!r} sweeps the {named.stage} stage, "
                               f"but stage is {cfg.stage!r}"])
        params, fixed = named.params, named.fixed
    else:
        raise ConfigError([f"grid must be one of {', '.join(NAMED_GRIDS)} or params; got {cfg.grid!r}"])
    if not params or any(len(v) == 0 for v in params.values()):
        raise ConfigError([f"grid {cfg.grid!r} is empty: every field needs at least one value"])
    return params, fixed


def expand(cfg: SweepCfg) -> list[Trial]:
    """The sweep's trials in a fixed order: every combination (grid) or a seeded draw of them (random)."""
    params, _ = grid_of(cfg)
    combos = [dict(zip(params, values)) for values in itertools.product(*params.values())]
    if cfg.search.kind == "random":
        picked = sorted(random.Random(cfg.search.seed).sample(range(len(combos)),
                                                             min(cfg.search.num_samples, len(combos))))
        combos = [combos[i] for i in picked]
    trials = [Trial(trial_name(c), c) for c in combos]
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise ConfigError([f"params: two grid points give one trial name (repeated values?): {names}"])
    return trials


def trials_root(cfg: SweepCfg) -> Path:
    return Path(cfg.run_dir).resolve() / "trials"


def trial_configs(cfg: SweepCfg) -> tuple[dict[str, Any], str]:
    """Every trial's job config (SFTJobCfg or DPOJobCfg) by trial name, loaded before anything runs, and
    the sweep's MLflow store.

    The store is the base config's ``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite
    under the sweep dir; every trial is set to it so the parent run and its children share one store.

    Raises:
        ConfigError: every problem of every trial at once (a field that does not exist, a bad value),
            each line naming the trials it concerns; a missing base config.
    """
    import dataclasses

    from bt_ray.tracking import experiment_name, resolve_tracking_uri
    from bt_ray.train.config import JOB_CONFIGS

    if not Path(cfg.base_config).is_file():
        raise ConfigError([f"base_config: file not found: {cfg.base_config}"])
    _, fixed = grid_of(cfg)
    cls = JOB_CONFIGS[cfg.stage]
    experiment = experiment_name(cfg, "mlflow_experiment")  # or the pipeline's
    where = [f"run.root={trials_root(cfg)}", f"mlflow.experiment={experiment}"]
    out, problems = {}, {}
    for trial in expand(cfg):
        overrides = [*cfg.base_overrides, *fixed, *trial.overrides(), *where, f"run.name={trial.name}"]
        try:
            out[trial.name] = config.load(cls, cfg.base_config, overrides)
        except ConfigError as e:
            for line in e.errors:
                problems.setdefault(line, []).append(trial.name)
    if problems:
        raise ConfigError([f"{line} (trials: {'; '.join(names)})" for line, names in problems.items()],
                          header=f"invalid trial configs (base {cfg.base_config}, stage {cfg.stage})")
    first = next(iter(out.values()))
    uri = resolve_tracking_uri(first.mlflow.tracking_uri, Path(cfg.run_dir).resolve())
    out = {name: dataclasses.replace(job, mlflow=dataclasses.replace(job.mlflow, tracking_uri=uri))
           for name, job in out.items()}
    return out, uri
