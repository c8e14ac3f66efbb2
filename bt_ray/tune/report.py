"""After the trials: the results table, the best trial, its model at ``<sweep>/best/model``, the heatmap."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from bt_ray.tune.grid import SHORT_NAMES, Trial, format_value

COLUMNS = ("trial", "dev_unsafe_rate", "dev_reset_rate", "dev_helpful_rate", "eval_loss", "train_loss",
           "dev_num_prompts", "dev_num_errors", "model_dir", "mlflow_run_id")


def _number(value) -> float:
    return math.nan if value is None or value == "" else float(value)


def results_table(trials: list[Trial], results: dict[str, dict], path: Path) -> list[dict]:
    """One row per trial, in grid order, with its params and reported metrics; written as CSV.

    Raises:
        RuntimeError: a trial with no reported result (it failed), naming it.
    """
    missing = [t.name for t in trials if t.name not in results]
    if missing:
        raise RuntimeError(f"trials without a result (failed or not run): {', '.join(missing)}")
    param_cols = list(trials[0].params)
    rows = []
    for t in trials:
        r = results[t.name]
        rows.append({"trial": t.name, **{k: t.params[k] for k in param_cols},
                     **{k: r.get(k) for k in COLUMNS if k != "trial"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", *param_cols, *COLUMNS[1:]])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def pick_best(rows: list[dict], metric: str, mode: str) -> dict:
    """The best row by ``metric`` (``mode`` min or max), ties broken by the lower eval_loss, then grid
    order. A trial whose metric is missing (nan) ranks last.

    Raises:
        ValueError: no trial reports ``metric``.
    """
    if all(math.isnan(_number(r.get(metric))) for r in rows):
        raise ValueError(f"selection.metric {metric!r}: no trial reported a value")
    sign = 1.0 if mode == "min" else -1.0

    def key(indexed):
        i, r = indexed
        m, loss = _number(r.get(metric)), _number(r.get("eval_loss"))
        return (math.isnan(m), sign * m if not math.isnan(m) else 0.0,
                loss if not math.isnan(loss) else math.inf, i)

    return min(enumerate(rows), key=key)[1]


def link_best(best: dict, best_dir: Path) -> Path:
    """``best_dir/model`` -> the best trial's model (a relative symlink, valid if the sweep dir moves),
    and ``best_dir/trial.json`` naming the trial. Replaces an earlier link."""
    best_dir.mkdir(parents=True, exist_ok=True)
    link = best_dir / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(Path(best["model_dir"]).resolve(), best_dir.resolve()))
    (best_dir / "trial.json").write_text(json.dumps(best, indent=2, default=str))
    return link


def heatmap(rows: list[dict], params: list[str], metric: str, path: Path, best: str | None = None) -> Path:
    """The metric over the first two swept fields (lr x epochs, beta x lr); one row for a 1-D grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(dict.fromkeys(r[params[0]] for r in rows))
    ys = list(dict.fromkeys(r[params[1]] for r in rows)) if len(params) > 1 else [None]
    grid = [[math.nan] * len(xs) for _ in ys]
    for r in rows:
        y = ys.index(r[params[1]]) if len(params) > 1 else 0
        grid[y][xs.index(r[params[0]])] = _number(r.get(metric))
    fig, ax = plt.subplots(figsize=(1.4 * len(xs) + 2, 0.9 * len(ys) + 1.6))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for yi, row in enumerate(grid):
        for xi, v in enumerate(row):
            ax.text(xi, yi, "-" if math.isnan(v) else f"{v:.3g}", ha="center", va="center", color="w")
    ax.set_xticks(range(len(xs)), [format_value(x) for x in xs])
    ax.set_xlabel(SHORT_NAMES.get(params[0], params[0]))
    if len(params) > 1:
        ax.set_yticks(range(len(ys)), [format_value(y) for y in ys])
        ax.set_ylabel(SHORT_NAMES.get(params[1], params[1]))
    else:
        ax.set_yticks([])
    ax.set_title(f"{metric}" + (f" (best: {best})" if best else ""), fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(rows: list[dict], metric: str, best: str) -> str:
    """A plain-text table: trial, metric, eval loss, and which one was chosen."""
    lines = [f"{'trial':<32} {metric:>16} {'eval_loss':>10}"]
    for r in rows:
        mark = "  <- best" if r["trial"] == best else ""
        value, loss = _number(r.get(metric)), _number(r.get("eval_loss"))
        lines.append(f"{r['trial']:<32} {value:>16.4f} {loss:>10.4f}{mark}")
    return "\n".join(lines)


def loss_curves(rows: list[dict], trials_root: Path, path: Path) -> Path:
    """Training loss per step of every trial (from each run dir's ``metrics.jsonl``), one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        log = trials_root / r["trial"] / "metrics.jsonl"
        points = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        by_step = {p["step"]: p["loss"] for p in points if "loss" in p and "step" in p}
        if by_step:
            steps = sorted(by_step)
            ax.plot(steps, [by_step[s] for s in steps], marker=".", label=r["trial"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
