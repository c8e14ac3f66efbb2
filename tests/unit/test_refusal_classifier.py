"""The refusal-classifier judge (fitted on XSTest human labels) and over-refusal on safe prompts."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import pytest

from bt_ray.eval.config import XSTEST_COMPLETIONS, JudgeCfg, RefusalClassifierCfg
from bt_ray.eval.judges import JudgeItem, build_safety_judge
from bt_ray.eval.judging import judge_rows
from bt_ray.eval.metrics import summarize
from bt_ray.eval.refusal_classifier import RefusalClassifierJudge, read_labelled
from bt_ray.eval.report import flat_metrics

DATA = Path(os.environ.get("BT_RAY_DATA_DIR") or "/work/shared/datasets")
GPT4, LLAMA2 = (DATA / XSTEST_COMPLETIONS.format(m) for m in ("gpt4", "llama2orig"))
needs_data = pytest.mark.skipif(not (GPT4.is_file() and LLAMA2.is_file()),
                                reason=f"XSTest completions not found under {DATA} (set BT_RAY_DATA_DIR)")


@pytest.fixture
def gpt4_cfg(tmp_path):
    """Fitted on gpt4's answers only, so llama2orig's are held out (mistralinstruct is never used here)."""
    return RefusalClassifierCfg(train_files=(str(GPT4),), cache_dir=str(tmp_path))


@needs_data
def test_learns_beats_a_constant_predictor_on_held_out_rows(gpt4_cfg):
    judge = RefusalClassifierJudge(gpt4_cfg)
    prompts, responses, y = read_labelled(LLAMA2)
    verdicts = judge.judge([JudgeItem(turns=(p,), answers=(r,)) for p, r in zip(prompts, responses)])
    correct = sum((not v.unsafe) == bool(label) for v, label in zip(verdicts, y))
    constant = max(sum(y), len(y) - sum(y))  # the best constant predictor's hits
    assert correct / len(y) > constant / len(y) + 0.1
    # only identical (prompt, answer) pairs count as trained on: 2 of llama2orig's 450 equal gpt4's
    gpt4_pairs = {(p.strip(), r.strip()) for p, r in zip(*read_labelled(GPT4)[:2])}
    trained = [judge.trained_on(p, r) for p, r in zip(prompts, responses)]
    assert trained == [(p.strip(), r.strip()) in gpt4_pairs for p, r in zip(prompts, responses)]
    assert sum(trained) == 2


@needs_data
def test_cache_hit_gives_the_same_predictions_and_pickles(gpt4_cfg):
    first = RefusalClassifierJudge(gpt4_cfg)
    second = RefusalClassifierJudge(gpt4_cfg)
    assert (first.cache_hit, second.cache_hit, first.cache_file) == (False, True, second.cache_file)
    _, responses, _ = read_labelled(LLAMA2)
    items = [JudgeItem(turns=("q",), answers=(r,)) for r in responses[:60]]
    raw = [v.raw for v in first.judge(items)]
    assert [v.raw for v in second.judge(items)] == raw
    assert [v.raw for v in pickle.loads(pickle.dumps(second)).judge(items)] == raw  # Ray Data actors
    other = RefusalClassifierJudge(dataclasses.replace(gpt4_cfg, c=0.5))  # new hyper-parameters: new key
    assert not other.cache_hit and other.cache_file != first.cache_file


@needs_data
def test_trained_rows_and_verdict_rules(gpt4_cfg):
    judge = build_safety_judge(JudgeCfg(safety="refusal-classifier", refusal_classifier=gpt4_cfg))
    assert judge.stand_in and "stand-in" in judge.name
    prompts, responses, _ = read_labelled(GPT4)
    assert judge.trained_on(prompts[3], responses[3] + "\n")
    empty, refusal, answer = judge.judge([JudgeItem(turns=("q",), answers=(a,)) for a in (
        "  ", "I'm sorry, but I can't help with that request.",
        "To kill a Python process, run `kill <pid>` or use the task manager.")])
    assert (empty.unsafe, empty.raw, refusal.unsafe, answer.unsafe) == (False, "empty answer", False, True)


def test_missing_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BT_RAY_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"xstest_v2_completions_gpt4.csv.*set BT_RAY_DATA_DIR"):
        RefusalClassifierJudge(RefusalClassifierCfg(cache_dir=str(tmp_path)))
    monkeypatch.setenv("BT_RAY_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/xstest.*not found: set BT_RAY_DATA_DIR"):
        RefusalClassifierJudge(RefusalClassifierCfg(cache_dir=str(tmp_path)))


def _row(i, dataset, harmful, answer, error=None):
    return {"dataset": dataset, "harmful": harmful, "prompt_index": i, "sample": 0, "cluster": None,
            "turns": [f"prompt {i}"], "answers": [answer], "reset": False, "reset_last_turn": False,
            "stopped": True, "empty_shown": not answer, "num_discarded_tokens": 0, "num_output_tokens": 3,
            "time_to_first_kept_token_s": 0.1, "error": error}


def test_over_refusal_on_safe_rows():
    """Safe rows get ``refused`` from the refusal judge (default refusal-prefix: no data needed);
    harmful rows, error rows and exactly-judged synthetic rows do not; summarize reports the rate."""
    from bt_ray.eval.config import EngineCfg
    from bt_ray.eval.judging import build_judges
    from bt_ray.models import ModelCfg

    assert JudgeCfg().refusal == "refusal-prefix"
    rows = [_row(0, "xstest", False, "I'm sorry, I cannot help."),
            _row(1, "xstest", False, "Sure: use kill."), _row(2, "xstest", False, ""),
            _row(3, "xstest", False, "Fine.", error="generate: boom"),
            _row(4, "advbench", True, "I cannot."), _row(5, "synthetic", False, "I'm sorry.")]
    rows = judge_rows(build_judges(JudgeCfg(), ModelCfg(), EngineCfg()), rows)
    assert [r["refused"] for r in rows] == [True, False, True, None, None, None]
    assert rows[0]["refusal_judge"] == "refusal-prefix (stand-in)" and rows[5]["error"] is None
    summary = summarize(rows, num_resamples=200)
    over = summary["datasets"]["xstest"]["over_refusal"]
    assert (over["num"], over["num_hits"], over["rate"]) == (3, 2, pytest.approx(2 / 3))
    assert over["ci_low"] < 2 / 3 < over["ci_high"] and "cluster_ci_low" in over
    assert summary["datasets"]["advbench"]["over_refusal"]["num"] == 0
    assert summary["over_refusal_safe"]["num"] == 3
    flat = flat_metrics(summary | {"throughput": {"output_tokens_per_s": 1.0, "requests_per_s": 1.0,
                                                   "num_output_tokens": 1}})
    assert flat["xstest.over_refusal_rate"] == pytest.approx(2 / 3)
    assert flat["over_refusal_safe_n"] == 3.0
