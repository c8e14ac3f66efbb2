"""The report's PNGs: the [RESET] bias trade-off (``eval.report.plot_sweep``), worst-of-k curves, and
training loss curves (``tune.report.loss_curves``, one figure per stage: SFT and DPO losses are on
different scales)."""

from __future__ import annotations

from pathlib import Path

from bt_ray.eval.metrics import worst_of_k
from bt_ray.eval.report import plot_sweep
from bt_ray.report.collect import Eval, TrainingRun, read_jsonl
from bt_ray.tune.report import loss_curves


def bias_sweep_plot(evaluation: Eval, out_dir: Path) -> Path | None:
    """The trade-off curve of every model that ran a bias sweep; None when none did."""
    points = {label: m["bias_sweep"] for label, m in evaluation.metrics.items() if m.get("bias_sweep")}
    return plot_sweep(points, out_dir / "bias_sweep.png") if points else None


def worst_of_k_curves(evaluation: Eval) -> dict[str, dict[int, dict]]:
    """Unsafe rate against k per model: k = 1..max from the worst-of-k rows where they are on disk (the
    configured k's give the same numbers as metrics.json), else the configured k's from the metrics."""
    curves = {}
    for label, m in evaluation.metrics.items():
        configured = {int(k): r for k, r in (m.get("worst_of_k") or {}).items()}
        if not configured:
            continue
        rows_path = evaluation.worst_of_k_rows.get(label)
        if rows_path is not None:
            # rates and Wilson intervals only: the bootstrap is not plotted, so keep it small
            curves[label] = worst_of_k(read_jsonl(rows_path), range(1, max(configured) + 1), num_resamples=50)
        else:
            curves[label] = configured
    return curves


def worst_of_k_plot(curves: dict[str, dict[int, dict]], path: Path) -> Path | None:
    """Unsafe % against k (Wilson 95% CI bars), one line per model; None when no model ran worst-of-k."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, by_k in curves.items():
        ks = sorted(k for k, r in by_k.items() if r["rate"] is not None)
        rates = [100 * by_k[k]["rate"] for k in ks]
        errors = [[max(0.0, r - 100 * by_k[k]["ci_low"]) for k, r in zip(ks, rates)],
                  [max(0.0, 100 * by_k[k]["ci_high"] - r) for k, r in zip(ks, rates)]]
        ax.errorbar(ks, rates, yerr=errors, marker="o", capsize=3, label=label)
    ax.set_xlabel("k (samples per harmful prompt)")
    ax.set_ylabel("unsafe % (any of the first k samples)")
    ax.set_title("worst-of-k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_plots(run_dir: Path, training: list[TrainingRun], out_dir: Path) -> dict[str, Path]:
    """``{stage: loss_<stage>.png}``: one line per training run of that stage."""
    out = {}
    for stage in sorted({t.stage for t in training}):
        rows = [{"trial": t.name} for t in training if t.stage == stage]
        out[stage] = loss_curves(rows, run_dir, out_dir / f"loss_{stage}.png")
    return out
