"""``report.md`` with PNG plots from a run dir: what a user reads after a demo or pipeline run.

``write_report(run_dir)`` finds each part by its summary files (``collect``), so it reads a demo or
pipeline run dir as well as an eval or attack job's own; a part that is absent gets one line saying it
was not run. The tables and plots reuse the eval's and attacks' own helpers, so the report's numbers
are the ones those jobs print. ``artifacts.log_to_parent_run`` stores report.md and its PNGs in the
pipeline's parent MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from bt_ray.attacks.report import prefill_curve, table2
from bt_ray.eval.report import format_pairs, side_by_side
from bt_ray.report import markdown as md
from bt_ray.report import plots, sections
from bt_ray.report.artifacts import log_to_parent_run
from bt_ray.report.collect import Run, collect

__all__ = ["collect", "log_to_parent_run", "render", "write_report"]


def _image(title: str, path: Path, out_dir: Path) -> str:
    return f"![{title}]({path.relative_to(out_dir).as_posix()})\n"


def render(run: Run, out_dir: Path) -> str:
    """The markdown of ``run``; writes its PNGs into ``out_dir``."""
    parts = [f"# bt-ray report: {run.dir}\n"]

    parts.append("## Table 1: safety, helpfulness and reset rates\n")
    ev = run.eval
    if ev is None:
        parts.append(md.not_run("Evaluation", f"no eval summary.json under {run.dir}"))
    else:
        parts += [f"From `{ev.dir / 'summary.json'}`.\n", md.table1(ev),
                  "### Baseline vs backtracking\n", md.comparisons(ev)]
        details = side_by_side(ev.metrics)
        if ev.summary.get("comparisons"):
            details += "\n\n" + format_pairs(ev.summary["comparisons"])
        parts.append("<details><summary>Full eval table and comparisons</summary>\n\n```\n" + details
                     + "\n```\n</details>\n")

    parts.append("## Table 2: attack success rate (ASR) per attack\n")
    at = run.attacks
    if at is None or not at.results:
        parts.append(md.not_run("Attacks", f"no attack summary.json under {run.dir}"))
    else:
        parts += [f"From `{at.dir}`.\n", table2(at.results, at.order)]
        sentences = md.attack_sentences(at)
        if sentences:
            parts += ["### Paired differences (same behaviours, same attack)\n", sentences]
        curve = prefill_curve(at.results, out_dir / "prefill_curve.png")
        if curve:
            parts.append(_image("prefilling attack: ASR and recovery against k", curve, out_dir))

    parts.append("## Calibrated [RESET] bias\n")
    if run.calibration is None:
        parts.append(md.not_run("Calibration", f"no calibration.json under {run.dir}"))
    else:
        parts.append(sections.calibration(run.calibration, out_dir, _image))

    parts.append("## Plots\n")
    parts.append("### [RESET] bias trade-off\n")
    sweep = plots.bias_sweep_plot(ev, out_dir) if ev else None
    parts.append(_image("[RESET] bias sweep", sweep, out_dir) if sweep else
                 md.not_run("Bias sweep", "no model in the eval has a bias_sweep" if ev else "no eval"))
    parts.append("### Worst-of-k\n")
    wok = plots.worst_of_k_plot(plots.worst_of_k_curves(ev), out_dir / "worst_of_k.png") if ev else None
    parts.append(_image("unsafe % against k", wok, out_dir) if wok else
                 md.not_run("Worst-of-k", "no model in the eval has worst_of_k" if ev else "no eval"))

    parts.append("## Training data\n")
    if not run.training_data:
        parts.append(md.not_run("Training data summary", f"no data/*.summary.json of on-policy data under "
                                f"{run.dir}"))
    for data in run.training_data:
        parts.append(sections.training_data(data))

    parts.append("## Training\n")
    if not run.training:
        parts.append(md.not_run("Training", f"no training metrics.jsonl under {run.dir}"))
    else:
        parts.append(md.training_table(run.training))
        for stage, png in plots.loss_plots(run.dir, run.training, out_dir).items():
            parts += [f"Training loss per step, {stage} runs:\n", _image(f"{stage} loss", png, out_dir)]

    parts += ["## Provenance\n", md.provenance(run.provenance)]
    return "\n".join(parts)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir`` (default: ``run_dir``); returns report.md's path.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory, or holds no eval, attack or training output.
    """
    run = collect(run_dir)
    if run.eval is None and run.attacks is None and not run.training and run.calibration is None:
        raise FileNotFoundError(f"{run_dir} holds no eval summary, attack summary, calibration.json or "
                                "training run (metrics.jsonl beside a summary.json): nothing to report")
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(render(run, out))
    return path
