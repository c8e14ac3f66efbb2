"""report.md's sections on the calibrated [RESET] bias (jobs/calibrate.py's calibration.json) and on the
training data (jobs/onpolicy.py's counts per source and per rule)."""

from __future__ import annotations

import shutil
from pathlib import Path

from bt_ray.eval.intervals import wilson_ci
from bt_ray.report.collect import Calibration, DataSummary
from bt_ray.report.markdown import _pct, safe_sets

CALIBRATION_PNG = "calibration.png"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in rows]


def _bias(b: float | None) -> str:
    return "none" if b is None else f"{b:+.4f}"


def _probe_rate(p: dict) -> str:
    """A probe's dev reset rate with its Wilson CI (a probe records the rate and n; hits = rate * n)."""
    hits = round(p["reset_rate"] * p["num"])
    low, high = wilson_ci(hits, p["num"])
    return _pct({"rate": p["reset_rate"], "ci_low": low, "ci_high": high, "num": p["num"]})


def _sets(datasets: list[dict]) -> str:
    parts = []
    for d in datasets:
        part = f" (part {d['part']})" if d.get("part") else ""
        parts.append(f"{d.get('name')}{part}")
    return ", ".join(parts) or "not recorded"


def _point_rows(res: dict, metrics: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """Rows of a model's b=0 vs chosen-b table: unsafe % per harmful report set, pooled and over every
    harmful report row, reset % on harmful prompts and on the dev set, and, from the report passes'
    metrics.json, reset % and over-refusal % on each held-out safe report set."""
    points = [res.get("at_zero"), res.get("at_chosen")]
    passes = [metrics.get("b0"), metrics.get("chosen")]
    harmful = sorted({name for p in points if p for name, r in p["unsafe"].items() if r})
    rows = [(f"unsafe % {name}", [_pct(p["unsafe"].get(name)) if p else "-" for p in points])
            for name in harmful]
    if any(p and p.get("pooled_unsafe") for p in points) and len(harmful) > 1:
        rows.append(("unsafe % pooled", [_pct(p.get("pooled_unsafe")) if p else "-" for p in points]))
    rows.append(("unsafe % all harmful report rows",
                 [_pct(p.get("all_harmful_unsafe")) if p else "-" for p in points]))
    rows.append(("reset % on harmful prompts",
                 [_pct(p.get("harmful_reset_rate")) if p else "-" for p in points]))
    rows.append(("reset % on the dev set (calibrated on)",
                 [_pct(p.get("dev_reset_rate")) if p else "-" for p in points]))
    safe = safe_sets({k: m for k, m in zip(("b0", "chosen"), passes) if m})
    for name in safe:
        groups = [(m or {}).get("datasets", {}).get(name) or {} for m in passes]
        rows.append((f"reset % {name} (held out)", [_pct(g.get("reset")) for g in groups]))
        rows.append((f"over-refusal % {name} (held out)", [_pct(g.get("over_refusal")) for g in groups]))
    return rows


def calibration(cal: Calibration, out_dir: Path, image) -> str:
    """The section: the target, then per model the chosen b, its probes and what b buys and costs."""
    s = cal.summary
    target = s["target_reset_rate"]
    lines = [f"From `{cal.dir / 'calibration.json'}`. The largest b (the logit bias added to [RESET]) whose "
             f"reset rate on the safe dev set ({_sets(s.get('dev_datasets') or [])}) is at most "
             f"**{100 * target:g}%**, searched in [{', '.join(f'{b:g}' for b in s.get('bracket') or [])}] "
             f"(tolerance {s.get('tolerance', '-')}, at most {s.get('max_evals', '-')} probes); then the "
             f"report sets ({_sets(s.get('report_datasets') or [])}) at b=0 and at that b.", ""]
    stand_in = False
    for label, res in s["models"].items():
        b = res.get("chosen_bias")
        lines += [f"### {label}" + (f" (`{res['model']}`)" if res.get("model") else ""), "",
                  f"- target: dev reset rate <= {100 * target:g}%",
                  f"- chosen b: **{_bias(b)}** ({res.get('status', 'no status recorded')}; "
                  f"{res.get('num_probes', len(res['probes']))} probes)", "",
                  "Probes (reset rate on the dev set, % with Wilson 95% CI):", ""]
        lines += _table(["b", "dev reset % [95% CI] n"], [
            [_bias(p["reset_bias"]) + (" (chosen)" if p["reset_bias"] == b else ""), _probe_rate(p)]
            for p in sorted(res["probes"], key=lambda p: p["reset_bias"])])
        rows = _point_rows(res, cal.report_metrics.get(label, {}))
        lines += ["", f"At b=0 and at the chosen b ({_bias(b)}):", ""]
        lines += _table(["", "b=0", f"b={_bias(b)}"], [[key, *cells] for key, cells in rows])
        if b is None:
            lines += ["", "No b met the target in the bracket: the chosen-b column is empty."]
        if label not in cal.report_metrics:
            lines += ["", f"(No report pass metrics.json under `{cal.dir / label}`: the held-out safe sets' "
                      "reset and over-refusal rates are not shown.)"]
        stand_in |= any((p or {}).get("stand_in") for p in (res.get("at_zero"), res.get("at_chosen")))
        lines.append("")
    if stand_in:
        lines += ["The unsafe rates are judged by a STAND-IN judge (see Table 1's judge rows): they show the "
                  "trade-off, not the paper's numbers.", ""]
    png = calibration_png(cal, out_dir)
    if png is not None:
        lines.append(image("[RESET] bias calibration: dev reset rate and unsafe rate against b", png,
                           out_dir))
    else:
        lines.append(f"_Calibration plot: not run (no {CALIBRATION_PNG} beside calibration.json and no probe "
                     "to plot)._\n")
    return "\n".join(lines)


def calibration_png(cal: Calibration, out_dir: Path) -> Path | None:
    """The calibration's own trade-off plot, copied into ``out_dir``; re-plotted from calibration.json
    when the PNG is not beside it."""
    from bt_ray.eval.calibrate import plot_calibration

    dest = out_dir / CALIBRATION_PNG
    src = cal.dir / CALIBRATION_PNG
    if src.is_file():
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        return dest
    models = cal.summary["models"]
    if not any(res.get("probes") for res in models.values()):
        return None
    return plot_calibration(models, cal.summary["target_reset_rate"], dest)


def training_data(data: DataSummary) -> str:
    """Counts of an on-policy data file per source and per rule, and the judges that labelled it."""
    s = data.summary
    sources = s["sources"]
    rules = [k for k in s.get("rule_meanings") or s["rules"] if any(t["rules"].get(k) for t in sources)]
    judge = f"`{s.get('judge', 'not recorded')}`" + (" (STAND-IN)" if s.get("judge_stand_in") else "")
    gen = s.get("generation") or {}
    lines = [f"From `{data.path}`: **{s.get('num_rows', '-')} rows** "
             f"({', '.join(f'{k} {v}' for k, v in (s.get('kinds') or {}).items()) or 'kinds not recorded'}) "
             f"kept of {s.get('num_generated', '-')} answers generated by `{gen.get('model', '?')}` "
             f"(the y- are the model's own answers, on-policy).", "",
             f"- safety judge (y- and y+): {judge}",
             f"- refusal judge (helpful answers): `{s.get('refusal_judge', 'not recorded')}`", ""]
    head = ["source", "read", "prompts", "generated", "judged unsafe", "y+ judged unsafe", "kept", "errors"]
    keys = ["read", "prompts", "generated", "judged_unsafe", "chosen_judged_unsafe", "kept", "errors"]
    rows = [[t["source"], *(str(t.get(k, "-")) for k in keys), *(str(t["rules"].get(r, 0)) for r in rules)]
            for t in sources]
    totals = ["**total**", *(str(sum(t.get(k, 0) for t in sources)) for k in keys),
              *(str(s["rules"].get(r, 0)) for r in rules)]
    lines += _table(head + rules, rows + [totals])
    meanings = s.get("rule_meanings") or {}
    if rules:
        lines += ["", "Rules (each generated answer is counted under exactly one):", ""]
        lines += [f"- `{r}`: {meanings.get(r, 'meaning not recorded')}" for r in rules]
    skipped = {t["source"]: t["skipped"] for t in sources if t.get("skipped")}
    if skipped:
        lines += ["", "Skipped before generation: " + "; ".join(
            f"{src}: " + ", ".join(f"{k} {v}" for k, v in why.items()) for src, why in skipped.items()) + "."]
    return "\n".join(lines) + "\n"
