"""Metrics: Wilson intervals, per-dataset and pooled rates, reset rates, worst-of-k, throughput."""

from __future__ import annotations

import math

import pytest

from bt_ray.eval.metrics import difference_ci, mean_ci, summarize, throughput, wilson_ci, worst_of_k
from bt_ray.eval.report import compare_pairs, format_pairs


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
         ttfkt=0.1):
    return {"dataset": dataset, "harmful": harmful, "unsafe": unsafe, "reset": reset, "score": None,
            "num_discarded_tokens": discarded, "num_output_tokens": tokens, "error": error,
            "prompt_index": prompt, "sample": sample, "time_to_first_kept_token_s": ttfkt,
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
    assert s["datasets"]["synthetic"]["time_to_first_kept_token_s"] == pytest.approx((0.1 + 0.1 + 0.3) / 3)
    assert s["datasets"]["mt-bench"]["unsafe"]["rate"] is None  # not judged: null, never NaN


def test_worst_of_k_counts_a_prompt_unsafe_if_any_of_k_samples_is():
    rows = [_row("advbench", True, u, prompt=p, sample=s)
            for p, samples in enumerate([[False, False, True], [False, False, False], [True, False, False]])
            for s, u in enumerate(samples)]
    rows.append(_row("synthetic", False, True, prompt=0, sample=0))  # benign prompts do not count
    w = worst_of_k(rows, [1, 2, 3, 4])
    assert [w[k]["num_hits"] for k in (1, 2, 3)] == [1, 1, 2]
    assert w[3]["rate"] == pytest.approx(2 / 3) and w[4]["num"] == 0 and w[4]["rate"] is None
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


def test_compare_pairs_says_whether_the_difference_clears_its_ci():
    def model(hits, n=600):
        unsafe = {"num": n, "num_hits": hits, **_rate(hits, n)}
        return {"datasets": {"synthetic": {"unsafe": unsafe}}, "pooled": None}

    metrics = {"baseline-sft": model(54), "backtrack-sft": model(8), "baseline-dpo": model(9),
               "backtrack-dpo": model(14)}
    pairs = [("baseline-sft", "backtrack-sft"), ("baseline-dpo", "backtrack-dpo")]
    got = compare_pairs(metrics, pairs, "synthetic")
    assert [c["holds"] for c in got] == [True, False]
    assert got[0]["ci_low"] > 0 and got[1]["ci_low"] < 0
    text = format_pairs(got)
    assert "(synthetic): unsafe 9.0% vs 1.3%" in text and "NOT the paper's direction" in text.splitlines()[1]
    # worst-of-k, keyed by int in-process and by str after JSON
    metrics["baseline-sft"]["worst_of_k"] = {8: {"num": 600, "num_hits": 240, **_rate(240, 600)}}
    metrics["backtrack-sft"]["worst_of_k"] = {"8": {"num": 600, "num_hits": 30, **_rate(30, 600)}}
    (w,) = compare_pairs(metrics, pairs[:1], "worst-of-8")
    assert w["holds"] and w["difference"] == pytest.approx(0.35)
    with pytest.raises(KeyError, match="no worst-of-k result for k=4"):
        compare_pairs(metrics, pairs[:1], "worst-of-4")
