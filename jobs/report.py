"""Write report.md with PNG plots from a run dir (a demo, pipeline, eval or attack job's run dir).

Run as:
    python jobs/report.py outputs/demo [--out DIR] [--no-mlflow]
    bt-ray report outputs/demo [--out DIR] [--no-mlflow]

Table 1 (unsafe % per set and pooled, helpfulness, reset % on harmful and safe prompts, worst-of-k,
per model, with 95% CIs, and the baseline-vs-backtracking comparisons in words), Table 2 (ASR per
attack), the calibrated [RESET] bias (calibration.json: probes, chosen b, safety and over-refusal at b=0
and at b, its trade-off plot), the training data's counts per source and rule, the [RESET] bias sweep,
worst-of-k and training loss curves, and the command, git sha and date the run came from where recorded.
A part the run dir lacks gets one line saying it was not run. Prints the path of report.md. The
pipeline calls ``bt_ray.report.write_report`` at its end.

When RUN_DIR/summary.json records the pipeline's MLflow run (mlflow.tracking_uri, mlflow.parent_run_id),
report.md and every PNG it shows are logged to that run under the artifact path "report" (--no-mlflow:
not); what was logged is said on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bt_ray.report import log_to_parent_run, write_report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bt-ray report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run_dir", type=Path, help="the run dir to report on (e.g. outputs/demo)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and its PNGs go (default: RUN_DIR)")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false",
                        help="do not log report.md and its PNGs to the pipeline's MLflow run")
    return parser.parse_args(argv)


def main(run_dir: Path, out: Path | None = None, mlflow: bool = True) -> Path:
    path = write_report(run_dir, out)
    print(path)
    logged = log_to_parent_run(run_dir, path) if mlflow else None
    if logged:
        run_id, artifacts = logged
        print(f"logged {len(artifacts)} artifacts to MLflow run {run_id}: {', '.join(artifacts)}",
              file=sys.stderr)
    return path


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args.run_dir, args.out, args.mlflow)
    except (FileNotFoundError, ValueError) as e:
        print(f"bt-ray report: error: {e}", file=sys.stderr)
        sys.exit(2)
