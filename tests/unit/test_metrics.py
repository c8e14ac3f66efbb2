"""Metrics: Wilson, paired Newcombe, McNemar and cluster-bootstrap intervals; per-dataset and pooled
rates with their n, clusters and errors; worst-of-k; paired comparisons; the error limit."""

from __future__ import annotations

import math

import pytest

from bt_ray.eval.intervals import cluster_bootstrap_ci, mcnemar_exact_p, newcombe_paired_ci
from bt_ray.eval.metrics import (
    ErrorRateExceeded,
    check_errors,
    difference_ci,
    mean_ci,
    summarize,
    throughput,
    wilson_ci,
    worst_of_k,
)
from bt_ray.eval.report import compare_pair, compare_pairs, format_pairs


def test_wilson_ci_known_values():
    # Reference values (Wilson score, z = 1.96): 0/10 -> [0, 0.2775]; 5/10 -> [0.2366, 0.7634].
    assert wilson_ci(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_ci(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    low, high = wilson_ci(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.72247, abs=1e-4)
    assert wilson_ci(0, 0) == (0.0, 1.0)
    # shrinks with n
    assert wilson_ci(50, 100)[1] - wilson_ci(50, 100)[0] < wilson_ci(5, 10)[1] - wilson_ci(5, 10)[0]


def test_mean_ci():
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 1.959963984540054 * math.sqrt(5 / 3) / 2
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert mean_ci([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        mean_ci([])


def _row(dataset, harmful, unsafe, reset=False, discarded=0, tokens=10, error=None, prompt=0, sample=0,
         ttfkt=0.1, cluster=None, stopped=True, empty=False, turns=("hi",)):
    return {"dataset": dataset, "harmful": harmful, "unsafe": unsafe, "reset": reset,
            "reset_last_turn": reset, "score": None, "num_discarded_tokens": discarded,
            "num_output_tokens": tokens, "error": error,
            "prompt_index": prompt, "sample": sample, "time_to_first_kept_token_s": ttfkt,
            "cluster": cluster, "stopped": stopped, "empty_shown": empty, "turns": list(turns),
            "judge": "refusal-prefix (stand-in)" if dataset != "synthetic" else "synthetic-exact",
            "stand_in": dataset != "synthetic"}


def test_summarize_per_dataset_pooled_and_reset_rates():
    rows = [
        _row("advbench", True, True), _row("advbench", True, False, reset=True, discarded=4),
        _row("advbench", True, None, error="encode: too long"),
        _row("strongreject", True, True, reset=True, discarded=2),
        _row("synthetic", True, False, reset=True, discarded=6), _row("synthetic", False, False),
        _row("synthetic", False, False, reset=True, discarded=0, ttfkt=0.3),
        _row("mt-bench", False, None),
    ]
    s = summarize(rows)
    assert s["num_rows"] == 8 and s["num_errors"] == 1
    adv = s["datasets"]["advbench"]
    assert adv["num_errors"] == 1 and (adv["unsafe"]["num"], adv["unsafe"]["num_hits"]) == (2, 1)
    assert adv["stand_in"] is True and s["datasets"]["synthetic"]["stand_in"] is False
    pooled = s["pooled"]["unsafe"]  # advbench + strongreject
    assert (pooled["num"], pooled["num_hits"]) == (3, 2)
    assert (s["reset_rate_harmful"]["num"], s["reset_rate_harmful"]["num_hits"]) == (4, 3)
    assert (s["reset_rate_safe"]["num"], s["reset_rate_safe"]["num_hits"]) == (3, 1)
    assert s["mean_discarded_tokens"] == pytest.approx(12 / 7)
    latency = s["datasets"]["synthetic"]["time_to_first_kept_token_s"]
    assert latency["mean"] == pytest.approx((0.1 + 0.1 + 0.3) / 3)
    assert s["datasets"]["mt-bench"]["unsafe"]["rate"] is None  # not judged: null, never NaN


def test_worst_of_k_counts_a_prompt_unsafe_if_any_of_k_samples_is_even_when_others_errored():
    # prompt 0: sample 1 errored, sample 2 unsafe -> unsafe at k=3 (the old code dropped the prompt);
    # prompt 1: sample 0 errored, the others safe -> undetermined at k >= 1, counted; prompt 2: all safe.
    rows = [_row("advbench", True, (p, s) == (0, 2), prompt=p, sample=s, cluster=f"c{p % 2}",
                 error="judge: ConnectionRefusedError" if (p, s) in {(0, 1), (1, 0)} else None)
            for p in range(3) for s in range(3)]
    w = worst_of_k(rows, [1, 3], num_resamples=200)
    assert (w[3]["num"], w[3]["num_hits"], w[3]["num_undetermined"], w[3]["num_errors"]) == (2, 1, 1, 2)
    assert w[3]["num_clusters"] == 1 and w[3]["num_prompts"] == 3  # prompts 0 and 2 share cluster c0
    assert (w[1]["num"], w[1]["num_hits"], w[1]["num_undetermined"], w[1]["num_errors"]) == (2, 0, 1, 1)
    assert w[3]["cluster_ci_low"] <= w[3]["rate"] <= w[3]["cluster_ci_high"]


def test_worst_of_k_counts_a_prompt_unsafe_if_any_of_k_samples_is():
    rows = [_row("advbench", True, u, prompt=p, sample=s)
            for p, samples in enumerate([[False, False, True], [False, False, False], [True, False, False]])
            for s, u in enumerate(samples)]
    rows.append(_row("synthetic", False, True, prompt=0, sample=0))  # benign prompts do not count
    w = worst_of_k(rows, [1, 2, 3, 4])
    assert [w[k]["num_hits"] for k in (1, 2, 3)] == [1, 1, 2]
    assert w[3]["rate"] == pytest.approx(2 / 3)
    # only 3 samples: a prompt with an unsafe one is unsafe at k=4 too; the all-safe one is undetermined
    assert (w[4]["num"], w[4]["num_hits"], w[4]["num_undetermined"]) == (2, 2, 1)
    assert [w[k]["rate"] for k in (1, 2, 3)] == sorted(w[k]["rate"] for k in (1, 2, 3))  # monotone in k


def test_throughput_counts_every_generated_token_of_ok_rows():
    rows = [_row("advbench", True, True, tokens=30), _row("advbench", True, True, tokens=10),
            _row("advbench", True, None, tokens=99, error="x")]
    t = throughput(rows, 2.0)
    assert t == {"wall_s": 2.0, "num_output_tokens": 40, "num_requests": 2, "output_tokens_per_s": 20.0,
                 "requests_per_s": 1.0}


def test_report_names_are_identical_across_models_and_stand_ins_are_labelled():
    from bt_ray.eval.report import flat_metrics, side_by_side

    a = summarize([_row("advbench", True, True), _row("synthetic", True, False, reset=True, discarded=3)])
    b = summarize([_row("advbench", True, False), _row("synthetic", True, True)])
    for m in (a, b):
        m["throughput"] = throughput([], 1.0)
    assert flat_metrics(a).keys() == flat_metrics(b).keys()
    assert flat_metrics(a)["pooled.unsafe_rate"] == 1.0 and flat_metrics(b)["synthetic.unsafe_rate"] == 1.0
    table = side_by_side({"baseline": a, "backtrack": b})
    advbench = next(line for line in table.splitlines() if line.startswith("unsafe % advbench"))
    synthetic = next(line for line in table.splitlines() if line.startswith("unsafe % synthetic"))
    assert advbench.count("(stand-in)") == 2 and "(stand-in)" not in synthetic


def _rate(hits: int, n: int) -> dict:
    low, high = wilson_ci(hits, n)
    return {"rate": hits / n, "ci_low": low, "ci_high": high}


@pytest.mark.parametrize("a, b, want", [
    ((56, 70), (48, 80), (0.0524, 0.3339)),  # Newcombe (1998), table II, example (a), method 10
    ((9, 10), (3, 10), (0.1705, 0.8090)),  # example (b)
])
def test_difference_ci_matches_newcombes_published_intervals(a, b, want):
    got = difference_ci(_rate(*a), _rate(*b))
    assert got["difference"] == pytest.approx(a[0] / a[1] - b[0] / b[1])
    assert (round(got["ci_low"], 4), round(got["ci_high"], 4)) == want


# Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions based
# on paired data", Stat Med 17:2635-2650, Table III, method 10: (a, b, c, d) -> 95 % interval of (b - c) / n.
NEWCOMBE_PAIRED_TABLE_III = [
    ((36, 12, 2, 0), (0.0569, 0.3404)), ((20, 12, 2, 16), (0.0562, 0.3292)),
    ((18, 12, 2, 18), (0.0562, 0.3290)), ((36, 14, 0, 0), (0.1528, 0.4167)),
    ((35, 14, 0, 1), (0.1461, 0.4175)), ((18, 14, 0, 18), (0.1441, 0.3963)),
    ((2, 97, 1, 0), (0.8721, 0.9854)),
]


@pytest.mark.parametrize("table, want", NEWCOMBE_PAIRED_TABLE_III)
def test_newcombe_paired_ci_matches_the_published_method_10_intervals(table, want):
    low, high = newcombe_paired_ci(*table)
    assert (round(low, 4), round(high, 4)) == want


def test_newcombe_paired_ci_matches_fagerland_lydersen_laakes_example_and_is_narrower_than_unpaired():
    # Cavo et al. (2012) in Fagerland, Lydersen & Laake, "Statistical analysis of contingency tables"
    # (2017), chapter 8: Newcombe square-and-add -0.0621 (-0.1186 to -0.0046).
    low, high = newcombe_paired_ci(59, 6, 16, 80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    # Positively correlated pairs: the paired interval is narrower than the independent-samples one.
    unpaired = difference_ci(_rate(65, 161), _rate(75, 161))
    assert high - low < unpaired["ci_high"] - unpaired["ci_low"]


@pytest.mark.parametrize("b, c", [(12, 2), (6, 16), (0, 5), (3, 3), (0, 0), (40, 20)])
def test_mcnemar_exact_p_is_the_two_sided_binomial_test_of_discordant_pairs(b, c):
    from scipy.stats import binomtest

    want = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert mcnemar_exact_p(b, c) == pytest.approx(want, rel=1e-12)
    assert mcnemar_exact_p(12, 2) == pytest.approx(0.012939453125)  # 2 * (1 + 14 + 91) / 2**14


def test_cluster_bootstrap_is_wider_when_rows_of_a_cluster_agree_and_is_seeded():
    # 40 clusters of 10 identical rows vs 400 independent-looking rows with the same rate (25 %)
    values = [float(c % 4 == 0) for c in range(40) for _ in range(10)]
    clustered = cluster_bootstrap_ci([c for c in range(40) for _ in range(10)], values, seed=1)
    independent = cluster_bootstrap_ci(list(range(400)), values, seed=1)
    assert clustered[0] < 0.25 < clustered[1] and independent[0] < 0.25 < independent[1]
    assert clustered[1] - clustered[0] > 2.5 * (independent[1] - independent[0])  # ~sqrt(10) wider
    low, high = wilson_ci(100, 400)
    assert independent == pytest.approx((low, high), abs=0.02)  # singleton clusters: close to Wilson
    assert cluster_bootstrap_ci(list(range(400)), values, seed=1) == independent
    assert cluster_bootstrap_ci(["a"] * 5, [1, 0, 1, 0, 1]) == (0.6, 0.6)


def test_summarize_states_n_clusters_and_errors_by_stage():
    rows = [_row("synthetic", True, p < 4, prompt=p, cluster=f"t{p // 4}|task") for p in range(8)]
    rows += [_row("synthetic", True, None, prompt=8, cluster="t2|task", error="judge: URLError: refused"),
             _row("synthetic", False, False, prompt=9, cluster="t3|task", error="encode: too long",
                  ttfkt=None)]
    rows += [_row("synthetic", False, False, prompt=10 + i, cluster="t4|task", ttfkt=t, empty=t is None,
                  stopped=t is not None, reset=True) for i, t in enumerate([None, 0.2, 0.4, None])]
    g = summarize(rows, num_resamples=500)["datasets"]["synthetic"]
    assert (g["num_rows"], g["num_errors"], g["num_clusters"]) == (14, 2, 5)
    assert g["errors"] == {"encode": 1, "judge": 1}
    assert (g["unsafe"]["num"], g["unsafe"]["num_hits"], g["unsafe"]["num_clusters"]) == (8, 4, 2)
    # two clusters, one all unsafe, one all safe: the bootstrap sees only 0, 0.5 or 1
    assert g["unsafe"]["cluster_ci_low"] == 0.0 and g["unsafe"]["cluster_ci_high"] == 1.0
    assert (g["empty_shown"]["num_hits"], g["stopped"]["num"], g["stopped"]["num_hits"]) == (2, 12, 10)
    latency = g["time_to_first_kept_token_s"]
    assert (latency["num"], latency["num_no_kept_token"]) == (10, 2)
    # linear interpolation: sorted times 0.1 x8, 0.2, 0.4; p90 sits at 8.1 of 0..9 -> 0.2 + 0.1 * 0.2
    assert latency["p50"] == pytest.approx(0.1) and latency["p90"] == pytest.approx(0.22)
    assert latency["mean"] == pytest.approx((8 * 0.1 + 0.2 + 0.4) / 10)


def test_side_by_side_states_n_clusters_and_errors_of_every_dataset():
    from bt_ray.eval.report import side_by_side

    rows = [_row("synthetic", True, p == 0, prompt=p, cluster=f"c{p % 3}") for p in range(6)]
    rows.append(_row("synthetic", True, None, prompt=6, error="judge: URLError: refused"))
    m = summarize(rows, num_resamples=100) | {"throughput": throughput(rows, 1.0)}
    m["worst_of_k"] = worst_of_k(rows, [1], num_resamples=100)
    lines = side_by_side({"a": m}).splitlines()
    unsafe = next(line for line in lines if line.startswith("unsafe % synthetic"))
    assert "n=6 cl=3" in unsafe
    errors = next(line for line in lines if line.startswith("  errors synthetic"))
    assert "1/7 (judge 1)" in errors
    worst = next(line for line in lines if line.startswith("unsafe % worst-of-1"))
    assert "n=6 cl=3" in worst and "undet=1 err=1" in worst
    assert not any(line.startswith("unsafe % pooled") for line in lines)  # no real safety set: no empty row


def test_check_errors_fails_above_the_limit_naming_the_judge():
    rows = [_row("advbench", True, False, prompt=p) for p in range(98)]
    refused = "judge: URLError: <urlopen error refused>"
    rows += [dict(_row("advbench", True, None, prompt=98 + i, error=refused),
                  judge="llm:grader:safety") for i in range(2)]
    check_errors(rows, 0.02)  # 2 % is allowed
    with pytest.raises(ErrorRateExceeded, match=r"2 of 100 rows failed .* 2 judge errors from judge "
                                                r"llm:grader:safety \(first: 'judge: URLError"):
        check_errors(rows, 0.01, where="model tiny")
    rows[0]["error"] = "generate: RuntimeError: CUDA out of memory"
    with pytest.raises(ErrorRateExceeded, match="1 generate errors from the generation engine"):
        check_errors(rows, 0.01)


def _paired_rows(outcomes, dataset="synthetic", clusters=None):
    """One row per (prompt, sample) with the given unsafe verdicts (None: a judge error)."""
    rows = []
    for p, samples in enumerate(outcomes):
        for s, u in enumerate(samples):
            cluster = clusters[p] if clusters else f"c{p}"
            rows.append(_row(dataset, True, u, prompt=p, sample=s, cluster=cluster, turns=(f"q{p}",),
                             error="judge: down" if u is None else None))
    return rows


def test_compare_pair_is_paired_by_prompt_and_sample_and_counts_unpaired_rows():
    # 60 prompts in 20 clusters of 3; baseline unsafe on prompts 0-17, backtrack only on prompt 0-1,
    # backtrack additionally on 40; prompt 59 errored for the backtrack model.
    base = _paired_rows([[p < 18] for p in range(60)], clusters=[f"c{p // 3}" for p in range(60)])
    back = _paired_rows([[None if p == 59 else (p < 2 or p == 40)] for p in range(60)],
                        clusters=[f"c{p // 3}" for p in range(60)])
    got = compare_pair(base, back, "synthetic", num_resamples=1000)
    assert (got["n"], got["num_clusters"], got["num_unpaired"]) == (59, 20, 1)
    assert got["counts"] == {"both": 2, "baseline_only": 16, "backtrack_only": 1, "neither": 40}
    assert got["difference"] == pytest.approx(15 / 59)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(newcombe_paired_ci(2, 16, 1, 40))
    assert got["mcnemar_p"] == pytest.approx(mcnemar_exact_p(16, 1))
    assert got["cluster_ci_low"] < got["difference"] < got["cluster_ci_high"]
    # clusters of 3 identical outcomes: the cluster bootstrap is wider than the paired interval
    assert got["cluster_ci_high"] - got["cluster_ci_low"] > got["ci_high"] - got["ci_low"]
    assert got["holds"] is True
    text = format_pairs([{"baseline": "b", "backtrack": "t", **got}])
    assert "(synthetic, n=59 pairs in 20 clusters, 1 unpaired)" in text and "McNemar p=" in text


def test_compare_pair_does_not_hold_when_the_clusters_carry_the_difference():
    # Everything happens in one cluster of 30 prompts; the paired interval excludes 0 but resampling the
    # 5 clusters does not, so the comparison does not hold.
    clusters = ["big"] * 30 + [f"c{i}" for i in range(4) for _ in range(5)]
    base = _paired_rows([[p < 12] for p in range(50)], clusters=clusters)
    back = _paired_rows([[False] for _ in range(50)], clusters=clusters)
    got = compare_pair(base, back, "synthetic", num_resamples=1000)
    assert got["ci_low"] > 0 and got["mcnemar_p"] < 0.001
    assert got["cluster_ci_low"] <= 0 and got["holds"] is False
    assert "NOT the paper's direction" in format_pairs([{"baseline": "b", "backtrack": "t", **got}])


def test_compare_pairs_on_datasets_pooled_and_worst_of_k_refuses_different_prompts():
    base = _paired_rows([[True, False], [False, False], [True, True]], dataset="advbench")
    back = _paired_rows([[False, False], [False, None], [False, True]], dataset="advbench")
    rows = {"baseline": {"main": base, "worst_of_k": base},
            "backtrack": {"main": back, "worst_of_k": back}}
    got = compare_pairs(rows, [("baseline", "backtrack")], ["advbench", "pooled", "worst-of-2"],
                        num_resamples=200)
    assert [c["key"] for c in got] == ["advbench", "pooled", "worst-of-2"]
    assert (got[0]["n"], got[0]["num_unpaired"], got[0]["difference"]) == (5, 1, pytest.approx(2 / 5))
    assert got[1]["n"] == 5  # advbench is a pooled set
    # worst-of-2 by prompt: baseline (T, F, T), backtrack (F, undetermined, T) -> 2 pairs
    assert (got[2]["n"], got[2]["num_unpaired"], got[2]["counts"]["baseline_only"]) == (2, 1, 1)
    with pytest.raises(KeyError, match="no worst_of_k rows for backtrack"):
        compare_pairs({"baseline": rows["baseline"], "backtrack": {"main": back}},
                      [("baseline", "backtrack")], ["worst-of-2"])
    other = _paired_rows([[True, False], [False, False], [True, True]], dataset="advbench")
    other[0]["turns"] = ["another prompt"]
    with pytest.raises(ValueError, match="different prompt in the two models' rows"):
        compare_pair(base, other, "advbench")
    empty = compare_pair(base, _paired_rows([[None, None]] * 3, dataset="advbench"), "advbench")
    assert empty["n"] == 0 and empty["holds"] is False and "no pair with a verdict" in format_pairs(
        [{"baseline": "b", "backtrack": "t", **empty}])
