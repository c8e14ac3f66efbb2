"""Config of ``jobs/attack.py``: which attack, its budget and resources, the models, the behaviours,
the decoder and the judge. Each attack's own settings live beside it (``PrefillCfg``, ``GCGCfg``,
``AdaptiveCfg``, ``AutoDANCfg``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bt_ray.attacks.autodan import AutoDANCfg
from bt_ray.attacks.behaviours import BehaviourCfg
from bt_ray.attacks.gcg import AdaptiveCfg, GCGCfg
from bt_ray.attacks.prefill import PrefillCfg
from bt_ray.config import check
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.eval.config import DecodeCfg, JudgeCfg
from bt_ray.models import ModelCfg

ATTACK_KINDS = ("prefill", "gcg", "autodan", "adaptive")


@dataclass(frozen=True, kw_only=True, slots=True)
class AttackCfg:
    """One attack, its budget per behaviour, and what each task asks Ray for."""

    kind: Literal["prefill", "gcg", "autodan", "adaptive"] = "prefill"
    """prefill | gcg | autodan | adaptive (GCG that also pushes [RESET] down, PAPER.md Algorithm 1)."""
    max_steps: int = 500
    """Budget per behaviour in optimisation steps (GCG steps, AutoDAN generations); prefill uses none."""
    max_seconds: float = 3600.0
    """Budget per behaviour in wall time (the paper: at most 1 h of one H100 per prompt)."""
    num_cpus: float = 1.0
    """Logical CPUs per task (one task per model and behaviour)."""
    num_gpus: float = 0.0
    """GPUs per task (1 on a GPU cluster)."""
    prefill: PrefillCfg = field(default_factory=PrefillCfg)
    """Prefilling: the k values."""
    gcg: GCGCfg = field(default_factory=GCGCfg)
    """GCG search (also the search of the adaptive attack)."""
    adaptive: AdaptiveCfg = field(default_factory=AdaptiveCfg)
    """The adaptive attack's [RESET] term."""
    autodan: AutoDANCfg = field(default_factory=AutoDANCfg)
    """AutoDAN's genetic algorithm."""

    def __post_init__(self):
        check(self, [
            ("max_steps", self.max_steps >= 1, "must be >= 1 (a budget of 0 runs nothing)"),
            ("max_seconds", self.max_seconds > 0, "must be > 0 (a budget of 0 runs nothing)"),
            ("num_cpus", self.num_cpus >= 0, "must be >= 0"),
            ("num_gpus", self.num_gpus >= 0, "must be >= 0"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class AttackJobCfg:
    """Everything ``jobs/attack.py`` does, on one page."""

    run_dir: str = "outputs/attacks"
    """Results per model and attack (results.jsonl), summary.json, table2.md, the default MLflow store."""
    models: tuple[str, ...] = ("tiny",)
    """Models to attack: presets or HF directories (each replaces model.name)."""
    labels: tuple[str, ...] = ()
    """Names of the models in tables and runs; empty: the directory names (the parent's for .../model)."""
    model: ModelCfg = field(default_factory=ModelCfg)
    """Loading settings shared by every model."""
    attack: AttackCfg = field(default_factory=AttackCfg)
    """The attack."""
    behaviours: BehaviourCfg = field(default_factory=BehaviourCfg)
    """What the attacker asks for (AdvBench goals and targets by default)."""
    synthetic: SyntheticWorldCfg = field(default_factory=SyntheticWorldCfg)
    """The synthetic world (its held-out harmful prompts, when behaviours.dataset is synthetic)."""
    decode: DecodeCfg = field(default_factory=DecodeCfg)
    """The backtracking decoder every attempt is answered with (greedy by default)."""
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    """Who decides success: the *shown* answer judged unsafe (the synthetic world's exact judge on
    synthetic behaviours; stand-in judges keep their label)."""
    compare: tuple[tuple[str, str], ...] = ()
    """Pairs of labels (baseline, backtrack) set side by side in table2.md; empty: every model a row."""
    ray_num_cpus: int | None = None
    """Logical CPUs of the local Ray the job starts when none is running (null: the machine's cores)."""
    mlflow_experiment: str = "bt-ray-attack"
    """MLflow experiment (store: $MLFLOW_TRACKING_URI, else sqlite under run_dir)."""

    def __post_init__(self):
        check(self, [
            ("models", len(self.models) >= 1, "must name at least one model"),
            ("labels", not self.labels or len(self.labels) == len(self.models),
             f"must be empty or name each of the {len(self.models)} models"),
            ("compare", all(len(p) == 2 for p in self.compare), "must be pairs [baseline, backtrack]"),
        ])


def build_attack(cfg: AttackCfg):
    """The ``Attack`` ``cfg.kind`` names."""
    if cfg.kind == "prefill":
        from bt_ray.attacks.prefill import PrefillAttack

        return PrefillAttack(cfg.prefill)
    if cfg.kind == "autodan":
        from bt_ray.attacks.autodan import AutoDANAttack

        return AutoDANAttack(cfg.autodan)
    from bt_ray.attacks.gcg import GCGAttack

    return GCGAttack(cfg.gcg, cfg.adaptive if cfg.kind == "adaptive" else None)
