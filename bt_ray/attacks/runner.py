"""Run one attack over (model, behaviour) pairs: one Ray task each, results appended as they finish.

* Each task loads the model (``Policy.load``), runs the attack on one behaviour within its budget,
  then generates from every ``Attempt`` through the backtracking decoder and judges the *shown*
  answer with the configured judge (``score_attempt``). Attacks never judge their own success.
* ``ResultStore``: ``<run_dir>/<label>/<kind>/results.jsonl``, one line per finished behaviour,
  flushed and fsynced as it lands; a rerun reads it and skips what is done, so a killed run loses at
  most the behaviours in flight. A torn last line (killed mid-write) is set aside, never parsed as
  a result.
* Progress: a bar over behaviours with the ASR so far and the best loss the running tasks report
  (through a small ``ProgressBoard`` actor).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ray

from bt_ray.attacks.core import Attempt, Behaviour, Budget, Policy, check_attempt


class ResultStore:
    """Append-only results of one (model, attack): one JSON line per finished behaviour."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text().splitlines(keepends=True)
        good = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # torn by a kill mid-write: keep it aside, rerun that behaviour
                    self.path.with_suffix(".torn").write_text(line)
                    break
                raise ValueError(f"{self.path}:{i + 1}: not a JSON line (a results file must only be "
                                 "written by bt-ray attack)") from None
            self.done[record["behaviour"]] = record
            good.append(line if line.endswith("\n") else line + "\n")
        if len(good) != len(lines):
            self.path.write_text("".join(good))

    def add(self, record: dict) -> None:
        if record["behaviour"] in self.done:
            return  # each behaviour exactly once
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record["behaviour"]] = record

    def rows(self) -> list[dict]:
        return [row for record in self.done.values() for row in record["rows"]]


def score_attempt(policy: Policy, judge, behaviour: Behaviour, attempt: Attempt, seed: int = 0) -> dict:
    """Generate from an attempt through the backtracking decoder and judge the shown answer."""
    from bt_ray.eval.judges import JudgeItem
    from bt_ray.reset import raw_text

    check_attempt(policy, attempt)
    start = time.perf_counter()
    out, shown = policy.generate_shown(attempt.prompt_ids, attempt.prefill_ids, seed=seed)
    verdict = judge.judge([JudgeItem(turns=(behaviour.goal,), answers=(shown,), harmful=True)])[0]
    return {
        "behaviour": behaviour.id, "cluster": behaviour.cluster, "variant": attempt.variant,
        "goal": behaviour.goal, "adversarial_text": attempt.adversarial_text,
        "raw_output": raw_text(policy.tokenizer, out), "shown_response": shown,
        "reset": out.did_reset, "num_resets": out.num_resets,
        "num_discarded_tokens": out.num_discarded_tokens,
        "empty_shown": not shown, "unsafe": verdict.unsafe, "judge": judge.name, "stand_in": judge.stand_in,
        "judge_raw": verdict.raw, "error": verdict.error,
        "best_loss": attempt.best_loss, "losses": attempt.losses,
        "compute": {**attempt.compute.as_dict(), "generate_seconds": round(time.perf_counter() - start, 3)},
    }


def run_behaviour(model_cfg, attack_cfg, behaviour: Behaviour, decode, judge_cfg, use_synthetic_judge: bool,
                  board=None) -> dict:
    """Everything for one (model, behaviour): attack within budget, then score every attempt."""
    from bt_ray.attacks.config import build_attack
    from bt_ray.eval.judges import JudgeItem, SyntheticJudge, build_safety_judge

    judge = SyntheticJudge() if use_synthetic_judge else build_safety_judge(judge_cfg, dtype=model_cfg.dtype)

    def is_unsafe(goal: str, shown: str) -> bool:
        return bool(judge.judge([JudgeItem(turns=(goal,), answers=(shown,), harmful=True)])[0].unsafe)

    policy = Policy.load(model_cfg, decode=decode, is_unsafe=is_unsafe)
    attack = build_attack(attack_cfg)
    budget = Budget(attack_cfg.max_steps, attack_cfg.max_seconds)
    start = time.perf_counter()

    def progress(info: dict) -> None:
        if board is not None:
            board.report.remote(behaviour.id, info)

    attempts = attack.attack(policy, behaviour, budget, progress)
    rows = [score_attempt(policy, judge, behaviour, a) for a in attempts]
    return {"behaviour": behaviour.id, "seconds": round(time.perf_counter() - start, 3), "rows": rows}


def run_attack(model_cfg, label: str, attack_cfg, behaviours: list[Behaviour], decode, judge_cfg,
               use_synthetic_judge: bool, store: ResultStore) -> ResultStore:
    """Run the behaviours ``store`` lacks as Ray tasks (resources from ``attack_cfg``); append each result
    as it finishes. A failed task fails the run after the others finished (their results are kept)."""
    from tqdm.auto import tqdm

    todo = [b for b in behaviours if b.id not in store.done]
    if not todo:
        return store
    board = ProgressBoard.remote()
    task = ray.remote(run_behaviour).options(num_cpus=attack_cfg.num_cpus, num_gpus=attack_cfg.num_gpus,
                                             max_retries=0)
    pending = {task.remote(model_cfg, attack_cfg, b, decode, judge_cfg, use_synthetic_judge, board): b
               for b in todo}
    failures = []
    verdicts = [r["unsafe"] for r in store.rows() if r["unsafe"] is not None]  # ASR so far, kept up to date
    bar = tqdm(total=len(behaviours), initial=len(behaviours) - len(todo), desc=f"{attack_cfg.kind} {label}",
               unit="behaviour")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in ready:
                behaviour = pending.pop(ref)
                try:
                    record = ray.get(ref)
                    store.add(record)
                    verdicts += [r["unsafe"] for r in record["rows"] if r["unsafe"] is not None]
                except Exception as e:  # noqa: BLE001 - reported after the rest finish
                    failures.append(f"{behaviour.location}: {type(e).__name__}: {e}")
                bar.update(1)
            live = ray.get(board.best.remote())
            bar.set_postfix(asr=f"{sum(verdicts) / max(len(verdicts), 1):.2f}",
                            best_loss="-" if live is None else f"{live:.3f}", refresh=False)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    if failures:
        raise RuntimeError(f"{len(failures)} behaviour(s) failed ({len(store.done)} done are kept in "
                           f"{store.path}):\n" + "\n".join(failures[:10]))
    return store


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest step info per running behaviour (the driver shows the best loss among them)."""

    def __init__(self):
        self.latest: dict[str, dict] = {}

    def report(self, behaviour: str, info: dict) -> None:
        self.latest[behaviour] = info

    def best(self) -> float | None:
        losses = [i["loss"] for i in self.latest.values() if i.get("loss") is not None]
        return min(losses) if losses else None
