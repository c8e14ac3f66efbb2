"""``bt-ray report``: report.md's numbers are the run's numbers, parts absent are said to be absent.

The run dirs are built here with the writers the jobs use (jobs/eval.py's ``write_one`` on rows made
in code, ``compare_pairs``, ``attacks.report.summarize`` and ``paired``), laid out as a pipeline lays
out its run dir: ``eval/``, ``runs/<name>/``, ``attacks/``. No Ray, no model.
"""

from __future__ import annotations

import json
import random
import runpy
from pathlib import Path

import pytest

from bt_ray import config
from bt_ray.attacks import report as attack_report
from bt_ray.cli import main as cli_main
from bt_ray.eval.config import EvalCfg
from bt_ray.eval.report import compare_pairs
from bt_ray.report import collect, plots, write_report
from bt_ray.report.markdown import comparison_sentence

REPO = Path(__file__).resolve().parents[2]
EVAL_JOB = runpy.run_path(str(REPO / "jobs" / "eval.py"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JUDGES = {"synthetic": ("synthetic-exact", False), "advbench": ("keyword", True),
          "strongreject": ("keyword", True)}
# unsafe probability per model: the sft pair differs a lot, the dpo pair is one model twice
UNSAFE_P = {"baseline-sft": 0.6, "backtrack-sft": 0.05, "baseline-dpo": 0.3, "backtrack-dpo": 0.3}


def _row(label: str, dataset: str, prompt_index: int, sample: int, harmful: bool, rng: random.Random,
         bias: float = 0.0) -> dict:
    judge, stand_in = JUDGES[dataset]
    # backtrack-dpo is judged exactly as baseline-dpo: the same p and the same stream of draws
    u_unsafe, u_reset = rng.random(), rng.random()
    unsafe = harmful and u_unsafe < max(0.0, UNSAFE_P[label] + 0.05 * bias)
    reset = "backtrack" in label and u_reset < (0.3 if harmful else 0.05)
    return {
        "index": prompt_index, "dataset": dataset, "prompt_index": prompt_index, "sample": sample,
        "cluster": f"c{prompt_index // 2}", "harmful": harmful, "turns": [f"prompt {prompt_index}"],
        "reset": reset, "reset_last_turn": reset, "num_discarded_tokens": 3 if reset else 0,
        "stopped": True, "empty_shown": False, "num_output_tokens": 10,
        "time_to_first_kept_token_s": 0.01 + 0.001 * prompt_index, "unsafe": unsafe if harmful else False,
        "score": (0.5 if label.startswith("baseline") else 1.0) if dataset == "synthetic" and not harmful
        else None, "judge": judge, "stand_in": stand_in, "error": None,
    }


def _rows(label: str, sets: list[str], num_samples: int = 1, bias: float = 0.0, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{label.split('-')[1] if label.endswith('dpo') else label}-{seed}-{bias}")
    rows = []
    for dataset in sets:
        for i in range(40):
            harmful = dataset != "synthetic" or i % 2 == 0
            for s in range(num_samples if harmful else (1 if num_samples == 1 else 0)):
                rows.append(_row(label, dataset, i, s, harmful, rng, bias))
    return rows


def make_eval(root: Path, sets: list[str], *, worst_of_k=(2, 4), bias_sweep=(-2.0, 0.0)) -> Path:
    """An eval run dir as jobs/eval.py writes it (per model: main/, worst_of_k/, bias_*/, metrics.json)."""
    out = root / "eval"
    cfg = config.load(EvalCfg, None, [f"worst_of_k={json.dumps(list(worst_of_k))}",
                                      f"bias_sweep={json.dumps(list(bias_sweep))}",
                                      "bootstrap_resamples=100"])
    timing = {"generate_span_s": 2.0, "wall_s": 3.0}
    models, rows_by_label = {}, {}
    for label in UNSAFE_P:
        done = {f"{label}::main": (_rows(label, sets), timing)}
        if worst_of_k:
            done[f"{label}::worst_of_k"] = (_rows(label, sets, max(worst_of_k), seed=1), timing)
        for b in bias_sweep:
            done[f"{label}::bias_{b:+g}"] = (_rows(label, sets, bias=b), timing)
        metrics, _ = EVAL_JOB["write_one"](cfg, label, f"/models/{label}", out / label, done)
        models[label] = {"name": f"/models/{label}", "rows": str(out / label / "main" / "rows.jsonl"),
                         "metrics": metrics, "mlflow_run_id": "0" * 32}
        rows_by_label[label] = {"main": done[f"{label}::main"][0]}
        if worst_of_k:
            rows_by_label[label]["worst_of_k"] = done[f"{label}::worst_of_k"][0]
    keys = ["synthetic"] if "synthetic" in sets else sets[:1]
    pairs = [["baseline-sft", "backtrack-sft"], ["baseline-dpo", "backtrack-dpo"]]
    compared = compare_pairs(rows_by_label, pairs, keys, num_resamples=200)
    summary = {"run_dir": str(out), "config": str(out / "config.yaml"), "engine": "hf", "models": models,
               "mlflow": {}, "figures": [], "table": "", "comparisons": compared}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def make_training(root: Path) -> dict[str, list[float]]:
    losses = {"sft-baseline": [3.0, 2.0, 1.5], "sft-backtrack": [3.2, 2.1, 1.4], "dpo-backtrack": [0.69, 0.4]}
    for name, values in losses.items():
        run = root / "runs" / name
        run.mkdir(parents=True)
        lines = [{"step": i + 1, "loss": v, "learning_rate": 1e-4} for i, v in enumerate(values)]
        lines.append({"step": len(values), "train_loss": sum(values) / len(values)})  # the trainer's last
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (run / "summary.json").write_text(json.dumps({
            "stage": name.split("-")[0], "global_step": len(values), "num_rows": 100, "fit_seconds": 1.0,
            "metrics": {"step": len(values), "loss": values[-1]}, "git_sha": "abc123"}))
    return losses


def make_attacks(root: Path) -> Path:
    """An attack job's run dir (pipeline: <run_dir>/attacks): prefill and gcg on two models."""
    out = root / "attacks"
    rng = random.Random(0)
    rows = {}
    for label, p in (("baseline-dpo", 0.8), ("backtrack-dpo", 0.1)):
        for kind, variants in (("prefill", ["k=2", "k=5"]), ("gcg", [""])):
            rows[(label, kind)] = [
                {"behaviour": i, "variant": v, "cluster": f"c{i}", "unsafe": rng.random() < p,
                 "reset": label.startswith("backtrack"), "empty_shown": False, "judge": "keyword",
                 "stand_in": True, "compute": {"steps": 1, "seconds": 0.1, "forward": 2, "backward": 1}}
                for v in variants for i in range(20)]
            (out / label / kind).mkdir(parents=True)
            (out / label / kind / "summary.json").write_text(
                json.dumps(attack_report.summarize(rows[(label, kind)], num_resamples=100)))
    paired = {kind: attack_report.paired(rows[("baseline-dpo", kind)], rows[("backtrack-dpo", kind)],
                                         num_resamples=100) for kind in ("prefill", "gcg")}
    (out / "summary.json").write_text(json.dumps({
        "run_dir": str(out), "attack": "gcg", "models": {"baseline-dpo": "/m/a", "backtrack-dpo": "/m/b"},
        "table2": str(out / "table2.md"), "paired": {"baseline-dpo - backtrack-dpo": paired}}))
    return out


@pytest.fixture()
def full_run(tmp_path) -> Path:
    root = tmp_path / "run"
    make_eval(root, ["advbench", "strongreject", "synthetic"])
    make_training(root)
    make_attacks(root)
    (root / "summary.json").write_text(json.dumps({
        "command": "python jobs/pipeline.py --preset demo", "git_sha": "deadbeef",
        "date": "2025-01-02T03:04:05"}))
    return root


def table_rows(report: str) -> dict[str, list[str]]:
    """Table 1's rows: {row name: cells}."""
    section = report.split("## Table 1")[1].split("###")[0]
    out = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def pct(r: dict) -> str:
    return f"{100 * r['rate']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] n={r['num']}"


def test_table1_numbers_equal_the_metrics(full_run, tmp_path):
    report = write_report(full_run, tmp_path / "out").read_text()
    rows = table_rows(report)
    labels = list(UNSAFE_P)
    assert report.split("## Table 1")[1].splitlines()[4] == "| | " + " | ".join(labels) + " |"
    for i, label in enumerate(labels):
        m = json.loads((full_run / "eval" / label / "metrics.json").read_text())
        for name in ("advbench", "strongreject", "synthetic"):
            assert rows[f"unsafe % {name}"][i] == pct(m["datasets"][name]["unsafe"])
        assert rows["unsafe % pooled (advbench, strongreject)"][i] == pct(m["pooled"]["unsafe"])
        s = m["datasets"]["synthetic"]["score"]
        assert rows["helpfulness synthetic (mean score)"][i] == (
            f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] n={s['num']}")
        assert rows["reset % on harmful prompts"][i] == pct(m["reset_rate_harmful"])
        assert rows["reset % on safe prompts"][i] == pct(m["reset_rate_safe"])
        for k in (2, 4):
            assert rows[f"unsafe % worst-of-{k}"][i] == pct(m["worst_of_k"][str(k)])
    # the fixture's design shows through: backtracking helps more, baseline is less helpful
    assert rows["helpfulness synthetic (mean score)"][0].startswith("0.500")
    assert rows["helpfulness synthetic (mean score)"][1].startswith("1.000")


def test_pooled_row_only_with_several_pooled_sets(tmp_path):
    one = tmp_path / "one"
    make_eval(one, ["advbench", "synthetic"], worst_of_k=(), bias_sweep=())
    metrics = json.loads((one / "eval" / "baseline-sft" / "metrics.json").read_text())
    assert metrics["pooled"] is not None  # the eval pooled its one set: the report shows no pooled row
    rows = table_rows(write_report(one).read_text())
    assert not [r for r in rows if "pooled" in r]
    assert "unsafe % advbench" in rows and not [r for r in rows if "worst-of" in r]

    several = tmp_path / "several"
    make_eval(several, ["advbench", "strongreject"], worst_of_k=(), bias_sweep=())
    rows = table_rows(write_report(several).read_text())
    assert [r for r in rows if "pooled" in r] == ["unsafe % pooled (advbench, strongreject)"]


def test_comparisons_are_worded_plainly(full_run):
    report = write_report(full_run).read_text()
    compared = json.loads((full_run / "eval" / "summary.json").read_text())["comparisons"]
    sft, dpo = compared
    assert sft["holds"] and sft["cluster_ci_low"] > 0  # the CI excludes 0
    assert (f"backtracking is less unsafe by {100 * sft['difference']:.1f} points "
            f"[95% CI {100 * sft['cluster_ci_low']:.1f}, {100 * sft['cluster_ci_high']:.1f}]") in report
    assert dpo["difference"] == 0 and dpo["ci_low"] < 0 < dpo["ci_high"]  # one model twice
    line = next(x for x in report.splitlines() if x.startswith("- **baseline-dpo vs backtrack-dpo"))
    assert "no difference beyond the 95% CI" in line and "less unsafe" not in line


def _comparison(diff, low, high, cl_low, cl_high):
    return {"baseline": "b", "backtrack": "t", "key": "advbench", "n": 100, "num_clusters": 50,
            "baseline_unsafe": 0.5, "backtrack_unsafe": 0.5 - diff, "difference": diff, "ci_low": low,
            "ci_high": high, "cluster_ci_low": cl_low, "cluster_ci_high": cl_high}


@pytest.mark.parametrize(("c", "expected"), [
    (_comparison(0.2, 0.1, 0.3, 0.12, 0.28),
     "backtracking is less unsafe by 20.0 points [95% CI 12.0, 28.0]"),
    (_comparison(-0.2, -0.3, -0.1, -0.28, -0.12),
     "backtracking is MORE unsafe by 20.0 points [95% CI 12.0, 28.0]"),
    # the cluster bootstrap excludes 0, the paired interval does not: no claim, and the quoted CI holds 0
    (_comparison(0.05, -0.01, 0.11, 0.01, 0.09), "no difference beyond the 95% CI (unsafe 50.0% vs 45.0%; "
                                                 "difference +5.0 points [95% CI -1.0, 11.0])"),
])
def test_comparison_sentence(c, expected):
    assert expected in comparison_sentence(c)


def test_parts_absent_are_left_out_with_one_line(tmp_path):
    only_training = tmp_path / "train"
    make_training(only_training)
    report = write_report(only_training).read_text()
    assert "_Evaluation: not run (no eval summary.json under" in report
    assert "_Attacks: not run (no attack summary.json under" in report
    assert "_Bias sweep: not run (no eval)._" in report and "_Worst-of-k: not run (no eval)._" in report
    assert "| unsafe %" not in report and "| model |" not in report
    assert "| runs/sft-baseline | sft | 3 | 100 | 1.5000 | 1.0 |" in report

    only_eval = tmp_path / "eval-only"
    make_eval(only_eval, ["synthetic"], worst_of_k=(), bias_sweep=())
    report = write_report(only_eval / "eval").read_text()  # an eval job's own run dir
    assert "| unsafe % synthetic |" in report
    assert "_Attacks: not run" in report and "_Training: not run" in report
    assert "_Bias sweep: not run (no model in the eval has a bias_sweep)._" in report
    assert "- Command: not recorded" in report

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_pngs_are_written_and_linked(full_run, tmp_path):
    out = tmp_path / "out"
    report = write_report(full_run, out).read_text()
    for name in ("bias_sweep.png", "worst_of_k.png", "loss_sft.png", "loss_dpo.png", "prefill_curve.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"]({name})" in report
    assert not (full_run / "report.md").exists()  # --out: nothing written into the run dir


def test_worst_of_k_curve_matches_the_metrics_at_the_configured_k(full_run):
    run = collect(full_run)
    curves = plots.worst_of_k_curves(run.eval)
    for label, by_k in curves.items():
        assert sorted(by_k) == [1, 2, 3, 4]  # every k up to the largest, from the rows
        for k, r in run.eval.metrics[label]["worst_of_k"].items():
            assert by_k[int(k)]["rate"] == r["rate"] and by_k[int(k)]["num"] == r["num"]


def test_the_pipelines_terminal_table1_shows_the_reports_rows(full_run, tmp_path):
    from bt_ray.pipeline.results import table1

    report_rows = table_rows(write_report(full_run, tmp_path / "out").read_text())
    metrics = {label: json.loads((full_run / "eval" / label / "metrics.json").read_text())
               for label in UNSAFE_P}
    lines = table1(metrics).splitlines()
    assert lines[0].split() == ["|", *" | ".join(UNSAFE_P).split()]
    text_rows = {}
    for line in lines[2:]:
        name, *cells = (c.strip() for c in line.split(" | "))
        text_rows[name] = cells
    assert text_rows == report_rows and "judge advbench" in text_rows


def test_judges_are_named_and_stand_ins_labelled(full_run):
    report = write_report(full_run).read_text()
    rows = table_rows(report)
    assert rows["judge advbench"] == ["keyword (stand-in)"] * 4
    assert rows["judge synthetic"] == ["synthetic-exact"] * 4
    assert "Judges marked (stand-in) are not the paper's judge" in report
    table2 = report.split("## Table 2")[1].split("## Plots")[0]
    assert "judged unsafe by keyword (a STAND-IN judge" in table2
    # A stand-in that says so in its own name is labelled once, not twice.
    from bt_ray.report.markdown import _judges
    named = {"judges": ["refusal-classifier (stand-in)"], "stand_in": True}
    assert _judges([named]) == ("refusal-classifier (stand-in)", True)


def test_table2_and_attack_differences(full_run):
    report = write_report(full_run).read_text()
    run = collect(full_run)
    assert run.attacks.order == ["baseline-dpo", "backtrack-dpo"]
    assert attack_report.table2(run.attacks.results, run.attacks.order) in report
    paired = json.loads((full_run / "attacks" / "summary.json").read_text())["paired"]
    d = paired["baseline-dpo - backtrack-dpo"]["gcg"]["all"]
    assert d["ci_low"] > 0 and d["cluster_ci_low"] > 0
    assert (f"**gcg, baseline-dpo vs backtrack-dpo** (n=20): backtrack-dpo has a lower ASR by "
            f"{100 * d['difference']:.1f} points") in report


def test_provenance_recorded_and_fallback(full_run, tmp_path):
    report = write_report(full_run).read_text()
    assert "- Command: `python jobs/pipeline.py --preset demo`" in report
    assert "- Git sha: `deadbeef`" in report and "- Date: `2025-01-02T03:04:05`" in report
    train = tmp_path / "train"
    make_training(train)
    assert "- Git sha: `abc123 (recorded by the training runs)`" in write_report(train).read_text()


def test_cli_report(full_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["report", str(full_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    assert (out / "report.md").read_text() == write_report(full_run, tmp_path / "api").read_text()
    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err
