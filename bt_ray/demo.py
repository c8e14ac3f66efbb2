"""Config of the end-to-end demo (``jobs/demo.py``, ``make demo``).

The demo runs on the embedded default: the tiny model, the synthetic safety world, local Ray,
MLflow in a local sqlite file. Its stages are ordinary jobs with their own configs (the ``*_config``
fields); the demo only chains their outputs: base model -> baseline/backtracking SFT -> DPO -> eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bt_ray.config import check
from bt_ray.data.build import SourceCfg
from bt_ray.data.recipes import RECIPES, PrefixCfg
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.models import ModelCfg


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoCfg:
    """Everything ``jobs/demo.py`` does, on one page."""

    run_dir: str = "outputs/demo"
    """Where every output of the demo goes (model, data, summary.json)."""
    model: ModelCfg = field(default_factory=ModelCfg)
    """Model to build (tiny by default)."""
    synthetic: SyntheticWorldCfg = field(default_factory=SyntheticWorldCfg)
    """The synthetic safety world."""
    sources: tuple[SourceCfg, ...] = (SourceCfg(name="synthetic"),)
    """Sources of the alignment data, mixed."""
    recipes: tuple[str, ...] = RECIPES
    """Recipes whose data is built."""
    prefix: PrefixCfg = field(default_factory=PrefixCfg)
    """Prefix-length sampler of the backtracking recipes."""
    max_length: int = 1024
    """Longest row in tokens."""
    num_inspect: int = 1
    """Backtracking rows printed token by token per recipe."""
    pretrain_config: str | None = "jobs/configs/sft_tiny_pretrain.yaml"
    """SFT config that makes the base model (complies with everything, like a real base model);
    null starts SFT from model.name directly."""
    sft_config: str | None = "jobs/configs/sft_tiny_demo.yaml"
    """SFT config run once per recipe (baseline-sft, backtrack-sft); null stops after the data."""
    dpo_config: str | None = "jobs/configs/dpo_tiny_demo.yaml"
    """DPO config run on each SFT model (baseline-dpo, backtrack-dpo); null skips DPO."""
    eval_config: str | None = "jobs/configs/eval_demo.yaml"
    """Eval config comparing every trained model; null skips evaluation."""
    stage_overrides: tuple[str, ...] = ()
    """Dotted overrides applied to every training stage (e.g. optim.max_steps=4 for a smoke run)."""
    ray_num_cpus: int | None = 4
    """Logical CPUs of the local Ray cluster (a Train controller and 2 workers on a 2-core laptop)."""

    def __post_init__(self):
        check(self, [
            ("recipes", all(r in RECIPES for r in self.recipes), f"must be a subset of {RECIPES}"),
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("num_inspect", self.num_inspect >= 0, "must be >= 0"),
            ("dpo_config", self.dpo_config is None or self.sft_config is not None, "needs sft_config"),
            ("ray_num_cpus", self.ray_num_cpus is None or self.ray_num_cpus > 0, "must be > 0 or null"),
        ])
