"""The bt-ray CLI, run as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

BT_RAY = str(Path(sys.executable).parent / "bt-ray")


def run(*args, cwd=None):
    return subprocess.run([BT_RAY, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_build_synthetic_writes_rows_config_and_summary(tmp_path):
    out = tmp_path / "bt.jsonl"
    p = run("data", "build", "--recipe", "backtrack-sft", "--source", "synthetic", "--out", str(out),
            "synthetic.num_train_pairs=40", "recipe.prefix.seed=3")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    resolved = yaml.safe_load(out.with_suffix(".config.yaml").read_text())
    assert resolved["recipe"]["prefix"]["seed"] == 3 and resolved["synthetic"]["num_train_pairs"] == 40
    assert summary["num_rows"] == len(rows) == summary["recipe"]["num_rows"]
    assert summary["sources"][0]["num_read"] == 40 == summary["sources"][0]["num_used"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"plain", "backtrack"}
    assert sum(r["kind"] == "plain" for r in rows) == 40  # every example keeps its plain term
    assert "wrote" in p.stderr and "read 40, used 40" in p.stderr


def test_build_refuses_the_hh_rlhf_test_split(shared_datasets, tmp_path):
    """Review A1: the only shipped HH file is the test split evaluation uses; building training rows
    from it fails, with or without split: test, and writes nothing."""
    src = shared_datasets / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    out = tmp_path / "hh.jsonl"
    p = run("data", "build", "--recipe", "backtrack-dpo", "--source", f"hh-rlhf:{src}", "--out", str(out))
    assert p.returncode != 0 and "is the test split" in p.stderr and not out.exists()
    p = run("data", "build", "--recipe", "backtrack-dpo", "--out", str(out),
            f'sources=[{{"name": "hh-rlhf", "path": "{src}", "split": "test"}}]')
    assert p.returncode != 0 and "is the evaluation test set 'hh-rlhf'" in p.stderr and not out.exists()


def test_build_hh_rlhf_file(tmp_path):
    src = Path(__file__).resolve().parents[1] / "assets" / "hh_rlhf_labelled.jsonl"
    out = tmp_path / "hh.jsonl"
    p = run("data", "build", "--recipe", "backtrack-dpo", "--source", f"hh-rlhf:{src}", "--out", str(out))
    assert p.returncode == 0, p.stderr
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    source = summary["sources"][0]
    assert source["num_read"] == 4
    assert source["num_used"] + sum(source["skipped"].values()) == 4  # nothing vanishes silently
    recipe = summary["recipe"]
    assert recipe["num_examples"] == source["num_used"]
    assert recipe["num_rows"] + sum(recipe["skipped"].values()) == recipe["num_examples"]


def test_inspect_json_shows_every_token_with_its_mask():
    p = run("data", "inspect", "--recipe", "backtrack-sft", "--source", "synthetic", "--limit", "2",
            "--kind", "backtrack", "--json", "synthetic.num_train_pairs=20")
    assert p.returncode == 0, p.stderr
    shown = json.loads(p.stdout)
    assert len(shown) == 2
    for ex in shown:
        tokens = ex["tokens"]
        assert set(tokens[0]) == {"id", "text", "trained"}
        resets = [i for i, t in enumerate(tokens) if t["text"] == "[RESET]"]
        assert len(resets) == 1
        r = resets[0]
        assert not any(t["trained"] for t in tokens[:r])  # prompt and unsafe prefix: no loss
        assert all(t["trained"] for t in tokens[r:])  # [RESET], y+, end of turn
        assert tokens[-1]["text"] == "<|im_end|>"
    p = run("data", "inspect", "--recipe", "backtrack-dpo", "--source", "synthetic", "--limit", "1",
            "--json", "synthetic.num_train_pairs=4")
    ex = json.loads(p.stdout)[0]
    assert {"prompt", "chosen", "rejected"} <= set(ex)


def test_inspect_text_marks_untrained_tokens():
    p = run("data", "inspect", "--recipe", "backtrack-sft", "--source", "synthetic", "--limit", "1",
            "--kind", "backtrack", "synthetic.num_train_pairs=8")
    assert p.returncode == 0, p.stderr
    assert "[<|im_start|>]" in p.stdout and "|[RESET]|" in p.stdout.replace("\n", "|")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--recipe", "backtrack-sfd"], "recipe.name must be one of"),
        (["--source", "hh-rlhf:/nonexistent/test.jsonl.gz"], "/nonexistent/test.jsonl.gz"),
        (["--source", "advbenchh"], "unknown"),
    ],
)
def test_bad_inputs_give_one_clear_error(tmp_path, args, expected):
    base = ["data", "build", "--out", str(tmp_path / "x.jsonl")]
    if "--recipe" not in args:
        base += ["--recipe", "backtrack-sft"]
    if "--source" not in args:
        base += ["--source", "synthetic"]
    p = run(*base, *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "bt-ray: error:" in p.stderr and expected in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_corrupt_jsonl_line_is_named(tmp_path):
    bad = tmp_path / "hh.jsonl.gz"
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps(good) + "\n" + '{"chosen": "\\n\\nHuman: hi", "rej\n' + json.dumps(good) + "\n")
    p = run("data", "build", "--recipe", "backtrack-sft", "--source", f"hh-rlhf:{bad}",
            "--out", str(tmp_path / "x.jsonl"))
    assert p.returncode == 2
    assert f"{bad}:2" in p.stderr, p.stderr


def test_config_with_unknown_key_and_wrong_type_reports_both(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# test\nrecipe:\n  nme: backtrack-sft\n  max_length: long\n")
    p = run("data", "build", "--config", str(cfg), "--out", str(tmp_path / "x.jsonl"))
    assert p.returncode == 2
    assert f"{cfg}:3: recipe.nme: unknown key (did you mean 'name'?)" in p.stderr
    assert f"{cfg}:4: recipe.max_length must be an integer; got 'long'" in p.stderr
    assert "2 problem(s)" in p.stderr


@pytest.mark.parametrize("name,cfg_class", [("sft", "SFTJobCfg"), ("dpo", "DPOJobCfg"), ("eval", "EvalCfg"),
                                            ("pipeline", "PipelineCfg"), ("demo", "PipelineCfg")])
def test_job_subcommands_parse_like_their_job_script(name, cfg_class):
    """``bt-ray <job> --help`` is the job script's own parser (``bt_ray.config.parse_job_args``)."""
    via_cli = run(name, "--help")
    via_script = subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), "--help"],
                                capture_output=True, text=True, timeout=300)
    assert via_cli.returncode == via_script.returncode == 0, via_cli.stderr + via_script.stderr
    assert f"YAML config ({cfg_class})" in via_cli.stdout and "dotted overrides" in via_cli.stdout
    assert via_cli.stdout == via_script.stdout
