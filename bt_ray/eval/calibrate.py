"""Calibrate the ``[RESET]`` logit bias: the largest b whose reset rate on safe dev prompts meets a target.

The paper tuned b by hand. Here the reset rate on a safe dev set, r(b), is measured by the eval pipeline
itself (``run_passes``: the same generation, backtracking post-processing and judge as ``jobs/eval.py``)
and b is found by bisection on a bracket ``[bias_low, bias_high]``:

- r(b) is non-decreasing in b (b is added to the [RESET] logit at every step; under greedy decoding a
  larger b can only turn more argmaxes into [RESET]), so {b : r(b) <= target} is an interval
  (-inf, b*]; bisection keeps the largest probed b that meets the target (feasible) and the smallest
  that does not, and stops when they are within ``tolerance`` or after ``max_evals`` probes.
- r(b) of a finite dev set is a step function, so interpolation (secant, regula falsi) buys little
  over bisection and loses its guarantee: the bracket halves with every probe.
- A round of probes costs one pipeline start (actors, model load: seconds on CPU, more than a small dev
  set's generation), so a round may probe ``probes_per_round`` evenly spaced points (k-section: the
  bracket shrinks k+1-fold per round; the first round probes both ends beside them), and every model
  searches at once: one round's probes of every model still searching go through one pipeline.

Then ONE pipeline evaluates the harmful report sets at b=0 and at the chosen b (and the dev set at
b=0; the dev rows at the chosen b are its probe's), so the safety b buys sits beside what it costs.
``jobs/calibrate.py`` is the driver (MLflow, calibration.json, the trade-off plot).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bt_ray.config import check
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.eval.config import DatasetCfg, DecodeCfg, EngineCfg, EvalCfg, JudgeCfg
from bt_ray.models import ModelCfg


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrateCfg:
    """Everything ``jobs/calibrate.py`` does: models and eval settings, dev and report sets, the search."""

    run_dir: str = "outputs/calibrate"
    """Where probe rows, calibration.json, the plot and the default MLflow store go."""
    models: tuple[str, ...] = ("tiny",)
    """Models to calibrate: presets or HF directories (each replaces model.name); each gets its own b."""
    labels: tuple[str, ...] = ()
    """Names of the models in tables and MLflow runs; empty: the directory names."""
    model: ModelCfg = field(default_factory=ModelCfg)
    """Loading settings shared by every model (dtype, [RESET] token, tiny preset shape)."""
    engine: EngineCfg = field(default_factory=EngineCfg)
    """Generation engine and actor pool (as eval's)."""
    decode: DecodeCfg = field(default_factory=DecodeCfg)
    """Decoding of every probe and of the report; its reset_bias must be 0 (calibrate sets b)."""
    synthetic: SyntheticWorldCfg = field(default_factory=SyntheticWorldCfg)
    """The synthetic world (its eval prompts), when a dataset is synthetic."""
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    """Judges of the report sets (as eval's)."""
    dev_datasets: tuple[DatasetCfg, ...] = (DatasetCfg(name="synthetic", harmful=False, limit=200),)
    """The safe dev set whose reset rate b is calibrated on: every prompt must be harmful=False."""
    report_datasets: tuple[DatasetCfg, ...] = (DatasetCfg(name="synthetic", harmful=True, limit=200),)
    """Harmful sets on which the safety at b=0 and at the chosen b is reported."""
    target_reset_rate: float = 0.01
    """The reset rate on the dev set that b may reach at most, in (0, 1)."""
    bias_low: float = -20.0
    """Lower end of the search bracket (should meet the target; if not, no b is chosen)."""
    bias_high: float = 5.0
    """Upper end of the search bracket (if it meets the target, it is the chosen b)."""
    max_evals: int = 10
    """Dev-set probes per model at most, the two bracket ends included."""
    tolerance: float = 0.25
    """The search stops when the largest b meeting the target and the smallest missing it are this close."""
    probes_per_round: int = 1
    """Points probed per round inside the bracket, in one pipeline (1: bisection; k: the bracket shrinks
    k+1-fold per round for k probes; worth it where a pipeline's start-up outweighs a probe's rows)."""
    ray_num_cpus: int | None = None
    """Logical CPUs of the local Ray the job starts when none is running (null: the machine's cores)."""
    mlflow_experiment: str = "bt-ray-calibrate"
    """MLflow experiment (store: $MLFLOW_TRACKING_URI, else sqlite under run_dir)."""
    max_error_fraction: float = 0.01
    """A probe or report pass with more error rows than this fraction fails, naming the engine or judge."""
    bootstrap_resamples: int = 2000
    """Resamples of the cluster bootstrap of the unsafe rates."""
    bootstrap_seed: int = 0
    """Seed of the cluster bootstrap."""

    def __post_init__(self):
        check(self, [
            ("models", len(self.models) >= 1, "must name at least one model"),
            ("labels", not self.labels or len(self.labels) == len(self.models),
             "must be empty or give one label per model"),
            ("labels", len(set(self.labels)) == len(self.labels), "must be distinct"),
            ("decode", self.decode.reset_bias == 0,
             "must have reset_bias 0: calibrate sets b itself and reports b=0 beside it"),
            ("dev_datasets", len(self.dev_datasets) >= 1, "must list at least one safe dataset"),
            ("dev_datasets", all(d.harmful is not True for d in self.dev_datasets),
             "must hold safe prompts only (harmful: false or null, never true)"),
            ("report_datasets", len(self.report_datasets) >= 1, "must list at least one harmful dataset"),
            ("target_reset_rate", 0 < self.target_reset_rate < 1, "must be in (0, 1), e.g. 0.01"),
            ("bias_low", abs(self.bias_low) <= 100, "must be in [-100, 100] (decode.reset_bias's range)"),
            ("bias_high", abs(self.bias_high) <= 100, "must be in [-100, 100] (decode.reset_bias's range)"),
            ("bias_high", self.bias_high > self.bias_low, f"must be > bias_low ({self.bias_low})"),
            ("max_evals", self.max_evals >= 2, "must be >= 2 (the two bracket ends)"),
            ("tolerance", self.tolerance > 0, "must be > 0"),
            ("probes_per_round", self.probes_per_round >= 1, "must be >= 1"),
            ("ray_num_cpus", self.ray_num_cpus is None or self.ray_num_cpus >= 1, "must be >= 1 or null"),
            ("max_error_fraction", 0 <= self.max_error_fraction <= 1, "must be in [0, 1]"),
            ("bootstrap_resamples", self.bootstrap_resamples >= 100, "must be >= 100"),
        ])

    def eval_cfg(self, datasets: tuple[DatasetCfg, ...]) -> EvalCfg:
        """The ``EvalCfg`` of these settings over ``datasets`` (for ``load_items``)."""
        return EvalCfg(run_dir=self.run_dir, models=self.models, labels=self.labels, model=self.model,
                       engine=self.engine, decode=self.decode, datasets=datasets, synthetic=self.synthetic,
                       judge=self.judge, max_error_fraction=self.max_error_fraction,
                       bootstrap_resamples=self.bootstrap_resamples, bootstrap_seed=self.bootstrap_seed)


# ---------------------------------------------------------------- the search


@dataclass
class BiasSearch:
    """Bisection (k-section with ``per_round`` > 1) for the largest b in ``[low, high]`` whose rate
    r(b) <= ``target``, r non-decreasing.

    ``next_biases`` says what to probe next (the bracket ends first, then evenly spaced inner points),
    ``record`` takes the measured rate; the search is a plain state machine so several models can
    share each round. At most ``max_evals`` probes in all.
    """

    low: float
    high: float
    target: float
    tolerance: float
    max_evals: int
    per_round: int = 1
    probes: list[dict] = field(default_factory=list)
    """Every probe in order: ``{"reset_bias", "reset_rate", "num"}``."""
    feasible: float | None = None
    """The largest probed b with r(b) <= target."""
    infeasible: float | None = None
    """The smallest probed b with r(b) > target."""

    def next_biases(self) -> list[float]:
        if not self.probes:  # both ends, and inner points of the bracket when the budget allows
            return [self.low, self.high] + self._inner(self.low, self.high, self.max_evals - 2)
        if self.done:
            return []
        return self._inner(self.feasible, self.infeasible, self.max_evals - len(self.probes))

    def _inner(self, low: float, high: float, budget: int) -> list[float]:
        k = min(self.per_round, budget)
        if k <= 0 or high - low <= self.tolerance:
            return []
        return [low + (high - low) * j / (k + 1) for j in range(1, k + 1)]

    @property
    def done(self) -> bool:
        if self.feasible is None or self.infeasible is None:  # a bracket end decided it (or nothing yet)
            return len(self.probes) >= 2
        return self.infeasible - self.feasible <= self.tolerance or len(self.probes) >= self.max_evals

    def record(self, bias: float, reset_rate: float | None, num: int) -> None:
        if reset_rate is None or num == 0:
            raise ValueError(f"the probe at reset_bias={bias:g} has no judged dev row: no reset rate")
        self.probes.append({"reset_bias": bias, "reset_rate": reset_rate, "num": num})
        # Conservative when a round's probes disagree with monotonicity (sampled decoding is noisy): the
        # smallest b that missed the target bounds the answer; a b above it that met it is reported, not used.
        missed = [p["reset_bias"] for p in self.probes if p["reset_rate"] > self.target]
        self.infeasible = min(missed) if missed else None
        met = [p["reset_bias"] for p in self.probes if p["reset_rate"] <= self.target
               and (self.infeasible is None or p["reset_bias"] < self.infeasible)]
        self.feasible = max(met) if met else None

    @property
    def non_monotone(self) -> list[dict]:
        """Probes that met the target above a b that missed it: r(b) measured as not non-decreasing."""
        return [p for p in self.probes if self.infeasible is not None and p["reset_bias"] > self.infeasible
                and p["reset_rate"] <= self.target]

    def result(self) -> dict:
        """The chosen b (None when even ``low`` misses the target), why the search stopped, the bracket."""
        if self.feasible is None:
            status = f"no b in the bracket meets the target: r(bias_low={self.low:g}) > {self.target:g}"
        elif self.infeasible is None:
            status = f"bias_high={self.high:g} meets the target (b may go higher: widen the bracket)"
        elif self.infeasible - self.feasible <= self.tolerance:
            status = "converged"
        else:
            status = f"max_evals={self.max_evals} probes spent before the tolerance was reached"
        converged = status == "converged"
        if self.non_monotone:
            where = ", ".join(f"{p['reset_bias']:g}" for p in self.non_monotone)
            status += (f"; r(b) fell as b rose at b={where} (noise: sampled decoding or few dev prompts), "
                       "so b stays below them")
        return {"chosen_bias": self.feasible, "status": status, "converged": converged,
                "bracket": [self.feasible, self.infeasible], "num_probes": len(self.probes),
                "probes": sorted(self.probes, key=lambda p: p["reset_bias"]),
                "non_monotone": self.non_monotone}


def search_biases(searches: dict[str, BiasSearch],
                  evaluate: Callable[[list[tuple[str, float]]], dict[tuple[str, float], tuple[float, int]]]
                  ) -> dict[str, dict]:
    """Run every search to its end, one round at a time: ``evaluate`` gets the round's (label, b) probes
    (one pipeline run for all) and returns each one's ``(reset_rate, num)``. Returns each ``result()``."""
    while todo := [(label, b) for label, s in searches.items() for b in s.next_biases()]:
        got = evaluate(todo)
        for label, b in todo:
            searches[label].record(b, *got[(label, b)])
    return {label: s.result() for label, s in searches.items()}


# ---------------------------------------------------------------- the eval pipeline behind it


def check_dev_items(items: list[dict]) -> None:
    """The dev set must be safe prompts only (a reset there is a needless one); name the offending sets."""
    bad: dict[str, int] = {}
    for it in items:
        if it["harmful"]:
            bad[it["dataset"]] = bad.get(it["dataset"], 0) + 1
    if bad:
        sets = ", ".join(f"{name} ({n} harmful prompts)" for name, n in bad.items())
        raise ValueError(f"dev_datasets: {sets}; the dev set must hold safe prompts only (harmful=False): "
                         "set harmful: false on the dataset, or use a safe set")


def _rate(r: dict | None) -> dict | None:
    return None if not r or r["rate"] is None else {
        k: r[k] for k in ("rate", "ci_low", "ci_high", "num", "num_hits", "cluster_ci_low", "cluster_ci_high")
        if k in r}


def point_summary(bias: float, dev: dict, report: dict, report_rows: list[dict]) -> dict:
    """What b costs and buys: dev reset rate; unsafe rate per report set, pooled (the real safety sets,
    as eval), and over every harmful report row; the reset rate on the harmful prompts."""
    from bt_ray.eval.metrics import rate

    harmful = [r for r in report_rows if r["harmful"] and not r.get("error")]
    return {
        "reset_bias": bias,
        "dev_reset_rate": _rate(dev["reset_rate_safe"]),
        "unsafe": {name: _rate(g["unsafe"]) for name, g in report["datasets"].items()},
        "pooled_unsafe": _rate((report.get("pooled") or {}).get("unsafe")),
        "all_harmful_unsafe": _rate(rate(harmful, "unsafe")),
        "harmful_reset_rate": _rate(report["reset_rate_harmful"]),
        "stand_in": any(g["stand_in"] for g in report["datasets"].values()),
    }


def calibrate(cfg: CalibrateCfg, labels: list[str], log: Callable[[str], None] = print) -> dict[str, dict]:
    """Search each model's b on the dev set, then evaluate the report sets at b=0 and at it (on the
    current Ray cluster). Rows and metrics of every pass go under ``<run_dir>/<label>/``.

    Returns:
        Per label: the search ``result()`` (probes, chosen b, status, bracket) plus ``at_zero`` and
        ``at_chosen`` (``point_summary``; ``at_chosen`` None when no b was chosen).
    """
    from bt_ray.eval.pipeline import Pass, expand, load_items, run_passes, write_pass

    run_dir = Path(cfg.run_dir)
    dev_items = load_items(cfg.eval_cfg(cfg.dev_datasets))
    check_dev_items(dev_items)
    report_items = load_items(cfg.eval_cfg(cfg.report_datasets))
    dev_rows, report_rows = expand(dev_items), expand(report_items)
    models = {label: dataclasses.replace(cfg.model, name=name) for label, name in zip(labels, cfg.models)}
    decode_at = {}  # b -> DecodeCfg

    def decode(b: float) -> DecodeCfg:
        return decode_at.setdefault(b, dataclasses.replace(cfg.decode, reset_bias=b))

    def write(label: str, done: tuple, out: Path) -> dict:
        return write_pass(*done, out, where=f"model {models[label].name} ({cfg.engine.kind} engine)",
                          max_error_fraction=cfg.max_error_fraction, num_resamples=cfg.bootstrap_resamples,
                          seed=cfg.bootstrap_seed)

    probe_metrics: dict[tuple[str, float], dict] = {}

    def evaluate(todo: list[tuple[str, float]]) -> dict[tuple[str, float], tuple[float, int]]:
        passes = [Pass(f"{label}::probe{b!r}", models[label], decode(b), dev_rows) for label, b in todo]
        done = run_passes(passes, engine=cfg.engine, judge=cfg.judge)
        out = {}
        for (label, b), p in zip(todo, passes):
            metrics = write(label, done[p.key], run_dir / label / "probes" / f"b{b:+.4f}")
            probe_metrics[(label, b)] = metrics
            r = metrics["reset_rate_safe"]
            out[(label, b)] = (r["rate"], r["num"])
            log(f"-- {label}: b={b:+.4f} dev reset rate {r['rate']} ({r['num_hits']}/{r['num']})")
        return out

    searches = {label: BiasSearch(cfg.bias_low, cfg.bias_high, cfg.target_reset_rate, cfg.tolerance,
                                  cfg.max_evals, cfg.probes_per_round) for label in labels}
    results = search_biases(searches, evaluate)

    # ---- one pipeline: the report sets at b=0 and at each chosen b, the dev set at b=0
    passes = []
    for label, res in results.items():
        passes.append(Pass(f"{label}::dev@0", models[label], decode(0.0), dev_rows))
        passes.append(Pass(f"{label}::report@0", models[label], decode(0.0), report_rows))
        if res["chosen_bias"] is not None:
            chosen = decode(res["chosen_bias"])
            passes.append(Pass(f"{label}::report@chosen", models[label], chosen, report_rows))
    done = run_passes(passes, engine=cfg.engine, judge=cfg.judge)
    for label, res in results.items():
        out = run_dir / label
        dev0 = write(label, done[f"{label}::dev@0"], out / "dev_b0")
        rep0 = write(label, done[f"{label}::report@0"], out / "report_b0")
        res["at_zero"] = point_summary(0.0, dev0, rep0, done[f"{label}::report@0"][0])
        res["at_chosen"] = None
        if res["chosen_bias"] is not None:
            b = res["chosen_bias"]
            rep = write(label, done[f"{label}::report@chosen"], out / "report_chosen")
            rows = done[f"{label}::report@chosen"][0]
            res["at_chosen"] = point_summary(b, probe_metrics[(label, b)], rep, rows)
        res["model"] = models[label].name
    return results


# ---------------------------------------------------------------- the plot


def plot_calibration(results: dict[str, dict], target: float, path: Path) -> Path:
    """The trade-off b buys: dev reset rate against b (every probe; the target and each chosen b marked)
    and the unsafe rate over the harmful report rows at b=0 and at the chosen b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for label, res in results.items():
        probes = res["probes"]
        line, = ax0.plot([p["reset_bias"] for p in probes], [p["reset_rate"] for p in probes], marker="o",
                         drawstyle="steps-post", label=label)
        points = [p for p in (res.get("at_zero"), res.get("at_chosen")) if p]
        unsafe = [(p["reset_bias"], p["all_harmful_unsafe"]["rate"])
                  for p in points if p["all_harmful_unsafe"]]
        if unsafe:
            ax1.plot(*zip(*sorted(unsafe)), marker="s", color=line.get_color(), label=label)
        if res["chosen_bias"] is not None:
            for ax in (ax0, ax1):
                ax.axvline(res["chosen_bias"], color=line.get_color(), linestyle=":", alpha=0.8)
            ax0.annotate(f"b={res['chosen_bias']:+.2f}", (res["chosen_bias"], target), color=line.get_color(),
                         textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax0.axhline(target, color="grey", linestyle="--", label=f"target {target:g}")
    ax0.set_title("reset rate on the safe dev set")
    ax1.set_title("unsafe rate on the harmful report sets (b=0, chosen b)")
    for ax in (ax0, ax1):
        ax.set_xlabel("[RESET] logit bias b")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_results(results: dict[str, dict]) -> str:
    """A text table: per model, the chosen b and why, then dev reset and unsafe rates at b=0 and at b."""

    def pct(r: dict | None) -> str:
        if not r:
            return "-"
        return f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f},{100 * r['ci_high']:.1f}] n={r['num']}"

    lines = []
    for label, res in results.items():
        b = res["chosen_bias"]
        lines.append(f"{label}: b = {'none' if b is None else f'{b:+.4f}'} ({res['status']}; "
                     f"{res['num_probes']} probes, bracket {res['bracket']})")
        for p in (res["at_zero"], res["at_chosen"]):
            if p is None:
                continue
            tag = " (stand-in judge)" if p["stand_in"] else ""
            lines.append(f"  b={p['reset_bias']:+.4f}: dev reset {pct(p['dev_reset_rate'])}; unsafe, all "
                         f"harmful {pct(p['all_harmful_unsafe'])}{tag}")
            for name, r in p["unsafe"].items():
                lines.append(f"      unsafe {name}: {pct(r)}")
            if p["pooled_unsafe"]:
                lines.append(f"      unsafe pooled: {pct(p['pooled_unsafe'])}")
    return "\n".join(lines)
