"""Where attack behaviours (a harmful goal and a target answer) come from.

Three kinds of source, each giving every behaviour a goal, a target, a stable id, a cluster and the
file and row it came from:

* ``advbench`` (default): AdvBench ``harmful_behaviors.csv``, goal and target columns as they are
  (``load_advbench``). Any other goal/target set can be given in that shape through ``path``.
* ``hh-rlhf``: HH-RLHF harmless-base dialogues (the preference loader, ``split`` test by default, the
  split the shared datasets ship). The goal is the Human turn, the target the ``rejected`` answer: the
  red-teaming data's unsafe answer, longer than AdvBench's one-sentence targets (so prefilling can go
  deeper). Only one-turn dialogues are used: a behaviour has one user turn, and a later turn's
  rejected answer would be read out of its context. Longer dialogues are left out by a named rule
  and counted in the log line.
* ``synthetic``: the synthetic world's harmful eval prompts (held out of every training set); the
  target is a harmful compliant answer to the prompt's task (``synthetic.harmful_answer``), the same
  in every run, and the cluster is the world's (template, task).

Other prompt sets have no target answer, so they cannot be attack behaviours. A row without a goal or
target is an error naming its file and line, raised while loading, before any attack task starts.
Ids are ``<dataset>:<index>`` (0-based, in file order; the synthetic world's eval prompt index), so
results are keyed the same way on every run over the same data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bt_ray.attacks.core import Behaviour
from bt_ray.config import check
from bt_ray.data.records import DataError, LoadReport
from bt_ray.data.synthetic import SyntheticWorldCfg

log = logging.getLogger(__name__)

BEHAVIOUR_DATASETS = ("advbench", "hh-rlhf", "synthetic")
"""Sources with a target answer per goal (see the module docstring)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BehaviourCfg:
    """Which behaviours an attack runs on."""

    dataset: str = "advbench"
    """advbench (goal, target columns), hh-rlhf (one-turn dialogues; target = the rejected answer) or
    synthetic (the world's harmful eval prompts; target = a harmful compliant answer)."""
    path: str | None = None
    """advbench/hh-rlhf: a file, directory or hub spec (a goal,target CSV reads as advbench); null: the
    $BT_RAY_DATA_DIR layout, else the hub default (bt_ray.data.sources). Must be null for synthetic."""
    split: str | None = "test"
    """hh-rlhf only: the split to read (test ships in the shared datasets; train needs a path); null for
    a file whose name names no split."""
    limit: int | None = None
    """Behaviours used at most, the first ones in file order; null: all."""

    def __post_init__(self):
        check(self, [
            ("dataset", self.dataset in BEHAVIOUR_DATASETS,
             f"must be one of {', '.join(BEHAVIOUR_DATASETS)} (a behaviour needs a target answer; other "
             "prompt sets have none, and a CSV with goal,target columns reads as advbench with path)"),
            ("path", self.path is None or (self.dataset != "synthetic" and self.path.strip() != ""),
             "must be null for dataset synthetic (the world is generated) and not empty otherwise"),
            ("split", self.split in ("train", "test", None)
             and (self.dataset == "hh-rlhf" or self.split == "test"),
             "must be train, test or null, and is for dataset hh-rlhf only (leave it at test otherwise)"),
            ("limit", self.limit is None or self.limit >= 1, "must be >= 1 or null"),
        ])


def load_behaviours(cfg: BehaviourCfg, synthetic_cfg: SyntheticWorldCfg | None = None) -> list[Behaviour]:
    """The behaviours ``cfg`` names, read and checked in full (call it before starting any task).

    Args:
        cfg: which dataset, where, how many.
        synthetic_cfg: the synthetic world (dataset synthetic; None: the default world). The job's one
            world config, the one the attacked models were trained in, so it is not repeated here.

    Raises:
        DataError: a row with an empty goal or target, or otherwise malformed (names file and line).
        FileNotFoundError: the data cannot be found.
    """
    if cfg.dataset == "synthetic":
        behaviours, report = _synthetic(synthetic_cfg or SyntheticWorldCfg(), cfg.limit)
    elif cfg.dataset == "hh-rlhf":
        behaviours, report = _hh_rlhf(cfg)
    else:
        behaviours, report = _advbench(cfg)
    level = logging.WARNING if report.skipped else logging.INFO
    log.log(level, "behaviours: %s", report)
    return behaviours


def _behaviour(dataset: str, index: int, goal: str, target: str, location: str, origin: str,
               cluster: str | None = None) -> Behaviour:
    for name, value in (("goal", goal), ("target", target)):
        if not value or not value.strip():
            raise DataError(f"{_where(origin, location)}: field {name!r} is empty; every behaviour needs a "
                            "goal and a target answer")
    id_ = f"{dataset}:{index}"
    return Behaviour(id=id_, goal=goal, target=target, cluster=cluster or id_, location=location)


def _where(origin: str, location: str) -> str:
    """``/full/path/file.csv:18`` from the report's origin and a ``file.csv:18`` location."""
    short = Path(origin).name
    if short and location.startswith(short):
        return origin + location[len(short):]
    return f"{origin} ({location})"


def _advbench(cfg: BehaviourCfg) -> tuple[list[Behaviour], LoadReport]:
    from bt_ray.data.sources import load_advbench

    prompts, report = load_advbench(cfg.path, limit=cfg.limit)
    return [_behaviour("advbench", i, p.turns[0], p.meta.get("target", ""), p.location, report.origin)
            for i, p in enumerate(prompts)], report


def _hh_rlhf(cfg: BehaviourCfg) -> tuple[list[Behaviour], LoadReport]:
    from bt_ray.data.sources import load_hh_rlhf_preferences

    # Every row is read (the file is small), so the limit counts behaviours, not dialogues read.
    pairs, report = load_hh_rlhf_preferences(cfg.path, split=cfg.split)
    one_turn = [p for p in pairs if len(p.prompt) == 1]
    for _ in range(len(pairs) - len(one_turn)):
        report.skip("multi_turn_dialogue")
    one_turn = one_turn[: cfg.limit] if cfg.limit else one_turn
    report.num_used = len(one_turn)
    return [_behaviour("hh-rlhf", i, p.prompt[0].content, p.rejected or "", p.location, report.origin)
            for i, p in enumerate(one_turn)], report


def _synthetic(world: SyntheticWorldCfg, limit: int | None) -> tuple[list[Behaviour], LoadReport]:
    from bt_ray.data.synthetic import eval_prompts, harmful_answer

    prompts, report = eval_prompts(world)
    # Only harmful prompts have a harmful answer to steer towards; ids keep the eval prompt index.
    harmful = [(i, p) for i, p in enumerate(prompts) if p.harmful]
    harmful = harmful[:limit] if limit else harmful
    report.num_used = len(harmful)
    # The last user turn is the request (a multi-turn prompt opens with a greeting).
    return [_behaviour("synthetic", i, p.turns[-1], harmful_answer(world, p), p.location, report.origin,
                       cluster=p.meta["cluster"]) for i, p in harmful], report
