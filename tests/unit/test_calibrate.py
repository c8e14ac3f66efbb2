"""The [RESET] bias search (``bt_ray.eval.calibrate``) on known monotone rate functions; its config errors."""

from __future__ import annotations

import math

import pytest

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.eval.calibrate import BiasSearch, CalibrateCfg, check_dev_items, format_results, search_biases
from bt_ray.eval.config import DatasetCfg


def _run(rate_fns: dict, **kw):
    """Search each label's b against its rate function; count the probes each one evaluated."""
    calls = {label: [] for label in rate_fns}

    def evaluate(todo):
        out = {}
        for label, b in todo:
            calls[label].append(b)
            out[(label, b)] = (rate_fns[label](b), 100)
        return out

    args = dict(low=-20.0, high=5.0, target=0.01, tolerance=0.05, max_evals=12) | kw
    searches = {label: BiasSearch(**args) for label in rate_fns}
    return search_biases(searches, evaluate), calls


def _steps(margins):
    """r(b) = fraction of prompts whose [RESET] margin is below b (greedy decoding on a fixed dev set)."""
    return lambda b: sum(m < b for m in margins) / len(margins)


def test_finds_the_known_bias_of_a_continuous_rate_within_tolerance():
    # r(b) = sigmoid(b): the largest b with r(b) <= 0.01 is logit(0.01)
    known = math.log(0.01 / 0.99)
    results, calls = _run({"m": lambda b: 1 / (1 + math.exp(-b))})
    res = results["m"]
    assert res["converged"] and res["status"] == "converged"
    assert known - 0.05 <= res["chosen_bias"] <= known
    assert 1 / (1 + math.exp(-res["chosen_bias"])) <= 0.01
    assert res["bracket"][1] - res["bracket"][0] <= 0.05 and res["bracket"][1] > known
    assert len(calls["m"]) == res["num_probes"] <= 12
    assert [p["reset_bias"] for p in res["probes"]] == sorted(calls["m"])  # every probe reported, by b


def test_finds_a_step_rate_and_searches_several_models_in_shared_rounds():
    margins_a = [-7.3 + 0.37 * i for i in range(100)]  # target 0.05: at most 5 prompts below b -> b* = m[5]
    margins_b = [1.0 + 0.01 * i for i in range(100)]  # target 0.05: b* = 1.05
    results, calls = _run({"a": _steps(margins_a), "b": _steps(margins_b)}, target=0.05, tolerance=0.1,
                          max_evals=10)
    for label, margins in (("a", margins_a), ("b", margins_b)):
        known = sorted(margins)[5]
        res = results[label]
        assert known - 0.1 <= res["chosen_bias"] <= known, (label, res)
        assert _steps(margins)(res["chosen_bias"]) <= 0.05 < _steps(margins)(res["bracket"][1])
        assert res["num_probes"] <= 10
    assert calls["a"][:2] == calls["b"][:2] == [-20.0, 5.0]  # the bracket ends first, in one round


def test_several_probes_per_round_need_fewer_rounds_for_the_same_bias():
    margins = [-7.3 + 0.37 * i for i in range(100)]
    rounds = {}
    for k in (1, 3):
        calls = []
        searches = {"m": BiasSearch(low=-20.0, high=5.0, target=0.05, tolerance=0.1, max_evals=20,
                                    per_round=k)}

        def evaluate(todo, calls=calls):
            calls.append(len(todo))
            return {(label, b): (_steps(margins)(b), 100) for label, b in todo}

        res = search_biases(searches, evaluate)["m"]
        assert sorted(margins)[5] - 0.1 <= res["chosen_bias"] <= sorted(margins)[5] and res["converged"], k
        assert res["num_probes"] == sum(calls) <= 20
        rounds[k] = len(calls)
    assert calls[0] == 5  # both ends and 3 inner points
    assert rounds[3] <= rounds[1] / 2, rounds  # 8 rounds of bisection, 4 of quadrisection


def test_stops_after_max_evals_and_says_so():
    results, calls = _run({"m": lambda b: 1 / (1 + math.exp(-b))}, tolerance=1e-6, max_evals=5)
    res = results["m"]
    assert len(calls["m"]) == 5 and not res["converged"] and "max_evals=5" in res["status"]
    assert res["chosen_bias"] is not None and 1 / (1 + math.exp(-res["chosen_bias"])) <= 0.01


def test_bracket_ends_decide_when_the_target_is_met_everywhere_or_nowhere():
    results, calls = _run({"never": lambda b: 0.0, "always": lambda b: 0.5})
    assert results["never"]["chosen_bias"] == 5.0
    assert "bias_high=5 meets the target" in results["never"]["status"]
    assert results["always"]["chosen_bias"] is None and "no b in the bracket" in results["always"]["status"]
    assert len(calls["never"]) == len(calls["always"]) == 3  # both ends and the midpoint, in one round
    text = format_results({k: v | {"at_zero": None, "at_chosen": None} for k, v in results.items()})
    assert "never: b = +5.0000" in text and "always: b = none" in text


def test_a_rate_that_falls_with_b_keeps_b_below_the_smallest_miss_and_says_so():
    # noise (sampled decoding): r meets the target at -10 and at 0..5 but misses it in between
    results, _ = _run({"m": lambda b: 0.5 if -8 < b < 0 else 0.0}, tolerance=0.5, max_evals=12, per_round=3)
    res = results["m"]
    assert -8.5 <= res["chosen_bias"] <= -8 and res["bracket"][1] > -8
    assert res["non_monotone"] and all(p["reset_bias"] >= 0 for p in res["non_monotone"])
    assert "fell as b rose" in res["status"]


def test_target_outside_0_1_and_bad_brackets_are_config_errors_naming_the_field():
    for bad in ("0", "1", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"target_reset_rate must be in \(0, 1\)"):
            config.load(CalibrateCfg, None, [f"target_reset_rate={bad}"])
    with pytest.raises(ConfigError) as e:
        config.load(CalibrateCfg, None, ["bias_low=3", "bias_high=-2", "max_evals=1", "tolerance=0"])
    for text in ("bias_high must be > bias_low (3.0)", "max_evals must be >= 2", "tolerance must be > 0"):
        assert text in str(e.value)
    with pytest.raises(ConfigError, match=r"bias_low must be in \[-100, 100\]"):
        config.load(CalibrateCfg, None, ["bias_low=-150"])
    with pytest.raises(ConfigError, match="decode must have reset_bias 0"):
        config.load(CalibrateCfg, None, ["decode.reset_bias=-3"])
    with pytest.raises(ConfigError, match="dev_datasets must hold safe prompts only"):
        config.load(CalibrateCfg, None, ['dev_datasets=[{"name": "synthetic", "harmful": true}]'])


def test_a_dev_set_with_harmful_prompts_is_an_error_naming_the_dataset():
    items = [{"dataset": "advbench", "harmful": True}] * 3 + [{"dataset": "mt-bench", "harmful": False}]
    with pytest.raises(ValueError, match=r"dev_datasets: advbench \(3 harmful prompts\)"):
        check_dev_items(items)
    check_dev_items(items[3:])


def test_dataset_harmful_filter_keeps_one_kind_before_the_limit():
    from bt_ray.eval.pipeline import load_items

    cfg = CalibrateCfg()
    safe = load_items(cfg.eval_cfg((DatasetCfg(name="synthetic", harmful=False, limit=30),)))
    harmful = load_items(cfg.eval_cfg((DatasetCfg(name="synthetic", harmful=True, limit=30),)))
    assert len(safe) == len(harmful) == 30
    assert not any(it["harmful"] for it in safe) and all(it["harmful"] for it in harmful)
    assert [it["prompt_index"] for it in safe] == list(range(30))
