"""Store report.md and the PNGs it shows in the pipeline's parent MLflow run (artifact path ``report``).

The pipeline (jobs/pipeline.py) records its parent run in ``<run_dir>/summary.json`` under ``mlflow``
(``tracking_uri``, ``parent_run_id``) before its report stage runs; ``bt-ray report RUN_DIR`` on such a
run dir logs there too. The run may be finished: ``MlflowClient.log_artifact`` writes into the run's
artifact location (the pipeline's experiment puts it under ``<run_dir>/mlflow-artifacts``) whatever its
status. A run dir without that record (a demo's, an eval job's own) logs nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ARTIFACT_PATH = "report"
# ![title](relative/path.png): how bt_ray.report links its images (a title may hold brackets: [RESET])
_IMAGE = re.compile(r"!\[.*?\]\(([^)\s]+\.png)\)")


def referenced_pngs(report: Path) -> list[Path]:
    """The PNGs ``report`` links to (relative to its folder), in order, each once.

    Raises:
        FileNotFoundError: a linked PNG is missing (the report would show a broken image).
    """
    out: list[Path] = []
    for link in _IMAGE.findall(report.read_text()):
        path = report.parent / link
        if not path.is_file():
            raise FileNotFoundError(f"{report} links {link}, which is not a file at {path}")
        if path not in out:
            out.append(path)
    return out


def parent_run(run_dir: str | Path) -> tuple[str, str] | None:
    """``(tracking_uri, parent_run_id)`` from ``<run_dir>/summary.json``'s ``mlflow``; None when absent.

    Raises:
        ValueError: summary.json has an ``mlflow`` record without a tracking_uri or parent_run_id.
    """
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    record = summary.get("mlflow") if isinstance(summary, dict) else None
    if not isinstance(record, dict) or "parent_run_id" not in record:
        return None
    missing = [k for k in ("tracking_uri", "parent_run_id") if not record.get(k)]
    if missing:
        raise ValueError(f"{path}: mlflow.{' and mlflow.'.join(missing)} empty; cannot log the report to the "
                         "pipeline's MLflow run (use --no-mlflow to skip)")
    return str(record["tracking_uri"]), str(record["parent_run_id"])


def log_report(report: str | Path, tracking_uri: str, run_id: str) -> list[str]:
    """Log ``report`` and every PNG it links to run ``run_id`` under ``report/``; returns the artifact
    paths (``report/report.md``, ``report/<png>``: a PNG in a subfolder keeps it)."""
    from bt_ray import tracking

    report = Path(report)
    client = tracking.client(tracking_uri)
    client.get_run(run_id)  # a clear MLflow error naming the run, before anything is logged
    logged = []
    for path in [report, *referenced_pngs(report)]:
        sub = path.parent.relative_to(report.parent).as_posix()
        dest = ARTIFACT_PATH if sub == "." else f"{ARTIFACT_PATH}/{sub}"
        client.log_artifact(run_id, str(path), dest)
        logged.append(f"{dest}/{path.name}")
    return logged


def log_to_parent_run(run_dir: str | Path, report: str | Path) -> tuple[str, list[str]] | None:
    """``log_report`` into the pipeline's parent run of ``run_dir``; None when the run dir records none.
    Returns ``(run_id, artifact paths)``."""
    found = parent_run(run_dir)
    if found is None:
        return None
    uri, run_id = found
    return run_id, log_report(report, uri, run_id)
