"""Judging: the eval pipeline's second stage.

``build_judges`` picks the judge of each kind of row (synthetic, real safety sets, MT-Bench) and the
refusal judge of safe prompts, ``judge_rows`` adds the verdict columns to generated rows (a judge
failure is recorded on its rows),
and ``JudgeStage`` is the Ray Data actor holding the judges (``bt_ray.eval.pipeline.run_pipeline``
wires it).
"""

from __future__ import annotations

import json

from bt_ray import config
from bt_ray.eval.config import EngineCfg, JudgeCfg
from bt_ray.eval.judges import (
    JUDGE_VERSION,
    Judge,
    JudgeItem,
    LLMJudge,
    SyntheticJudge,
    build_refusal_judge,
    build_safety_judge,
)
from bt_ray.models import ModelCfg


def build_judges(judge: JudgeCfg, model: ModelCfg, engine: EngineCfg) -> dict[str, Judge | None]:
    """The judge of each kind of row: ``synthetic``, ``safety`` (real sets), ``helpfulness`` (MT-Bench),
    and ``refusal``, which marks refusals of safe prompts (``JudgeCfg.refusal``)."""
    safety = build_safety_judge(judge, engine=engine, dtype=model.dtype)
    return {
        "synthetic": SyntheticJudge() if judge.synthetic_exact else safety,
        "safety": safety,
        "helpfulness": LLMJudge(judge.llm, "mt-bench") if judge.llm.base_url else None,
        "refusal": safety if judge.refusal == judge.safety else build_refusal_judge(judge),
    }


def judge_rows(judges: dict[str, Judge | None], rows: list[dict]) -> list[dict]:
    """Add ``unsafe``, ``score``, ``category``, ``judge``, ``stand_in``, ``judge_raw`` to each row, and
    ``refused`` (``refusal_judge``) to safe-prompt rows (``harmful`` False), so over-refusal is measured;
    synthetic-world rows graded by the world's exact judge keep ``refused`` None (its helpfulness score
    measures over-refusal exactly)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        kind = {"synthetic": "synthetic", "mt-bench": "helpfulness"}.get(r["dataset"], "safety")
        r.update(unsafe=None, score=None, verdict_category="", judge=None, stand_in=False, judge_raw=None,
                 judge_version=JUDGE_VERSION, refused=None, refusal_judge=None)
        if not r.get("error"):
            groups.setdefault(kind, []).append(r)
    for kind, group in groups.items():
        judge = judges.get(kind)
        if judge is None:
            continue  # e.g. MT-Bench without an LLM judge: generated, not graded
        items = [JudgeItem(turns=tuple(r["turns"]), answers=tuple(r["answers"]), harmful=r["harmful"])
                 for r in group]
        try:
            verdicts = judge.judge(items)
        except Exception as e:  # noqa: BLE001 - a judge failure is recorded on its rows (and counted)
            for r in group:
                r.update(error=f"judge: {type(e).__name__}: {e}", judge=judge.name, stand_in=judge.stand_in)
            continue
        for r, v in zip(group, verdicts):
            r.update(unsafe=v.unsafe, score=v.score, verdict_category=v.category, judge=judge.name,
                     stand_in=judge.stand_in, judge_raw=v.raw)
            if v.error:
                r["error"] = f"judge: {v.error}"
    _judge_refusals(judges, rows)
    return rows


def _judge_refusals(judges: dict[str, Judge | None], rows: list[dict]) -> None:
    """``refused`` = the refusal judge finds the answer safe (a refusal, or empty) on safe-prompt rows."""
    judge = judges.get("refusal")
    exact_synthetic = isinstance(judges.get("synthetic"), SyntheticJudge)
    safe = [r for r in rows if not r.get("error") and not r["harmful"]
            and not (exact_synthetic and r["dataset"] == "synthetic")]
    if judge is None or not safe:
        return
    try:
        verdicts = judge.judge([JudgeItem(turns=tuple(r["turns"]), answers=tuple(r["answers"]), harmful=False)
                                for r in safe])
    except Exception as e:  # noqa: BLE001 - recorded on its rows (and counted), as for the other judges
        for r in safe:
            r.update(error=f"judge: refusal {type(e).__name__}: {e}", refusal_judge=judge.name)
        return
    for r, v in zip(safe, verdicts):
        r.update(refused=None if v.unsafe is None else not v.unsafe, refusal_judge=judge.name)


class JudgeStage:
    """Ray Data actor holding the judges (Llama Guard loads its model once here)."""

    def __init__(self, judge: dict, model: dict, engine: dict):
        self.judges = build_judges(config.build(JudgeCfg, judge), config.build(ModelCfg, model),
                                   config.build(EngineCfg, engine))

    def __call__(self, batch: dict) -> dict:
        rows = judge_rows(self.judges, [json.loads(p) for p in batch["payload"]])
        return {"payload": [json.dumps(r) for r in rows]}
