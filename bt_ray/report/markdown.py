"""The text of report.md: Table 1 (safety, helpfulness, reset rates, worst-of-k per model), the
baseline-vs-backtracking comparisons in plain words, Table 2 (``attacks.report.table2``), the training
runs, and where the run came from. Each table names its judge and labels a stand-in one."""

from __future__ import annotations

from bt_ray.eval.metrics import POOLED_SAFETY_SETS
from bt_ray.report.collect import Attacks, Eval, TrainingRun

# Safe sets whose answered share is Table 1's helpfulness proxy (no LLM judge is reachable to grade them).
HELPFULNESS_PROXY_SETS = ("mt-bench",)


def _pct(r: dict | None) -> str:
    """``17.2 [14.4, 20.4] n=600``: a rate in percent with its Wilson 95% CI and its n."""
    if not r or r.get("rate") is None:
        return "-"
    return f"{100 * r['rate']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] n={r['num']}"


def _complement(r: dict | None) -> dict | None:
    """The rate of the opposite outcome, with its Wilson CI (the Wilson interval of 1 - p is 1 minus the
    interval of p, ends swapped)."""
    if not r or r.get("rate") is None:
        return None
    return r | {"rate": 1 - r["rate"], "ci_low": 1 - r["ci_high"], "ci_high": 1 - r["ci_low"]}


def _score(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] n={s['num']}"


def _judges(groups: list[dict]) -> tuple[str, bool]:
    judges = sorted({j for g in groups for j in g.get("judges", [])})
    stand_in = any(g.get("stand_in") for g in groups)
    text = ", ".join(judges) or "not recorded"
    # A stand-in judge's own name usually says so ("refusal-prefix (stand-in)"): label it once.
    return text + (" (stand-in)" if stand_in and "stand-in" not in text else ""), stand_in


def harmful_sets(metrics: dict[str, dict]) -> list[str]:
    """Datasets with harmful prompts in some model's metrics (an unsafe rate is defined)."""
    return sorted({name for m in metrics.values() for name, g in m["datasets"].items() if g["unsafe"]["num"]})


def safe_sets(metrics: dict[str, dict]) -> list[str]:
    """Datasets of safe prompts only (harmful=false, e.g. xstest-safe, mt-bench): no model has a judged
    harmful row in them, and their stats carry ``over_refusal`` (metrics written since over-refusal was
    measured; earlier metrics have no safe-set rows)."""
    names = {name for m in metrics.values() for name, g in m["datasets"].items() if "over_refusal" in g}
    return sorted(name for name in names
                  if all(m["datasets"][name]["unsafe"]["num"] == 0 for m in metrics.values()
                         if name in m["datasets"]))


def pooled_row(metrics: dict[str, dict]) -> bool:
    """A pooled row only when several real safety sets were pooled (one set pooled is that set's row)."""
    names = {name for m in metrics.values() for name in m["datasets"]}
    return len(names & set(POOLED_SAFETY_SETS)) > 1 and any(m.get("pooled") for m in metrics.values())


def table1_rows(metrics: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """Table 1's rows, ``(name, one cell per model)``: unsafe % per set (and pooled), helpfulness, reset %
    on harmful and on safe prompts, over-refusal per safe set, worst-of-k, and the judge of each set.
    report.md renders them as Markdown (``table1``), the pipeline's terminal as text, so both agree."""
    sets = harmful_sets(metrics)
    rows: list[tuple[str, list[str]]] = []
    for name in sets:
        rows.append((f"unsafe % {name}",
                     [_pct(m["datasets"].get(name, {}).get("unsafe")) for m in metrics.values()]))
    if pooled_row(metrics):
        rows.append(("unsafe % pooled (" + ", ".join(s for s in sets if s in POOLED_SAFETY_SETS) + ")",
                     [_pct((m.get("pooled") or {}).get("unsafe")) for m in metrics.values()]))
    scored = sorted({name for m in metrics.values() for name, g in m["datasets"].items() if "score" in g})
    for name in scored:
        rows.append((f"helpfulness {name} (mean score)",
                     [_score(m["datasets"].get(name, {}).get("score")) for m in metrics.values()]))
    rows.append(("reset % on harmful prompts", [_pct(m.get("reset_rate_harmful")) for m in metrics.values()]))
    rows.append(("reset % on safe prompts", [_pct(m.get("reset_rate_safe")) for m in metrics.values()]))
    safe = safe_sets(metrics)
    for name in safe:
        groups = [m["datasets"].get(name, {}) for m in metrics.values()]
        rows.append((f"over-refusal % {name}", [_pct(g.get("over_refusal")) for g in groups]))
        rows.append((f"reset % {name}", [_pct(g.get("reset")) for g in groups]))
    if len(safe) > 1:
        rows.append(("over-refusal % on safe prompts (" + ", ".join(safe) + ")",
                     [_pct(m.get("over_refusal_safe")) for m in metrics.values()]))
    proxy = [name for name in safe if name in HELPFULNESS_PROXY_SETS]
    for name in proxy:
        rows.append((f"helpfulness proxy: answered % {name}",
                     [_pct(_complement(m["datasets"].get(name, {}).get("over_refusal")))
                      for m in metrics.values()]))
    for k in sorted({int(k) for m in metrics.values() for k in (m.get("worst_of_k") or {})}):
        cells = []
        for m in metrics.values():
            by_k = m.get("worst_of_k") or {}
            cells.append(_pct(by_k.get(str(k), by_k.get(k))))
        rows.append((f"unsafe % worst-of-{k}", cells))
    for name in sorted({name for m in metrics.values() for name in m["datasets"]}):
        rows.append((f"judge {name}", [_judges([m["datasets"][name]])[0] if name in m["datasets"] else "-"
                                       for m in metrics.values()]))
    return rows


def table1(evaluation: Eval) -> str:
    """Markdown: a column per model (``table1_rows``), then what its rows mean."""
    metrics = evaluation.metrics
    labels = list(metrics)
    safe = safe_sets(metrics)
    proxy = [name for name in safe if name in HELPFULNESS_PROXY_SETS]
    any_stand_in = any(g.get("stand_in") for m in metrics.values() for g in m["datasets"].values())
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {key} | " + " | ".join(cells) + " |" for key, cells in table1_rows(metrics)]
    lines += ["", "Unsafe %: harmful prompts whose shown answer the judge called unsafe; reset %: answers "
              "in which the model emitted [RESET]; worst-of-k: a prompt counts as unsafe when any of its "
              "first k sampled answers is. Percent with its Wilson 95% CI in brackets and n the judged "
              "rows (prompts for worst-of-k). Helpfulness: the judge's mean score on the set's prompts, "
              "with its 95% CI."]
    if safe:
        lines.append("Over-refusal % <set>: answers to that set's safe prompts (harmful=false) which the "
                     "refusal judge (its judge row) called a refusal; reset % <set>: answers to them in "
                     "which the model emitted [RESET], each a needless reset.")
    if proxy:
        lines.append("Helpfulness proxy: answered % " + ", ".join(proxy) + " = 100 - over-refusal % on it: "
                     "the share of MT-Bench first turns the refusal judge did not call a refusal. It is a "
                     "proxy, not a grade: no LLM judge is reachable here to score the answers' quality, so "
                     "it measures that the model answers benign requests, not how well.")
    if any_stand_in:
        lines.append("Judges marked (stand-in) are not the paper's judge: their numbers show the method "
                     "works end to end, and are not comparable to the paper's.")
    return "\n".join(lines) + "\n"


def direction(c: dict) -> int:
    """+1: the baseline is more unsafe beyond both 95% CIs (paired Newcombe and cluster bootstrap);
    -1: the backtracking model is; 0: neither."""
    if c["ci_low"] > 0 and c["cluster_ci_low"] > 0:
        return 1
    if c["ci_high"] < 0 and c["cluster_ci_high"] < 0:
        return -1
    return 0


def _ci(low: float, high: float) -> str:
    return f"[95% CI {100 * low:.1f}, {100 * high:.1f}]"


def _quoted(c: dict) -> tuple[float, float]:
    """The interval a sentence quotes: the cluster bootstrap, unless it excludes 0 while the paired
    Newcombe interval does not (then "no difference" quotes the interval that includes 0)."""
    if direction(c) == 0 and not c["cluster_ci_low"] <= 0 <= c["cluster_ci_high"]:
        return c["ci_low"], c["ci_high"]
    return c["cluster_ci_low"], c["cluster_ci_high"]


def comparison_sentence(c: dict) -> str:
    """One eval comparison (``eval.report.compare_pair``) in plain words, quoting the cluster-bootstrap CI
    of baseline minus backtracking unsafe rate."""
    head = (f"**{c['baseline']} vs {c['backtrack']}, {c['key']}** ({c['n']} pairs in {c['num_clusters']} "
            f"clusters)")
    if not c["n"]:
        return f"{head}: no pair with a verdict on both sides."
    rates = f"unsafe {100 * c['baseline_unsafe']:.1f}% vs {100 * c['backtrack_unsafe']:.1f}%"
    d, (low, high) = c["difference"], _quoted(c)
    sign = direction(c)
    if sign > 0:
        return f"{head}: backtracking is less unsafe by {100 * d:.1f} points {_ci(low, high)} ({rates})."
    if sign < 0:
        return f"{head}: backtracking is MORE unsafe by {-100 * d:.1f} points {_ci(-high, -low)} ({rates})."
    return (f"{head}: no difference beyond the 95% CI ({rates}; difference {100 * d:+.1f} points "
            f"{_ci(low, high)}).")


def comparisons(evaluation: Eval) -> str:
    compared = evaluation.summary.get("comparisons") or []
    if not compared:
        return "No baseline-vs-backtracking pair was compared in this eval.\n"
    lines = [f"- {comparison_sentence(c)}" for c in compared]
    lines += ["", "Points are percentage points of unsafe rate, baseline minus backtracking, on the same "
              "prompts. The 95% CI is a cluster bootstrap over prompt clusters; a difference is claimed only "
              "when the paired Newcombe interval excludes 0 too (where only one of the two excludes 0, the "
              "one that includes 0 is quoted)."]
    return "\n".join(lines) + "\n"


def attack_sentences(attacks: Attacks) -> str:
    """The attack job's paired ASR differences (``attacks.report.paired``) in plain words."""
    lines = []
    for pair, kinds in (attacks.summary.get("paired") or {}).items():
        a, _, b = pair.partition(" - ")
        for kind, variants in kinds.items():
            for variant, d in variants.items():
                head = f"**{kind}{'' if variant == 'all' else ' ' + variant}, {a} vs {b}** (n={d['n']})"
                sign, (low, high) = direction(d), _quoted(d)
                if sign > 0:
                    text = f"{b} has a lower ASR by {100 * d['difference']:.1f} points {_ci(low, high)}"
                elif sign < 0:
                    text = f"{b} has a HIGHER ASR by {-100 * d['difference']:.1f} points {_ci(-high, -low)}"
                else:
                    text = f"no difference in ASR beyond the 95% CI ({100 * d['difference']:+.1f} points " \
                           f"{_ci(low, high)})"
                lines.append(f"- {head}: {text}.")
    return "\n".join(lines) + ("\n" if lines else "")


def training_table(training: list[TrainingRun]) -> str:
    lines = ["| run | stage | steps | rows | final loss | fit s |", "|---|---|---|---|---|---|"]
    for t in training:
        s = t.summary
        loss = (s.get("metrics") or {}).get("loss")
        lines.append(f"| {t.name} | {t.stage} | {s.get('global_step', '-')} | {s.get('num_rows', '-')} | "
                     f"{'-' if loss is None else f'{loss:.4f}'} | {s.get('fit_seconds', '-')} |")
    return "\n".join(lines) + "\n"


def provenance(facts: dict[str, str]) -> str:
    lines = []
    for key, name in (("command", "Command"), ("git_sha", "Git sha"), ("date", "Date"), ("config", "Config")):
        value = facts.get(key)
        lines.append(f"- {name}: " + (f"`{value}`" if value else "not recorded"))
    return "\n".join(lines) + "\n"


def not_run(what: str, why: str) -> str:
    return f"_{what}: not run ({why})._\n"
