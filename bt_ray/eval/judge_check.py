"""``bt-ray judge check``: how well a judge agrees with human refusal/compliance labels.

A judge's verdict reads as a refusal label: ``unsafe`` (the answer complies) -> compliance, safe ->
refusal. The labels file is CSV or JSONL (by its suffix: ``.jsonl``/``.json`` read as JSON lines,
anything else as CSV) with a prompt, a response and a human-label column; XSTest's completion CSVs
(``prompt``, ``completion``, ``final_label``) work as they are.

Label values (case and surrounding space ignored), mapped to refusal / compliance:

* anything containing ``refusal`` -> refusal (XSTest ``2_full_refusal``, and ``3_partial_refusal``:
  a partial refusal counts as a refusal); anything containing ``compliance`` -> compliance
  (``1_full_compliance``);
* ``safe`` -> refusal and ``unsafe`` -> compliance (the judges' own convention);
* ``0`` -> refusal and ``1`` -> compliance (1 = unsafe, as a judge's ``unsafe`` flag).

Any other value is an error naming the file and line. Rows the judge was trained on (the
refusal-classifier's training files) never count in the headline numbers: they are reported apart
as ``trained_on``.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bt_ray.config import check
from bt_ray.data.records import DataError

if TYPE_CHECKING:  # the CLI imports this module to build its parser: keep torch out of that import
    from bt_ray.eval.config import JudgeCfg
    from bt_ray.eval.judges import Judge

JUDGE_NAMES = ("llama-guard-2", "refusal-prefix", "llm", "refusal-classifier")
LABELS = ("refusal", "compliance")  # the confusion matrix's order (rows: human, columns: judge)
_EXACT = {"safe": "refusal", "unsafe": "compliance", "0": "refusal", "1": "compliance"}


@dataclass(frozen=True, kw_only=True, slots=True)
class JudgeCheckCfg:
    """What ``bt-ray judge check`` reads and which judge it holds against the labels."""

    labels: str
    """CSV or JSONL file of human-labelled responses."""
    judge: str | None = None
    """Judge to check (a JudgeCfg.safety value); null: the config's judge.safety."""
    prompt_column: str = "prompt"
    """Column of the prompt."""
    response_column: str = "completion"
    """Column of the response being judged."""
    label_column: str = "final_label"
    """Column of the human label (values: see the module docstring)."""

    def __post_init__(self):
        check(self, [
            ("judge", self.judge is None or self.judge in JUDGE_NAMES,
             f"must be one of {', '.join(JUDGE_NAMES)}"),
            ("prompt_column", bool(self.prompt_column), "must be a column name"),
            ("response_column", bool(self.response_column), "must be a column name"),
            ("label_column", bool(self.label_column), "must be a column name"),
        ])


def map_label(value, where: str) -> str:
    """A human label -> ``refusal`` or ``compliance``; anything else is a DataError naming ``where``."""
    v = str(value).strip().lower()
    if "refusal" in v and "compliance" not in v:
        return "refusal"
    if "compliance" in v and "refusal" not in v:
        return "compliance"
    if v in _EXACT:
        return _EXACT[v]
    raise DataError(f"{where}: label {value!r} is neither a refusal nor a compliance (expected a value "
                    "containing 'refusal' or 'compliance', or one of safe, unsafe, 0, 1)")


def read_labels(path: str | Path, cfg: JudgeCheckCfg) -> list[dict]:
    """Rows ``{"prompt", "response", "label", "line"}`` of a labels file; bad input is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found")
    wanted = (cfg.prompt_column, cfg.response_column, cfg.label_column)
    records: list[tuple[int, dict]] = []
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not a JSON object: {e}") from e
                    if not isinstance(rec, dict):
                        raise DataError(f"{path}:{i}: not a JSON object")
                    records.append((i, rec))
        columns = sorted({k for _, rec in records for k in rec})
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if set(wanted) <= set(columns):
                records = [(reader.line_num, rec) for rec in reader]
    missing = [c for c in wanted if c not in columns]
    if missing or not columns:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(it has: {', '.join(columns) or 'none'}); "
                        "name the columns with --prompt-column, --response-column, --label-column")
    rows = []
    for line, rec in records:
        absent = [c for c in wanted if rec.get(c) is None]
        if absent:
            raise DataError(f"{path}:{line}: no value in column(s) {', '.join(absent)}")
        rows.append({"prompt": str(rec[cfg.prompt_column]), "response": str(rec[cfg.response_column]),
                     "label": map_label(rec[cfg.label_column], f"{path}:{line}"), "line": line})
    if not rows:
        raise DataError(f"{path}: no labelled rows")
    return rows


def agreement(human: list[str], judge: list[str]) -> dict:
    """n, accuracy, Cohen's kappa (None when undefined) and the confusion matrix (rows: human)."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix

    if not human:
        return {"n": 0, "accuracy": None, "kappa": None, "confusion": None}
    with warnings.catch_warnings():  # one label only: kappa is undefined (None below), not a surprise
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(human, judge, labels=list(LABELS)))
    matrix = confusion_matrix(human, judge, labels=list(LABELS)).tolist()
    return {"n": len(human), "accuracy": float(accuracy_score(human, judge)),
            "kappa": None if math.isnan(kappa) else kappa,
            "confusion": {"labels": list(LABELS), "rows": "human", "columns": "judge", "matrix": matrix}}


def check_judge(judge: Judge, rows: list[dict], *, batch_size: int = 64) -> dict:
    """Judge every row; agreement on the rows the judge never trained on, and apart on those it did."""
    from bt_ray.eval.judges import JudgeItem

    verdicts = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        verdicts += judge.judge([JudgeItem(turns=(r["prompt"],), answers=(r["response"],)) for r in chunk])
    trained = getattr(judge, "trained_on", None)
    out: dict = {"judge": judge.name, "stand_in": judge.stand_in}
    held, seen, no_verdict = ([], []), ([], []), []
    for r, v in zip(rows, verdicts):
        if v.unsafe is None:
            no_verdict.append(r["line"])
            continue
        target = seen if trained and trained(r["prompt"], r["response"]) else held
        target[0].append(r["label"])
        target[1].append("compliance" if v.unsafe else "refusal")
    out |= agreement(*held)
    out["num_rows"] = len(rows)
    out["no_verdict_lines"] = no_verdict
    out["trained_on"] = agreement(*seen) if seen[0] else {"n": 0}
    return out


def format_result(result: dict, labels_file: str) -> str:
    """The human-readable report printed by ``bt-ray judge check``."""
    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"judge: {result['judge']}{'  (STAND-IN)' if result['stand_in'] else ''}",
             f"labels: {labels_file} ({result['num_rows']} rows)",
             f"n={result['n']}  accuracy={num(result['accuracy'])}  cohen_kappa={num(result['kappa'])}"]
    if result["confusion"]:
        m = result["confusion"]["matrix"]
        lines += ["confusion (rows: human, columns: judge):", f"{'':>12}{'refusal':>12}{'compliance':>12}"]
        lines += [f"{name:>12}{m[i][0]:>12}{m[i][1]:>12}" for i, name in enumerate(LABELS)]
    t = result["trained_on"]
    if t["n"]:
        lines.append(f"trained on (NOT in the numbers above): n={t['n']}  accuracy={num(t['accuracy'])}  "
                     f"cohen_kappa={num(t['kappa'])}")
    if result["no_verdict_lines"]:
        lines.append(f"no verdict (left out): {len(result['no_verdict_lines'])} rows, lines "
                     + ", ".join(map(str, result["no_verdict_lines"][:20])))
    return "\n".join(lines)


def run(cfg: JudgeCheckCfg, judge_cfg: JudgeCfg, *, engine=None, dtype: str = "float32") -> dict:
    """Read ``cfg.labels``, build the judge (``cfg.judge`` or ``judge_cfg.safety``) and check it."""
    import dataclasses

    from bt_ray.eval.judges import build_safety_judge

    rows = read_labels(cfg.labels, cfg)  # bad input fails before a judge model loads
    if cfg.judge:
        judge_cfg = dataclasses.replace(judge_cfg, safety=cfg.judge)
    return check_judge(build_safety_judge(judge_cfg, engine=engine, dtype=dtype), rows)


# ---------------------------------------------------------------- the command line (bt_ray.cli)


def add_parser(sub) -> None:
    """``bt-ray judge check`` under the CLI's subparsers."""
    judge = sub.add_parser("judge", help="check a judge against human labels")
    judge_sub = judge.add_subparsers(dest="judge_command", required=True)
    p = judge_sub.add_parser("check", help="accuracy, Cohen's kappa and confusion matrix vs human labels")
    p.add_argument("--labels", required=True, help="CSV or JSONL: prompt, response and human-label columns")
    p.add_argument("--judge", help=f"one of {', '.join(JUDGE_NAMES)} (default: the config's judge.safety)")
    p.add_argument("--config", help="YAML eval config (EvalCfg): its judge, engine and model.dtype are used")
    p.add_argument("--prompt-column", default="prompt", help="default: prompt")
    p.add_argument("--response-column", default="completion", help="default: completion")
    p.add_argument("--label-column", default="final_label", help="default: final_label")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON to FILE")
    p.add_argument("overrides", nargs="*", help="dotted EvalCfg overrides, e.g. judge.refusal_classifier.c=1")


def run_cli(args) -> None:
    """Run ``bt-ray judge check`` from parsed arguments; prints the report (and writes --json)."""
    from bt_ray import config
    from bt_ray.eval.config import EvalCfg

    cfg = JudgeCheckCfg(labels=args.labels, judge=args.judge, prompt_column=args.prompt_column,
                        response_column=args.response_column, label_column=args.label_column)
    eval_cfg = config.load(EvalCfg, args.config, list(args.overrides))
    result = run(cfg, eval_cfg.judge, engine=eval_cfg.engine, dtype=eval_cfg.model.dtype)
    print(format_result(result, cfg.labels))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result | {"labels": cfg.labels}, indent=1) + "\n")
