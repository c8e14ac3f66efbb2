"""Find the parts of a run dir by their summary files, whatever job laid the dir out.

A demo or pipeline run dir holds ``eval/``, ``runs/`` and (pipeline) an attack run dir; an eval or attack
job's own run dir is one part alone. So each part is found by what its files hold, not by its folder's
name: an eval summary has ``models`` with per-model ``metrics`` and ``comparisons``
(jobs/eval.py), an attack summary has ``table2`` and ``attack`` (jobs/attack.py), and a training run is
a folder with ``metrics.jsonl`` beside a ``summary.json`` that names its ``stage`` (jobs/sft.py,
jobs/dpo.py). A calibration (jobs/calibrate.py) is its ``calibration.json``, found the same way; the
training data's summary is ``<out>.summary.json`` beside an on-policy data file (jobs/onpolicy.py: it
counts per ``sources`` and per ``rules``), under ``data/`` of a pipeline run dir. Every part is optional;
``Run`` says which were found.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

# Folders that never hold a part and can be large: model weights, checkpoints, MLflow's files.
SKIP_DIRS = {"mlflow-artifacts", "mlartifacts", "mlruns", "model", "model-init", "data", "hf", "best",
             "__pycache__", ".git"}
MAX_DEPTH = 4  # run_dir/attacks/<attack run>/summary.json is depth 2; keep the walk cheap on big dirs


@dataclasses.dataclass
class Eval:
    """An eval job's output."""

    dir: Path  # the eval run dir (holds summary.json)
    summary: dict  # its summary.json
    metrics: dict[str, dict]  # label -> metrics.json, in the summary's model order
    worst_of_k_rows: dict[str, Path]  # label -> worst_of_k/rows.jsonl, where it exists


@dataclasses.dataclass
class Attacks:
    """An attack job's run dir: every attack run so far in it."""

    dir: Path  # the attack run dir (holds summary.json, table2.md)
    summary: dict  # its summary.json (the last attack run)
    results: dict[str, dict[str, dict]]  # label -> attack kind -> attacks.report.summarize output
    order: list[str]  # model labels, the summary's models first


@dataclasses.dataclass
class TrainingRun:
    """One training run (SFT or DPO): its per-step log and its summary."""

    name: str  # its folder relative to the run dir, e.g. runs/sft-backtrack
    stage: str  # sft | dpo (the summary's ``stage``)
    dir: Path
    summary: dict


@dataclasses.dataclass
class Calibration:
    """A calibration job's output: the chosen [RESET] bias per model and what it buys."""

    dir: Path  # the calibration run dir (holds calibration.json, calibration.png, <label>/report_*/)
    summary: dict  # its calibration.json
    report_metrics: dict[str, dict[str, dict]]  # label -> "b0" | "chosen" -> that report pass's metrics.json


@dataclasses.dataclass
class DataSummary:
    """An on-policy data file's summary (counts per source and per rule, the judge)."""

    path: Path  # the <out>.summary.json
    summary: dict


@dataclasses.dataclass
class Run:
    """What a run dir holds; a part is None (or empty) when the run dir has none."""

    dir: Path
    summary: dict | None  # the run dir's own summary.json, whatever made it
    eval: Eval | None
    attacks: Attacks | None
    training: list[TrainingRun]
    provenance: dict[str, str]  # command, git_sha, date, config: those that are recorded
    calibration: Calibration | None = None
    training_data: list[DataSummary] = dataclasses.field(default_factory=list)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _summaries(run_dir: Path, name: str = "summary.json") -> list[tuple[Path, dict]]:
    """Every ``name`` (a JSON object) within MAX_DEPTH folders of ``run_dir``, shallowest first."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        depth = len(Path(root).relative_to(run_dir).parts)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("checkpoint")
                         and depth < MAX_DEPTH)
        if name in files:
            data = _read_json(Path(root) / name)
            if data is not None:
                found.append((depth, Path(root), data))
    found.sort(key=lambda t: (t[0], str(t[1])))
    return [(path, data) for _, path, data in found]


def is_eval_summary(data: dict) -> bool:
    models = data.get("models")
    return (isinstance(models, dict) and "comparisons" in data
            and all(isinstance(m, dict) and "metrics" in m for m in models.values()))


def is_attack_summary(data: dict) -> bool:
    return "table2" in data and "attack" in data


def _eval(path: Path, summary: dict) -> Eval:
    metrics, wok = {}, {}
    for label, model in summary["models"].items():
        on_disk = _read_json(path / label / "metrics.json")  # as the eval wrote it; else the summary's copy
        metrics[label] = on_disk if on_disk is not None else model["metrics"]
        rows = path / label / "worst_of_k" / "rows.jsonl"
        if rows.is_file():
            wok[label] = rows
    return Eval(path, summary, metrics, wok)


def _attacks(path: Path, summary: dict) -> Attacks:
    results: dict[str, dict[str, dict]] = {}
    for p in sorted(path.glob("*/*/summary.json")):  # <label>/<kind>/summary.json, as jobs/attack.py writes
        data = _read_json(p)
        if data is not None:
            results.setdefault(p.parent.parent.name, {})[p.parent.name] = data
    order = [label for label in summary.get("models", {}) if label in results]
    return Attacks(path, summary, results, order + [label for label in results if label not in order])


def is_calibration(data: dict) -> bool:
    models = data.get("models")
    return ("target_reset_rate" in data and isinstance(models, dict)
            and all(isinstance(m, dict) and "probes" in m for m in models.values()))


def _calibration(path: Path, summary: dict) -> Calibration:
    """calibration.json and, per model, the metrics.json of its report passes at b=0 and at the chosen b
    (jobs/calibrate.py writes them under <label>/report_b0 and <label>/report_chosen): they hold the safe
    report sets' reset and over-refusal rates, which calibration.json does not."""
    metrics: dict[str, dict[str, dict]] = {}
    for label in summary["models"]:
        for point, folder in (("b0", "report_b0"), ("chosen", "report_chosen")):
            data = _read_json(path / label / folder / "metrics.json")
            if data is not None:
                metrics.setdefault(label, {})[point] = data
    return Calibration(path, summary, metrics)


def is_data_summary(data: dict) -> bool:
    return isinstance(data.get("sources"), list) and isinstance(data.get("rules"), dict)


def _training_data(run_dir: Path) -> list[DataSummary]:
    """On-policy data summaries in ``run_dir/data/`` (a pipeline's) or ``run_dir`` (an on-policy job's out
    folder); ``data/`` is otherwise skipped, as it holds the (large) data files."""
    found = []
    for folder in (run_dir / "data", run_dir):
        for path in sorted(folder.glob("*.summary.json")):
            data = _read_json(path)
            if data is not None and is_data_summary(data):
                found.append(DataSummary(path, data))
    return found


def _provenance(run_dir: Path, summary: dict | None, training: list[TrainingRun]) -> dict[str, str]:
    """The command, git sha and date the run came from, where its summary.json recorded them; the git sha
    falls back to the training runs' (which jobs/sft.py and jobs/dpo.py record)."""
    s = summary or {}
    out = {}
    command = s.get("command") or s.get("argv")
    if command:
        out["command"] = command if isinstance(command, str) else " ".join(map(str, command))
    if s.get("git_sha"):
        out["git_sha"] = str(s["git_sha"])
    else:
        shas = sorted({t.summary["git_sha"] for t in training if t.summary.get("git_sha")})
        if shas:
            out["git_sha"] = ", ".join(shas) + " (recorded by the training runs)"
    for key in ("date", "finished_at", "started_at", "created_at"):
        if s.get(key):
            out["date"] = str(s[key])
            break
    config = run_dir / "config.yaml"
    if config.is_file():
        out["config"] = str(config)
    return out


def collect(run_dir: str | Path) -> Run:
    """Read every part ``run_dir`` holds.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist or is not a directory")
    summaries = _summaries(run_dir)
    evals = [(p, d) for p, d in summaries if is_eval_summary(d)]
    attacks = [(p, d) for p, d in summaries if is_attack_summary(d)]
    training = []
    for path, data in summaries:
        if "stage" in data and (path / "metrics.jsonl").is_file():
            training.append(TrainingRun(str(path.relative_to(run_dir)), str(data["stage"]), path, data))
    training.sort(key=lambda t: t.name)
    own = _read_json(run_dir / "summary.json")
    calibrations = [(p, d) for p, d in _summaries(run_dir, "calibration.json") if is_calibration(d)]
    return Run(run_dir, own, _eval(*evals[0]) if evals else None, _attacks(*attacks[0]) if attacks else None,
               training, _provenance(run_dir, own, training),
               _calibration(*calibrations[0]) if calibrations else None, _training_data(run_dir))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
