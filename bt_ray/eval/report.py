"""What an evaluation reports: flat metric names (identical for every model, so MLflow's compare view
lines models up), the bias-sweep trade-off plot, a side-by-side table, and paired, cluster-aware
comparisons of baseline and backtracking models on the same prompts (``compare_pairs``).

Every table states n, the number of clusters and the errors behind each rate."""

from __future__ import annotations

from pathlib import Path


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``metrics.json`` -> ``{"synthetic.unsafe_rate": ..., "pooled.unsafe_ci_low": ..., ...}``."""
    out: dict[str, float] = {}

    def put(key: str, value) -> None:
        if value is None:  # e.g. no kept token, so no latency: NaN keeps the names the same for every model
            value = float("nan")
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
            put(f"{prefix}_clusters", r["num_clusters"])
            if "cluster_ci_low" in r:  # rates bootstrapped by cluster (the same ones for every model)
                put(f"{prefix}_cluster_ci_low", r["cluster_ci_low"])
                put(f"{prefix}_cluster_ci_high", r["cluster_ci_high"])

    groups = dict(metrics["datasets"])
    if metrics.get("pooled"):
        groups["pooled"] = metrics["pooled"]
    for name, g in groups.items():
        rate(f"{name}.unsafe", g["unsafe"])
        rate(f"{name}.over_refusal", g.get("over_refusal"))  # absent from summaries written before it
        rate(f"{name}.reset", g["reset"])
        rate(f"{name}.reset_last_turn", g["reset_last_turn"])
        rate(f"{name}.stopped", g["stopped"])
        rate(f"{name}.empty_shown", g["empty_shown"])
        put(f"{name}.num_errors", g["num_errors"])
        put(f"{name}.num_clusters", g["num_clusters"])
        put(f"{name}.mean_discarded_tokens", g["mean_discarded_tokens"])
        for stat in ("mean", "p50", "p90", "num_no_kept_token"):
            put(f"{name}.time_to_first_kept_token_s.{stat}", g["time_to_first_kept_token_s"][stat])
        if "score" in g:
            put(f"{name}.score_mean", g["score"]["mean"])
    rate("reset_rate_harmful", metrics["reset_rate_harmful"])
    rate("reset_rate_safe", metrics["reset_rate_safe"])
    rate("over_refusal_safe", metrics.get("over_refusal_safe"))
    put("num_errors", metrics["num_errors"])
    put("mean_discarded_tokens", metrics["mean_discarded_tokens"])
    for key in ("output_tokens_per_s", "requests_per_s", "num_output_tokens"):
        put(key, metrics["throughput"][key])
    for k, r in (metrics.get("worst_of_k") or {}).items():
        rate(f"worst_of_{k}.unsafe", r)
        put(f"worst_of_{k}.num_undetermined", r["num_undetermined"])
        put(f"worst_of_{k}.num_errors", r["num_errors"])
    return out


def sweep_point(bias: float, metrics: dict) -> dict:
    """One point of the [RESET] bias sweep: safety, reset rate on safe prompts, speed, latency."""
    pooled = metrics.get("pooled") or next(iter(metrics["datasets"].values()))
    harmful = [g["unsafe"] for g in metrics["datasets"].values() if g["unsafe"]["num"]]
    hits, num = sum(r["num_hits"] for r in harmful), sum(r["num"] for r in harmful)
    ttfkt = [g["time_to_first_kept_token_s"] for g in metrics["datasets"].values()
             if g["time_to_first_kept_token_s"]["num"]]
    num_kept = sum(t["num"] for t in ttfkt)
    return {
        "reset_bias": bias,
        "unsafe_rate": hits / num if num else None,
        "pooled_unsafe_rate": pooled["unsafe"]["rate"] if pooled else None,
        "reset_rate_safe": metrics["reset_rate_safe"]["rate"],
        "reset_rate_harmful": metrics["reset_rate_harmful"]["rate"],
        "output_tokens_per_s": metrics["throughput"]["output_tokens_per_s"],
        # mean over rows that kept a token; rows that kept none are counted beside it
        "time_to_first_kept_token_s": (sum(t["mean"] * t["num"] for t in ttfkt) / num_kept
                                       if num_kept else None),
        "num_no_kept_token": sum(g["time_to_first_kept_token_s"]["num_no_kept_token"]
                                 for g in metrics["datasets"].values()),
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


def _pct(r: dict | None, clusters: bool = True) -> str:
    if not r or r["rate"] is None:
        return "-" if not r else "- n=0"
    text = f"{100 * r['rate']:.1f} [{100 * r['ci_low']:.1f},{100 * r['ci_high']:.1f}] n={r['num']}"
    if clusters and r.get("num_clusters") is not None:
        text += f" cl={r['num_clusters']}"
    return text


def side_by_side(metrics_by_model: dict[str, dict]) -> str:
    """A text table: one column per model. Per dataset: unsafe % [Wilson 95% CI] with n (judged rows)
    and cl (clusters), and the errors of that dataset (by stage); worst-of-k with its n, clusters and
    undetermined prompts; reset, empty-shown and token-limit rates; time to first kept token; speed."""
    labels = list(metrics_by_model)
    models = list(metrics_by_model.values())
    names = sorted({n for m in models for n in m["datasets"]})

    def group(m: dict, name: str) -> dict | None:
        return m["pooled"] if name == "pooled" else m["datasets"].get(name)

    def errors(g: dict | None) -> str:
        if not g:
            return "-"
        stages = ", ".join(f"{k} {v}" for k, v in g["errors"].items())
        return f"{g['num_errors']}/{g['num_rows']}" + (f" ({stages})" if stages else "")

    lines = []
    pooled = ["pooled"] if any(m.get("pooled") for m in models) else []  # no real safety set: no row
    for name in names + pooled:
        cells = []
        for m in models:
            g = group(m, name)
            tag = " (stand-in)" if g and g["stand_in"] else ""
            cells.append(_pct(g["unsafe"]) + tag if g else "-")
        lines.append((f"unsafe % {name}", cells))
        lines.append((f"  errors {name}", [errors(group(m, name)) for m in models]))
    for k in sorted({int(k) for m in models for k in (m.get("worst_of_k") or {})}):
        cells = []
        for m in models:
            by_k = m.get("worst_of_k") or {}
            r = by_k.get(k, by_k.get(str(k)))
            cells.append(_pct(r) + (f" undet={r['num_undetermined']} err={r['num_errors']}" if r else ""))
        lines.append((f"unsafe % worst-of-{k}", cells))
    lines.append(("reset % harmful", [_pct(m["reset_rate_harmful"]) for m in models]))
    lines.append(("reset % safe", [_pct(m["reset_rate_safe"]) for m in models]))
    for name in names:
        lines.append((f"empty shown % {name}", [_pct((group(m, name) or {}).get("empty_shown"), False)
                                               for m in models]))
        lines.append((f"token limit % {name}", [_limit(group(m, name)) for m in models]))
        lines.append((f"first kept token s {name}", [_latency(group(m, name)) for m in models]))
    lines.append(("output tokens/s", [f"{m['throughput']['output_tokens_per_s'] or 0:.1f}" for m in models]))
    width = max(len(k) for k, _ in lines)
    col = max(30, *(len(c) for _, cells in lines for c in cells))
    head = " " * width + " | " + " | ".join(f"{label:{col}s}" for label in labels)
    return "\n".join([head, "-" * len(head)] + [f"{k:{width}s} | " + " | ".join(f"{c:{col}s}" for c in cells)
                                                for k, cells in lines])


def _limit(g: dict | None) -> str:
    """Share of answers that hit max_new_tokens in some turn (the complement of ``stopped``)."""
    r = g and g.get("stopped")
    if not r or r["rate"] is None:
        return "-"
    return f"{100 * (1 - r['rate']):.1f} n={r['num']}"


def _latency(g: dict | None) -> str:
    t = g and g.get("time_to_first_kept_token_s")
    if not t or not t["num"]:
        return "-" if not t else f"- (no kept token: {t['num_no_kept_token']})"
    return (f"p50 {t['p50']:.3f} p90 {t['p90']:.3f} mean {t['mean']:.3f} n={t['num']} "
            f"(no kept token: {t['num_no_kept_token']})")


# ---------------------------------------------------------------- paired comparisons


def _units(rows: list[dict], key: str) -> dict[tuple, dict]:
    """The paired units of ``key`` in one model's rows: ``{unit: {"unsafe": bool | None, "cluster",
    "turns"}}``; a unit is (dataset, prompt_index, sample), or (dataset, prompt_index) for worst-of-K.
    ``unsafe`` is None for a unit with no verdict (an error, or a worst-of-k prompt left undetermined)."""
    from bt_ray.eval.metrics import POOLED_SAFETY_SETS, cluster_of, prompt_outcomes

    if key.startswith("worst-of-"):
        k = int(key.removeprefix("worst-of-"))
        return {p: {"unsafe": o["unsafe"], "cluster": o["cluster"], "turns": None}
                for p, o in prompt_outcomes(rows, k).items()}
    sets = POOLED_SAFETY_SETS if key == "pooled" else (key,)
    return {(r["dataset"], r["prompt_index"], r["sample"]): {
        "unsafe": None if r.get("error") or r.get("unsafe") is None else bool(r["unsafe"]),
        "cluster": cluster_of(r), "turns": r.get("turns")}
        for r in rows if r["dataset"] in sets and r["harmful"]}


def compare_pair(base_rows: list[dict], back_rows: list[dict], key: str, *, num_resamples: int = 2000,
                 seed: int = 0) -> dict:
    """Unsafe rate of a baseline minus that of a backtracking model on the same prompts, on ``key``.

    ``key`` is a dataset name, ``pooled`` (the real safety sets) or ``worst-of-K`` (a prompt is unsafe
    when any of its first K samples is; pass the worst-of-k rows). Rows pair by (dataset,
    prompt_index, sample) (worst-of-K: by prompt); a pair counts only when both sides have a verdict,
    and the units dropped for an error on either side are counted (``num_unpaired``).

    Returns:
        ``n`` pairs, ``num_clusters``, both rates on those pairs, the 2x2 counts, the ``difference``
        with the paired Newcombe interval (``ci_low``, ``ci_high``), the exact McNemar p-value, the
        cluster-bootstrap interval (``cluster_ci_low``, ``cluster_ci_high``: clusters of the baseline's
        rows resampled with replacement), and ``holds``: the cluster-bootstrap interval lies above 0
        (backtracking is less unsafe). ``holds`` rests on the cluster bootstrap because it is the
        interval that follows the design: rows of one cluster are not independent draws, which the
        paired Newcombe interval and McNemar assume, so it is the more conservative one when rows of a
        cluster agree. To stay conservative when clusters are few (a bootstrap over few clusters
        can be too narrow), the paired Newcombe interval must lie above 0 as well.

    Raises:
        ValueError: the two models' rows are not the same prompts (a unit's prompt or cluster differs).
    """
    from bt_ray.eval.intervals import cluster_bootstrap_ci, mcnemar_exact_p, newcombe_paired_ci

    base, back = _units(base_rows, key), _units(back_rows, key)
    pairs = []
    for unit in sorted(base.keys() & back.keys(), key=str):
        x, y = base[unit], back[unit]
        if x["cluster"] != y["cluster"] or x["turns"] != y["turns"]:
            raise ValueError(f"compare {key}: {unit} is a different prompt in the two models' rows (cluster "
                             f"{x['cluster']} vs {y['cluster']}); compare only runs on the same prompts")
        if x["unsafe"] is not None and y["unsafe"] is not None:
            pairs.append((x["cluster"], x["unsafe"], y["unsafe"]))
    n = len(pairs)
    a = sum(x and y for _, x, y in pairs)
    b = sum(x and not y for _, x, y in pairs)
    c = sum(y and not x for _, x, y in pairs)
    counts = {"both": a, "baseline_only": b, "backtrack_only": c, "neither": n - a - b - c}
    out = {"key": key, "n": n, "num_clusters": len({cl for cl, _, _ in pairs}),
           "num_unpaired": len(base.keys() | back.keys()) - n, "counts": counts, "baseline_unsafe": None,
           "backtrack_unsafe": None, "difference": None, "ci_low": None, "ci_high": None, "mcnemar_p": None,
           "cluster_ci_low": None, "cluster_ci_high": None, "holds": False}
    if n == 0:
        return out
    low, high = newcombe_paired_ci(a, b, c, n - a - b - c)
    cl_low, cl_high = cluster_bootstrap_ci([cl for cl, _, _ in pairs],
                                           [float(x) - float(y) for _, x, y in pairs],
                                           num_resamples=num_resamples, seed=seed)
    return out | {"baseline_unsafe": (a + b) / n, "backtrack_unsafe": (a + c) / n, "difference": (b - c) / n,
                  "ci_low": low, "ci_high": high, "mcnemar_p": mcnemar_exact_p(b, c),
                  "cluster_ci_low": cl_low, "cluster_ci_high": cl_high, "holds": cl_low > 0 and low > 0}


def compare_pairs(rows_by_label: dict[str, dict[str, list[dict]]], pairs, keys, *, num_resamples: int = 2000,
                  seed: int = 0) -> list[dict]:
    """``compare_pair`` for every (baseline, backtrack) pair and key.

    Args:
        rows_by_label: ``{label: {"main": rows, "worst_of_k": rows}}`` (the rows.jsonl of each run;
            ``worst_of_k`` only when worst-of-K keys are asked for).
        pairs: (baseline label, backtrack label) pairs.
        keys: dataset names, ``pooled``, ``worst-of-K``.
    """
    out = []
    for base, back in pairs:
        for key in keys:
            run = "worst_of_k" if key.startswith("worst-of-") else "main"
            missing = [label for label in (base, back) if run not in rows_by_label[label]]
            if missing:
                raise KeyError(f"{key}: no {run} rows for {', '.join(missing)}")
            got = compare_pair(rows_by_label[base][run], rows_by_label[back][run], key,
                               num_resamples=num_resamples, seed=seed)
            out.append({"baseline": base, "backtrack": back, **got})
    return out


def format_pairs(comparisons: list[dict]) -> str:
    """One line per comparison: both rates, n and clusters, the difference with its paired and
    cluster-bootstrap intervals, McNemar's p, and whether the paper's direction holds."""
    lines = []
    for c in comparisons:
        head = (f"{c['baseline']} vs {c['backtrack']} ({c['key']}, n={c['n']} pairs in {c['num_clusters']} "
                f"clusters, {c['num_unpaired']} unpaired)")
        if not c["n"]:
            lines.append(f"{head}: no pair with a verdict on both sides")
            continue
        verdict = ("the paper's direction, beyond the cluster-bootstrap 95% CI" if c["holds"] else
                   "NOT the paper's direction beyond the cluster-bootstrap 95% CI")
        rates = f"{100 * c['baseline_unsafe']:.1f}% vs {100 * c['backtrack_unsafe']:.1f}%"
        lines.append(f"{head}: unsafe {rates}, "
                     f"difference {100 * c['difference']:+.1f} points, paired [{100 * c['ci_low']:+.1f}, "
                     f"{100 * c['ci_high']:+.1f}], cluster bootstrap [{100 * c['cluster_ci_low']:+.1f}, "
                     f"{100 * c['cluster_ci_high']:+.1f}], McNemar p={c['mcnemar_p']:.3g}: {verdict}")
    return "\n".join(lines)
