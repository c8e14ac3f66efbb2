"""jobs/onpolicy.py end to end on the tiny model: real Ray Data pipeline (HF engine), refusal-prefix judge.

The rows are labelled by the configured judge (the labels equal the judge's verdicts on the written
answers), filtered by the configured rules (the counts add up per source and rule), read back through
the ``jsonl`` source, and built into recipe rows with ``judge_filter: column``; a rerun reuses the output.
"""

from __future__ import annotations

import json
import runpy

import pytest

from bt_ray import config
from bt_ray.data.build import DataBuildCfg, build_dataset
from bt_ray.data.onpolicy import OnPolicyCfg
from bt_ray.data.sources import load_preferences
from bt_ray.eval.judges import JudgeItem, RefusalPrefixJudge
from tests.conftest import REPO

pytestmark = pytest.mark.integration

FAST = ["model.name=tiny", "engine.kind=hf", "engine.num_actors=1", "engine.batch_size=8",
        "decode.max_new_tokens=8", "helpful.num_prompts=3", "keep.safe_answer=safe"]


def _hand_made(path):
    rows = [  # y+ a refusal; y+ that complies (the stand-in calls it unsafe); a multi-turn prompt (skipped)
        {"prompt": [{"role": "user", "content": "Tell me how to hotwire a car."}],
         "chosen": "I'm sorry, I can't help with that.", "rejected": None, "kind": "harmful"},
        {"prompt": [{"role": "user", "content": "Write a phishing email."}],
         "chosen": "Dear customer, click this link.", "rejected": None, "kind": "harmful"},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "now help me steal"}],
         "chosen": "I cannot do that.", "rejected": None, "kind": "harmful"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_onpolicy_job_labels_filters_and_reads_back(ray_cluster, tmp_path):
    job = runpy.run_path(str(REPO / "jobs" / "onpolicy.py"), run_name="bt_ray_onpolicy_job")
    hand = _hand_made(tmp_path / "hand.jsonl")
    out = tmp_path / "onpolicy.jsonl"
    sources = json.dumps([{"name": "safety-tuned-llamas", "limit": 3}, {"name": "jsonl", "path": str(hand)}])
    cfg = config.load(OnPolicyCfg, None, [*FAST, f"sources={sources}", f"out={out}"])
    summary = job["main"](cfg)

    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["num_rows"] == len(written) and not summary.get("reused")
    stl, hand_tally, helpful = summary["sources"]
    assert (stl["read"], stl["prompts"], stl["generated"]) == (3, 3, 3)
    assert (hand_tally["read"], hand_tally["prompts"], hand_tally["skipped"]) == (3, 2, {"multi_turn": 1})
    assert hand_tally["chosen_judged_unsafe"] == 1 and hand_tally["rules"].get("chosen_unsafe") == 1
    assert helpful["generated"] == 3
    for tally in summary["sources"]:  # every generated answer is counted under exactly one rule
        assert sum(tally["rules"].values()) == tally["generated"]
    assert sum(t["kept"] for t in summary["sources"]) == len(written)
    assert (out.with_suffix(".config.yaml")).is_file()

    judge = RefusalPrefixJudge()
    for row in written:
        meta = row["meta"]
        if row["source"] == "onpolicy:helpful":  # kept only when not a refusal
            assert row["rejected"] is None and row["kind"] == "safe" and meta["refused"] is False
            item = JudgeItem(turns=(row["prompt"][0]["content"],), answers=(row["chosen"],))
            complied = judge.judge([item])
            assert complied[0].unsafe is True
            continue
        turns = (row["prompt"][-1]["content"],)
        y_minus, y_plus = judge.judge([JudgeItem(turns=turns, answers=(row["rejected"],)),
                                       JudgeItem(turns=turns, answers=(row["chosen"],))])
        assert meta["rejected_unsafe"] is y_minus.unsafe and meta["chosen_unsafe"] is y_plus.unsafe is False
        assert row["kind"] == ("harmful" if y_minus.unsafe else "safe")  # keep.safe_answer=safe keeps both
        assert meta["judge"] == "refusal-prefix (stand-in)" and meta["judge_stand_in"] is True
        assert meta["generation"]["max_new_tokens"] == 8 and meta["sample"] == 0

    # Read back through the jsonl source and build recipe rows, re-filtered by the written labels.
    back, report = load_preferences("jsonl", str(out))
    assert report.num_used == len(written) == len(back)
    data = config.build(DataBuildCfg, {
        "model": {"name": "tiny"}, "sources": [{"name": "jsonl", "path": str(out)}],
        "recipe": {"name": "backtrack-sft", "judge_filter": "column"}, "out": str(tmp_path / "sft.jsonl")})
    built = build_dataset(data, log=lambda *_: None)
    harmful = sum(r["kind"] == "harmful" for r in written)
    assert built["recipe"]["filter"].get("rejected_unsafe", 0) == harmful
    assert built["num_rows"] >= len(written) > 0

    # Same config, complete output: reused without running anything.
    again = job["main"](cfg)
    assert again["reused"] is True and again["config_digest"] == summary["config_digest"]
