"""What the pipeline prints at the end: Table 1 (report.md's rows, from eval's metrics) and the comparisons
in plain words."""

from __future__ import annotations

import time
from pathlib import Path

from bt_ray.pipeline.console import Console, elapsed


def table1(metrics_by_model: dict[str, dict]) -> str:
    """Table 1 as fixed-width text: report.md's rows (``report.markdown.table1_rows``), a column per model."""
    from bt_ray.report.markdown import table1_rows

    labels, rows = list(metrics_by_model), table1_rows(metrics_by_model)
    width = max(len(k) for k, _ in rows)
    col = max(16, *(len(label) for label in labels), *(len(c) for _, cells in rows for c in cells))
    head = " " * width + " | " + " | ".join(f"{label:{col}s}" for label in labels)
    return "\n".join([head, "-" * len(head)] + [f"{k:{width}s} | " + " | ".join(f"{c:{col}s}" for c in cells)
                                                for k, cells in rows])


def in_words(c: dict) -> str:
    """One comparison of eval (``compare_pair``'s dict) in plain words, quoting its cluster-bootstrap 95%
    CI. A difference is claimed by the report's rule (``report.markdown.direction``: both the cluster
    bootstrap and the paired Newcombe interval exclude 0), so the terminal and report.md agree."""
    from bt_ray.report.markdown import direction

    head = f"{c['backtrack']} vs {c['baseline']} ({c['key']}, {c['n']} prompts)"
    if not c.get("n") or c.get("difference") is None:
        return f"{head}: no prompt judged on both sides"
    d, lo, hi = (100 * c[k] for k in ("difference", "cluster_ci_low", "cluster_ci_high"))
    ci = f"[{lo:+.1f}, {hi:+.1f}]"
    if direction(c) > 0:
        return f"{head}: backtracking is less unsafe by {d:.1f} points {ci}"
    if direction(c) < 0:
        return f"{head}: backtracking is MORE unsafe by {-d:.1f} points {ci}"
    return f"{head}: no difference beyond the CI ({d:+.1f} points {ci})"


def attacks_in_words(summary: dict) -> list[str]:
    """One line per attacked model: attack success rate per variant (prefilling: per k), from
    jobs/attack.py's per-model summaries."""
    import json
    from pathlib import Path

    out = []
    for label, path in summary.get("results", {}).items():
        by_variant = json.loads(Path(path).read_text())
        rates = ", ".join(f"{v} {100 * s['asr']['rate']:.0f}%" for v, s in by_variant.items()
                          if s["asr"].get("rate") is not None)
        out.append(f"{summary['attack']} attack on {label}: ASR {rates or '-'}")
    return out


def report_stage(run_dir: Path, console: Console) -> Path | None:
    """report.md with plots (bt_ray.report), when that package is installed; else one line. report.md and
    its PNGs then go to the pipeline's parent MLflow run (artifact path "report"; the run's id and store
    are in <run_dir>/summary.json, written before this stage)."""
    try:
        from bt_ray.report import log_to_parent_run, write_report
    except ImportError:
        console.say("-- report: skipped (bt_ray.report is not installed in this checkout)")
        return None
    t0 = time.perf_counter()
    console.say("-> report")
    with console.capture("report") as log:
        path = write_report(run_dir)
        logged = log_to_parent_run(run_dir, path)
    console.say(f"   report done in {elapsed(t0)}; log: {log}")
    if logged:
        run_id, artifacts = logged
        console.say(f"   report.md and {len(artifacts) - 1} figures stored in MLflow run {run_id} (report/)")
    return Path(path)


def print_results(console: Console, out: dict) -> None:
    """What the user came for, at the end: Table 1, the comparisons in plain words, the attacks' ASR and
    the serve check's answers."""
    evaluation = out.get("eval")
    if evaluation:
        metrics = {label: m["metrics"] for label, m in evaluation["models"].items()}
        console.say("\nTable 1 (% with 95% CI):\n" + table1(metrics))
        for c in evaluation.get("comparisons", []):
            console.say(in_words(c))
    for attack in (out.get("attacks") or {}).values():
        for line in attacks_in_words(attack):
            console.say(line)
    for answer in out.get("served") or []:
        console.say(f"serve check [{'harmful' if answer['harmful'] else 'benign'}]: "
                    f"{'reset' if answer['reset'] else 'no reset'}, shown {answer['answer'][:60]!r}")
