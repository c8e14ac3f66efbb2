"""What an evaluation reports: flat metric names (identical for every model, so MLflow's compare view
lines models up), the bias-sweep trade-off plot, and a side-by-side table."""

from __future__ import annotations

from pathlib import Path


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``metrics.json`` -> ``{"synthetic.unsafe_rate": ..., "pooled.unsafe_ci_low": ..., ...}``."""
    out: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            out[key] = float(value)

    def rate(prefix: str, r: dict | None) -> None:
        if r:
            put(f"{prefix}_rate", r["rate"])
            put(f"{prefix}_ci_low", r["ci_low"])
            put(f"{prefix}_ci_high", r["ci_high"])
            put(f"{prefix}_n", r["num"])

    groups = dict(metrics["datasets"])
    if metrics.get("pooled"):
        groups["pooled"] = metrics["pooled"]
    for name, g in groups.items():
        rate(f"{name}.unsafe", g["unsafe"])
        rate(f"{name}.reset", g["reset"])
        put(f"{name}.num_errors", g["num_errors"])
        put(f"{name}.mean_discarded_tokens", g["mean_discarded_tokens"])
        put(f"{name}.time_to_first_kept_token_s", g["time_to_first_kept_token_s"])
        if "score" in g:
            put(f"{name}.score_mean", g["score"]["mean"])
    rate("reset_rate_harmful", metrics["reset_rate_harmful"])
    rate("reset_rate_safe", metrics["reset_rate_safe"])
    put("num_errors", metrics["num_errors"])
    put("mean_discarded_tokens", metrics["mean_discarded_tokens"])
    for key in ("output_tokens_per_s", "requests_per_s", "num_output_tokens"):
        put(key, metrics["throughput"][key])
    for k, r in (metrics.get("worst_of_k") or {}).items():
        rate(f"worst_of_{k}.unsafe", r)
    return out


def sweep_point(bias: float, metrics: dict) -> dict:
    """One point of the [RESET] bias sweep: safety, reset rate on safe prompts, speed, latency."""
    pooled = metrics.get("pooled") or next(iter(metrics["datasets"].values()))
    harmful = [g["unsafe"] for g in metrics["datasets"].values() if g["unsafe"]["num"]]
    hits, num = sum(r["num_hits"] for r in harmful), sum(r["num"] for r in harmful)
    ttfkt = [g["time_to_first_kept_token_s"] for g in metrics["datasets"].values()
             if g["time_to_first_kept_token_s"] is not None]
    return {
        "reset_bias": bias,
        "unsafe_rate": hits / num if num else None,
        "pooled_unsafe_rate": pooled["unsafe"]["rate"] if pooled else None,
        "reset_rate_safe": metrics["reset_rate_safe"]["rate"],
        "reset_rate_harmful": metrics["reset_rate_harmful"]["rate"],
        "output_tokens_per_s": metrics["throughput"]["output_tokens_per_s"],
        "time_to_first_kept_token_s": sum(ttfkt) / len(ttfkt) if ttfkt else None,
    }


def plot_sweep(points_by_model: dict[str, list[dict]], path: Path) -> Path:
    """Trade-off plot of the bias sweep: unsafe rate, reset rate on safe prompts, tokens/s, time to first
    kept token, each against b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for label, points in points_by_model.items():
        b = [p["reset_bias"] for p in points]
        axes[0].plot(b, [p["unsafe_rate"] for p in points], marker="o", label=label)
        axes[1].plot(b, [p["reset_rate_safe"] for p in points], marker="o", label=label)
        axes[2].plot(b, [p["output_tokens_per_s"] for p in points], marker="o", label=label)
        axes[3].plot(b, [p["time_to_first_kept_token_s"] for p in points], marker="o", label=label)
    titles = ("unsafe rate (harmful prompts)", "reset rate on safe prompts", "output tokens/s",
              "time to first kept token (s)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("[RESET] logit bias b")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def side_by_side(metrics_by_model: dict[str, dict]) -> str:
    """A text table: one column per model, unsafe % [95% CI] per dataset, reset rates, speed."""
    labels = list(metrics_by_model)
    names = sorted({n for m in metrics_by_model.values() for n in m["datasets"]})

    def pct(r):
        if not r or r["rate"] is None:
            return "-"
        return f"{100 * r['rate']:.1f} [{100 * r['ci_low']:.1f},{100 * r['ci_high']:.1f}] n={r['num']}"

    lines = []
    for name in names + ["pooled"]:
        cells = []
        for m in metrics_by_model.values():
            g = m["pooled"] if name == "pooled" else m["datasets"].get(name)
            tag = " (stand-in)" if g and g["stand_in"] else ""
            cells.append(pct(g["unsafe"]) + tag if g else "-")
        lines.append((f"unsafe % {name}", cells))
    lines.append(("reset % harmful", [pct(m["reset_rate_harmful"]) for m in metrics_by_model.values()]))
    lines.append(("reset % safe", [pct(m["reset_rate_safe"]) for m in metrics_by_model.values()]))
    lines.append(("output tokens/s", [f"{m['throughput']['output_tokens_per_s'] or 0:.1f}"
                                      for m in metrics_by_model.values()]))
    width = max(len(k) for k, _ in lines)
    col = max(30, *(len(c) for _, cells in lines for c in cells))
    head = " " * width + " | " + " | ".join(f"{label:{col}s}" for label in labels)
    return "\n".join([head, "-" * len(head)] + [f"{k:{width}s} | " + " | ".join(f"{c:{col}s}" for c in cells)
                                                for k, cells in lines])


def unsafe_rate_of(metrics: dict, key: str) -> dict:
    """The unsafe rate named by ``key``: a dataset name, "pooled", or "worst-of-K" (harmful prompts)."""
    if key.startswith("worst-of-"):
        k = int(key.removeprefix("worst-of-"))
        by_k = metrics.get("worst_of_k") or {}
        found = by_k.get(k, by_k.get(str(k)))  # int keys in-process, str keys after a JSON round trip
        if found is None:
            raise KeyError(f"{key}: no worst-of-k result for k={k} (worst_of_k: {sorted(by_k)})")
        return found
    return (metrics["pooled"] if key == "pooled" else metrics["datasets"][key])["unsafe"]


def compare_pairs(metrics_by_model: dict[str, dict], pairs: list[tuple[str, str]], key: str) -> list[dict]:
    """Unsafe-rate difference ``baseline - backtrack`` per pair, on ``key`` (see ``unsafe_rate_of``).

    Returns one dict per pair: the two labels, both rates, the difference with its 95 % CI
    (``metrics.difference_ci``) and ``holds``: backtracking is less unsafe and the CI excludes 0.
    """
    from bt_ray.eval.metrics import difference_ci

    out = []
    for base, back in pairs:
        a, b = (unsafe_rate_of(metrics_by_model[label], key) for label in (base, back))
        diff = difference_ci(a, b)
        out.append({"key": key, "baseline": base, "backtrack": back, "baseline_unsafe": a["rate"],
                    "backtrack_unsafe": b["rate"], **diff, "holds": diff["ci_low"] > 0})
    return out


def format_pairs(comparisons: list[dict]) -> str:
    """One line per pair, e.g. ``baseline-sft vs backtrack-sft (synthetic): unsafe 9.0% vs 1.3%, ...``."""
    lines = []
    for c in comparisons:
        verdict = ("the paper's direction, margin beyond the 95% CI" if c["holds"] else
                   "NOT the paper's direction by a margin beyond the 95% CI")
        lines.append(f"{c['baseline']} vs {c['backtrack']} ({c['key']}): unsafe "
                     f"{100 * c['baseline_unsafe']:.1f}% vs {100 * c['backtrack_unsafe']:.1f}%, "
                     f"difference {100 * c['difference']:+.1f} points "
                     f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]: {verdict}")
    return "\n".join(lines)
