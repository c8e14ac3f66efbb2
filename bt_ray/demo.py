"""Config of the end-to-end demo (``jobs/demo.py``, ``make demo``).

The demo runs on the embedded default: the tiny model, the synthetic safety world, local outputs.
It grows with the project: today it builds the model with ``[RESET]`` and the four recipes' data.
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

    def __post_init__(self):
        check(self, [
            ("recipes", all(r in RECIPES for r in self.recipes), f"must be a subset of {RECIPES}"),
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("num_inspect", self.num_inspect >= 0, "must be >= 0"),
        ])
