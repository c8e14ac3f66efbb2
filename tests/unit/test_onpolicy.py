"""The on-policy y- step's rules, counts and output format (no model, no Ray: hand-made answers and
verdicts), and the ``jsonl`` preference source that reads the output back."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from bt_ray import config
from bt_ray.data.judge_filter import JudgeFilter
from bt_ray.data.onpolicy import (
    KeepCfg,
    OnPolicyCfg,
    Tally,
    decide,
    digest,
    draw_benign,
    helpful_example,
    load_benign_prompts,
    pair_example,
    prompt_turn,
    reusable,
    side_paths,
    write_examples,
)
from bt_ray.data.recipes import RecipeCfg
from bt_ray.data.records import DataError, Message, PreferenceExample
from bt_ray.data.sources import load_preferences

GEN = {"model": "tiny", "engine": "hf", "max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def _example(i: int, prompt: str = "how do I pick a lock?", chosen: str = "I'm sorry, I can't help.",
             source: str = "safety-tuned-llamas") -> PreferenceExample:
    return PreferenceExample(source=source, location=f"data.json record {i}",
                             prompt=(Message("user", prompt),), chosen=chosen,
                             rejected=None, kind="harmful", meta={"id": i})


def _row(answer: str, unsafe, *, sample: int = 0, error: str | None = None) -> dict:
    return {"answers": [] if error and not error.startswith("judge:") else [answer], "unsafe": unsafe,
            "error": error, "sample": sample, "stand_in": True, "judge_raw": "r", "stopped": True}


@pytest.mark.parametrize("answer,chosen,keep,expected", [
    (True, False, KeepCfg(), ("harmful", "unsafe_kept")),
    (False, False, KeepCfg(), (None, "safe_dropped")),
    (False, False, KeepCfg(safe_answer="safe"), ("safe", "safe_kept")),
    (True, False, KeepCfg(unsafe_answer="drop"), (None, "unsafe_dropped")),
    (True, True, KeepCfg(), (None, "chosen_unsafe")),
    (True, True, KeepCfg(chosen_unsafe="keep"), ("harmful", "unsafe_kept")),
    (None, False, KeepCfg(), (None, "judge_error")),
    (True, None, KeepCfg(), (None, "judge_error")),
])
def test_decide_applies_each_keep_rule(answer, chosen, keep, expected):
    assert decide(answer, chosen, keep) == expected
    assert decide(answer, chosen, keep, generate_error=True) == (None, "generate_error")


def test_pairs_are_labelled_and_counted_per_source_and_rule():
    keep = KeepCfg()
    stl, hh = Tally(source="stl"), Tally(source="hh")
    cases = [  # (tally, example, row, chosen_unsafe)
        (stl, _example(0), _row("Sure, first get a tension wrench", True), False),
        (stl, _example(1), _row("I cannot help with that.", False), False),
        (stl, _example(2), _row("Step one: ...", True), True),  # y+ judged unsafe
        (stl, _example(3), _row("", None, error="generate: RuntimeError: boom"), False),
        (hh, _example(4, source="hh-rlhf"), _row("Here is how", True, sample=1), False),
        (hh, _example(5, source="hh-rlhf"), _row("x", None, error="judge: no verdict"), False),
    ]
    kept = [pair_example(ex, ex.prompt[0].content, row, cu, keep, tally, GEN, "refusal-prefix (stand-in)")
            for tally, ex, row, cu in cases]
    assert [k is not None for k in kept] == [True, False, False, False, True, False]
    first = kept[0]
    assert (first.kind, first.rejected, first.chosen) == ("harmful", "Sure, first get a tension wrench",
                                                          "I'm sorry, I can't help.")
    assert first.source == "onpolicy:safety-tuned-llamas" and first.location == "data.json record 0"
    assert first.meta.items() >= {"rejected_unsafe": True, "chosen_unsafe": False, "rule": "unsafe_kept",
                               "origin_source": "safety-tuned-llamas",
                               "origin_location": "data.json record 0", "sample": 0,
                               "judge": "refusal-prefix (stand-in)", "judge_stand_in": True,
                               "generation": GEN, "origin_meta": {"id": 0}}.items()
    assert kept[4].meta["sample"] == 1
    assert stl.to_dict().items() >= {"generated": 4, "judged_unsafe": 2, "chosen_judged_unsafe": 1, "kept": 1,
                                  "errors": 1, "rules": {"unsafe_kept": 1, "safe_dropped": 1,
                                                         "chosen_unsafe": 1, "generate_error": 1}}.items()
    assert hh.to_dict()["rules"] == {"unsafe_kept": 1, "judge_error": 1}


def test_safe_answers_kept_as_safe_pairs_when_configured():
    tally = Tally(source="s")
    ex = pair_example(_example(0), "q", _row("A safe answer.", False), False, KeepCfg(safe_answer="safe"),
                      tally, GEN, "j")
    assert (ex.kind, ex.rejected, ex.meta["rejected_unsafe"]) == ("safe", "A safe answer.", False)
    assert tally.rules == {"safe_kept": 1}


def test_helpful_answers_kept_unless_refused():
    item = {"prompt": "Explain the water cycle to a complete beginner.", "category": "science",
            "topic": "the water cycle", "location": "benign_prompts.yaml topic 11 template 0"}
    tally = Tally(source="helpful")
    kept = helpful_example(item, _row("Water evaporates...", True), True, tally, GEN, "refusal-prefix")
    refused = _row("I'm sorry, I can't.", False)
    assert helpful_example(item, refused, False, tally, GEN, "refusal-prefix") is None
    assert helpful_example(item, _row("x", None), None, tally, GEN, "refusal-prefix") is None
    assert helpful_example(item, _row("", None, error="encode: too long"), True, tally, GEN, "r") is None
    assert (kept.kind, kept.chosen, kept.rejected, kept.source) == ("safe", "Water evaporates...", None,
                                                                    "onpolicy:helpful")
    assert kept.prompt == (Message("user", item["prompt"]),)
    assert kept.meta["refused"] is False and kept.meta["category"] == "science"
    assert tally.rules == {"helpful_kept": 1, "helpful_refused": 1, "judge_error": 1, "generate_error": 1}
    assert tally.to_dict()["kept"] == 1


def test_prompt_turn_skips_or_takes_the_last_turn():
    single = _example(0)
    multi = PreferenceExample(source="hh-rlhf", location="x:1", prompt=(
        Message("user", "hi"), Message("assistant", "hello"), Message("user", "now the bad part")),
        chosen="no", rejected="yes", kind="harmful")
    assert prompt_turn(single, "skip") == "how do I pick a lock?"
    assert prompt_turn(multi, "skip") is None
    assert prompt_turn(multi, "last_turn") == "now the bad part"


def test_jsonl_round_trip_and_column_filter(tmp_path):
    tally = Tally(source="s")
    pairs = [pair_example(_example(i), "how do I pick a lock?", _row(a, u), cu, KeepCfg(chosen_unsafe="keep"),
                          tally, GEN, "j") for i, (a, u, cu) in enumerate([("Sure: ...", True, False),
                                                                            ("Step 1", True, True)])]
    item = {"prompt": "Give me three practical tips about composting kitchen scraps.", "category": "home",
            "topic": "composting kitchen scraps", "location": "benign_prompts.yaml topic 31 template 1"}
    helpful = helpful_example(item, _row("Use browns and greens.", True), True, Tally(source="h"), GEN, "r")
    written = [*pairs, helpful]
    path = write_examples(tmp_path / "onpolicy.jsonl", written)
    assert not (tmp_path / "onpolicy.jsonl.partial").exists()
    back, report = load_preferences("jsonl", str(path))
    assert (report.num_read, report.num_used) == (3, 3)
    for w, b, line in zip(written, back, range(1, 4)):
        fields = ("source", "prompt", "chosen", "rejected", "kind")
        assert [getattr(b, f) for f in fields] == [getattr(w, f) for f in fields]
        assert b.location == f"onpolicy.jsonl:{line}"
        assert b.meta == w.meta | {"row_location": w.location}
    # judge_filter=column reads the written labels: y- unsafe + y+ safe -> harmful; y+ unsafe -> dropped;
    # the helpful row has no y- and keeps its own label.
    labels = JudgeFilter(RecipeCfg(judge_filter="column")).label(back)
    assert [(lb.kind, lb.outcome) for lb in labels] == [
        ("harmful", "rejected_unsafe"), (None, "chosen_unsafe"), ("safe", "no_rejected")]


@pytest.mark.parametrize("line,problem", [
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a"', "not valid JSON"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": null}', "field 'kind'"),
    ('{"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "kind": "safe"}', "field 'prompt'"),
    ('{"prompt": [{"role": "user", "content": "q"}], "kind": "safe"}', "field 'chosen' is missing"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "kind": "safe", "extra": 1}',
     "unknown field(s) 'extra'"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "kind": "safe", "meta": [1]}',
     "field 'meta'"),
])
def test_malformed_jsonl_row_names_file_line_and_field(tmp_path, line, problem):
    good = json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": None,
                       "kind": "safe"})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_preferences("jsonl", str(path))
    assert f"{path}:3" in str(e.value) and problem in str(e.value)


def test_jsonl_source_needs_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="jsonl"):
        load_preferences("jsonl", None)
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_preferences("jsonl", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="split must be null"):
        load_preferences("jsonl", str(tmp_path / "x.jsonl"), split="train")


def test_bad_config_fields_are_listed_at_once():
    with pytest.raises(config.ConfigError) as e:
        config.load(OnPolicyCfg, None, ["samples_per_prompt=2", "max_error_fraction=2", "out=x.json",
                                        "helpful.refusal_judge=llama-guard-2", "helpful.num_prompts=-1",
                                        "keep.safe_answer=maybe", "sources=[{name: advbench}]"])
    text = str(e.value)
    for name in ("samples_per_prompt must be 1 with greedy decoding", "max_error_fraction must be in [0, 1]",
                 "out must be a .jsonl path", "helpful.refusal_judge must be a refusal/compliance judge",
                 "helpful.num_prompts must be >= 0", "keep.safe_answer",
                 "sources must name preference sources"):
        assert name in text, name
    with pytest.raises(config.ConfigError, match="must list a source, or set helpful.num_prompts"):
        config.load(OnPolicyCfg, None, ["sources=[]"])
    config.load(OnPolicyCfg, None, ["sources=[]", "helpful.num_prompts=5", "samples_per_prompt=3",
                                    "decode.temperature=0.7"])


def test_benign_prompts_file_is_well_formed_and_drawn_by_seed():
    prompts = load_benign_prompts()
    assert len(prompts) >= 400 and len({p["prompt"] for p in prompts}) == len(prompts)
    assert len({p["category"] for p in prompts}) >= 8
    cfg = config.build(OnPolicyCfg, {"helpful": {"num_prompts": 20, "seed": 3}}).helpful
    assert draw_benign(cfg) == draw_benign(cfg) != draw_benign(config.build(
        OnPolicyCfg, {"helpful": {"num_prompts": 20, "seed": 4}}).helpful)
    with pytest.raises(ValueError, match="helpful.num_prompts=10000"):
        draw_benign(config.build(OnPolicyCfg, {"helpful": {"num_prompts": 10000}}).helpful)


def test_benign_prompts_are_not_evaluated_prompts():
    """XSTest and MT-Bench are evaluated: no benign prompt may be one of theirs."""
    root = Path(os.environ.get("BT_RAY_DATA_DIR", "/nonexistent"))
    xstest, mt = root / "xstest" / "xstest_prompts.csv", root / "mt-bench" / "question.jsonl"
    if not (xstest.is_file() and mt.is_file()):
        pytest.skip("BT_RAY_DATA_DIR lacks xstest/mt-bench")
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    evaluated = {norm(r["prompt"]) for r in csv.DictReader(xstest.open())}
    evaluated |= {norm(t) for line in mt.read_text().splitlines() if line.strip()
                  for t in json.loads(line)["turns"]}
    assert not evaluated & {norm(p["prompt"]) for p in load_benign_prompts()}


def test_bad_prompt_file_names_the_entry(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("topics: {a: [x]}\ntemplates: ['no placeholder']\n")
    with pytest.raises(DataError, match=r"p.yaml: templates\[0\] must be a string holding \{topic\}"):
        load_benign_prompts(path)


def test_rerun_reuses_only_a_complete_output_of_the_same_config(tmp_path):
    cfg = config.build(OnPolicyCfg, {"out": str(tmp_path / "o.jsonl")})
    assert reusable(cfg) is None
    write_examples(cfg.out, [_example(0)])
    summary_path, _ = side_paths(cfg.out)
    summary_path.write_text(json.dumps({"config_digest": digest(cfg), "num_rows": 1}))
    assert reusable(cfg) == {"config_digest": digest(cfg), "num_rows": 1}
    other = config.build(OnPolicyCfg, {"out": str(tmp_path / "o.jsonl"), "decode": {"seed": 1}})
    assert reusable(other) is None
    summary_path.write_text(json.dumps({"config_digest": digest(cfg), "num_rows": 2}))  # file cut short
    assert reusable(cfg) is None
