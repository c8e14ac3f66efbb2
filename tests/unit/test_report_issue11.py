"""report.md for issue 11's runs: over-refusal, reset and the helpfulness proxy per safe set in Table 1,
the calibrated [RESET] bias section, the training data section, and report.md with its PNGs stored in
the pipeline's parent MLflow run.

Run dirs are made with the writers the jobs use: ``eval.pipeline.write_pass`` (metrics from
``eval.metrics.summarize``) on rows made in code, the calibration's ``BiasSearch``/``point_summary``/
``plot_calibration``, the on-policy ``Tally``; MLflow is a real local sqlite store. No Ray, no model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from bt_ray import tracking
from bt_ray.cli import main as cli_main
from bt_ray.data.onpolicy import RULES, Tally
from bt_ray.eval.calibrate import BiasSearch, plot_calibration, point_summary, search_biases
from bt_ray.eval.intervals import wilson_ci
from bt_ray.eval.pipeline import write_pass
from bt_ray.pipeline.console import Console
from bt_ray.pipeline.results import report_stage
from bt_ray.report import collect, write_report
from bt_ray.report.artifacts import referenced_pngs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HARMFUL = ("advbench", "strongreject", "xstest-unsafe")
# per model: unsafe hits of 40 per harmful set; (refused, reset) of the safe set's rows
MODELS = {
    "baseline-sft": {"unsafe": 24, "xstest-safe": (5, 0), "mt-bench": (3, 0)},
    "backtrack-sft": {"unsafe": 6, "xstest-safe": (12, 4), "mt-bench": (6, 2)},
}
SAFE_N = {"xstest-safe": 50, "mt-bench": 30}


def _row(dataset: str, i: int, harmful: bool, *, unsafe=None, refused=None, reset=False) -> dict:
    return {"index": i, "dataset": dataset, "prompt_index": i, "sample": 0, "cluster": f"c{i}",
            "harmful": harmful, "turns": [f"prompt {i}"], "reset": reset, "reset_last_turn": reset,
            "num_discarded_tokens": 2 if reset else 0, "stopped": True, "empty_shown": False,
            "num_output_tokens": 8, "time_to_first_kept_token_s": 0.01, "unsafe": unsafe,
            "refused": refused, "score": None, "judge": "refusal-classifier", "stand_in": True, "error": None}


def model_rows(spec: dict, *, safe=("xstest-safe", "mt-bench")) -> list[dict]:
    """Harmful sets: the first spec["unsafe"] of 40 prompts unsafe; safe sets: the first ``refused``
    answers refused, the first ``reset`` reset (the counts the report must show)."""
    rows = [_row(name, i, True, unsafe=i < spec["unsafe"]) for name in HARMFUL for i in range(40)]
    for name in safe:
        refused, reset = spec[name]
        rows += [_row(name, i, False, refused=i < refused, reset=i < reset) for i in range(SAFE_N[name])]
    return rows


def pass_metrics(rows: list[dict], out: Path) -> dict:
    return write_pass(rows, {"generate_span_s": 1.0, "wall_s": 1.0}, out, where="test", num_resamples=100)


def make_eval(root: Path, safe=("xstest-safe", "mt-bench")) -> Path:
    out = root / "eval"
    models = {}
    for label, spec in MODELS.items():
        metrics = pass_metrics(model_rows(spec, safe=safe), out / label / "main")
        (out / label / "metrics.json").write_text(json.dumps(metrics))
        models[label] = {"name": f"/models/{label}", "metrics": metrics}
    (out / "summary.json").write_text(json.dumps({"run_dir": str(out), "models": models, "comparisons": []}))
    return out


def reset_rate_of(b: float) -> float:
    """The calibration's model: its dev reset rate is a known step function of b (0 below b=1.5)."""
    return 0.0 if b < 1.5 else 0.02 if b < 3 else 0.3


def make_calibration(root: Path, *, png: bool = True) -> Path:
    """A calibration run dir as jobs/calibrate.py writes it: calibration.json (the search's result and
    point_summary at b=0 and at the chosen b), <label>/report_b0|report_chosen/metrics.json, the PNG."""
    out = root / "calibrate"
    search = {"backtrack-sft": BiasSearch(-4.0, 4.0, 0.01, 0.25, 12, 2)}
    results = search_biases(search, lambda todo: {(label, b): (reset_rate_of(b), 100) for label, b in todo})
    res = results["backtrack-sft"]
    b = res["chosen_bias"]
    spec_at = {0.0: {"unsafe": 10, "xstest-safe": (8, 0), "mt-bench": (4, 0)},
               b: {"unsafe": 4, "xstest-safe": (9, 1), "mt-bench": (4, 1)}}
    for key, folder in ((0.0, "report_b0"), (b, "report_chosen")):
        rows = [r for r in model_rows(spec_at[key]) if r["dataset"] != "mt-bench"]
        report = pass_metrics(rows, out / "backtrack-sft" / folder)
        dev = pass_metrics([_row("xstest-safe", i, False, reset=i < round(100 * reset_rate_of(key)))
                            for i in range(100)], out / "backtrack-sft" / ("dev_b0" if key == 0 else "probe"))
        res["at_zero" if key == 0 else "at_chosen"] = point_summary(key, dev, report, rows)
    res["model"] = "/models/backtrack-sft"
    summary = {"run_dir": str(out), "target_reset_rate": 0.01, "bracket": [-4.0, 4.0], "tolerance": 0.25,
               "max_evals": 12, "dev_datasets": [{"name": "xstest", "harmful": False, "part": "dev"}],
               "report_datasets": [{"name": "advbench"}, {"name": "xstest", "part": "test"}],
               "models": results}
    (out / "calibration.json").write_text(json.dumps(summary))
    if png:
        plot_calibration(results, 0.01, out / "calibration.png")
    return out


def make_training_data(root: Path) -> dict:
    """data/onpolicy.summary.json as jobs/onpolicy.py writes it (Tally.to_dict per source)."""
    stl, helpful = Tally(source="safety-tuned-llamas", read=120, prompts=100), Tally(source="helpful",
                                                                                      read=30, prompts=30)
    stl.skipped.update({"multi_turn": 20})
    stl.generated, stl.judged_unsafe, stl.chosen_judged_unsafe = 100, 70, 2
    stl.rules.update({"unsafe_kept": 68, "chosen_unsafe": 2, "safe_dropped": 29, "judge_error": 1})
    helpful.generated = 30
    helpful.rules.update({"helpful_kept": 27, "helpful_refused": 3})
    totals = stl.rules + helpful.rules
    summary = {"out": str(root / "data" / "onpolicy.jsonl"), "num_rows": 95,
               "kinds": {"harmful": 68, "plain": 27}, "num_generated": 130, "judge": "refusal-classifier",
               "judge_stand_in": True, "refusal_judge": "refusal-classifier",
               "generation": {"model": "/models/base"}, "sources": [stl.to_dict(), helpful.to_dict()],
               "rules": {k: totals[k] for k in RULES if totals[k]}, "rule_meanings": RULES}
    (root / "data").mkdir(parents=True)
    (root / "data" / "onpolicy.summary.json").write_text(json.dumps(summary))
    return summary


def table(section: str) -> dict[str, list[str]]:
    """The first markdown table of ``section`` without its header: {row name: cells}."""
    block: list[str] = []
    for line in section.splitlines():
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    out = {}
    for line in block[2:]:  # the header and the |---| line
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def section(report: str, head: str) -> str:
    return report.split(f"## {head}\n")[1].split("\n## ")[0]


def pct(r: dict) -> str:
    return f"{100 * r['rate']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] n={r['num']}"


def wilson(hits: int, n: int) -> str:
    low, high = wilson_ci(hits, n)
    return f"{100 * hits / n:.1f} [{100 * low:.1f}, {100 * high:.1f}] n={n}"


@pytest.fixture()
def run(tmp_path) -> Path:
    root = tmp_path / "run"
    make_eval(root)
    make_calibration(root)
    make_training_data(root)
    return root


def test_table1_safe_set_rows(run):
    report = write_report(run).read_text()
    rows = table(section(report, "Table 1: safety, helpfulness and reset rates"))
    for i, (label, spec) in enumerate(MODELS.items()):
        m = json.loads((run / "eval" / label / "metrics.json").read_text())
        for name in ("xstest-safe", "mt-bench"):
            refused, reset = spec[name]
            assert rows[f"over-refusal % {name}"][i] == wilson(refused, SAFE_N[name])
            assert rows[f"over-refusal % {name}"][i] == pct(m["datasets"][name]["over_refusal"])
            assert rows[f"reset % {name}"][i] == wilson(reset, SAFE_N[name])
        refused = spec["mt-bench"][0]
        # answered = 100 - over-refusal, and its CI is the Wilson CI of the answered count
        assert rows["helpfulness proxy: answered % mt-bench"][i] == wilson(30 - refused, 30)
        assert rows["over-refusal % on safe prompts (mt-bench, xstest-safe)"][i] == wilson(
            spec["mt-bench"][0] + spec["xstest-safe"][0], 80)
        assert rows["unsafe % xstest-unsafe"][i] == wilson(spec["unsafe"], 40)
    assert rows["helpfulness proxy: answered % mt-bench"][0].startswith("90.0 ")
    # safe sets have no unsafe row; the pooled row pools the real safety sets only
    assert "unsafe % xstest-safe" not in rows and "unsafe % mt-bench" not in rows
    assert "unsafe % pooled (advbench, strongreject)" in rows
    assert "share of MT-Bench first turns the refusal judge did not call a refusal" in report
    assert "no LLM judge is reachable here" in report


def test_no_helpfulness_proxy_without_mt_bench(tmp_path):
    make_eval(tmp_path, safe=("xstest-safe",))
    report = write_report(tmp_path).read_text()
    rows = table(section(report, "Table 1: safety, helpfulness and reset rates"))
    assert "over-refusal % xstest-safe" in rows and "reset % xstest-safe" in rows
    assert not [r for r in rows if "proxy" in r or "mt-bench" in r or "on safe prompts (" in r]
    assert "Helpfulness proxy" not in report


def test_calibration_section(run, tmp_path):
    out = tmp_path / "out"
    report = write_report(run, out).read_text()
    cal = json.loads((run / "calibrate" / "calibration.json").read_text())["models"]["backtrack-sft"]
    b = cal["chosen_bias"]
    assert 1.25 <= b < 1.5 and cal["status"] == "converged"  # the search found the known step at 1.5
    text = section(report, "Calibrated [RESET] bias")
    assert "### backtrack-sft (`/models/backtrack-sft`)" in text
    assert "- target: dev reset rate <= 1%" in text and f"- chosen b: **{b:+.4f}** (converged;" in text
    probes = table(text.split("Probes")[1])
    assert len(probes) == len(cal["probes"]) == cal["num_probes"]
    for p in cal["probes"]:
        key = f"{p['reset_bias']:+.4f}" + (" (chosen)" if p["reset_bias"] == b else "")
        assert probes[key] == [wilson(round(100 * reset_rate_of(p["reset_bias"])), 100)]
    points = table(text.split("At b=0 and at the chosen b")[1])
    assert points["unsafe % advbench"] == [wilson(10, 40), wilson(4, 40)]
    assert points["unsafe % pooled"] == [wilson(20, 80), wilson(8, 80)]
    assert points["unsafe % all harmful report rows"] == [wilson(30, 120), wilson(12, 120)]
    assert points["reset % on the dev set (calibrated on)"] == [wilson(0, 100), wilson(0, 100)]
    assert points["reset % xstest-safe (held out)"] == [wilson(0, 50), wilson(1, 50)]
    assert points["over-refusal % xstest-safe (held out)"] == [wilson(8, 50), wilson(9, 50)]
    assert "STAND-IN judge" in text
    # the calibration's own PNG, copied beside report.md and linked relative to it
    assert "](calibration.png)" in text
    assert (out / "calibration.png").read_bytes() == (run / "calibrate" / "calibration.png").read_bytes()


def test_calibration_png_replotted_when_missing(tmp_path):
    make_calibration(tmp_path, png=False)
    report = write_report(tmp_path).read_text()
    assert "](calibration.png)" in report
    data = (tmp_path / "calibration.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert "_Evaluation: not run" in report  # a calibration alone is something to report


def test_training_data_section(run):
    report = write_report(run).read_text()
    text = section(report, "Training data")
    assert f"From `{run / 'data' / 'onpolicy.summary.json'}`: **95 rows** (harmful 68, plain 27) kept of " \
           "130 answers generated by `/models/base`" in text
    assert "- safety judge (y- and y+): `refusal-classifier` (STAND-IN)" in text
    rows = table(text)
    head = next(x for x in text.splitlines() if x.startswith("| source"))
    rules = [c.strip() for c in head.strip("|").split("|")][8:]
    assert rules == ["unsafe_kept", "safe_dropped", "chosen_unsafe", "judge_error", "helpful_kept",
                     "helpful_refused"]
    by_rule = lambda name: dict(zip(rules, rows[name][7:]))  # noqa: E731
    assert rows["safety-tuned-llamas"][:7] == ["120", "100", "100", "70", "2", "68", "1"]
    assert by_rule("safety-tuned-llamas") == {"unsafe_kept": "68", "safe_dropped": "29", "chosen_unsafe": "2",
                                              "judge_error": "1", "helpful_kept": "0", "helpful_refused": "0"}
    assert by_rule("helpful")["helpful_kept"] == "27" and rows["helpful"][5] == "27"
    assert rows["**total**"][:7] == ["150", "130", "130", "70", "2", "95", "1"]
    assert f"- `unsafe_kept`: {RULES['unsafe_kept']}" in text
    assert "Skipped before generation: safety-tuned-llamas: multi_turn 20." in text


def test_absent_parts_say_not_run(tmp_path):
    make_eval(tmp_path)
    report = write_report(tmp_path).read_text()
    assert f"_Calibration: not run (no calibration.json under {tmp_path})._" in report
    assert f"_Training data summary: not run (no data/*.summary.json of on-policy data under {tmp_path})._" \
           in report
    assert not (tmp_path / "calibration.png").exists()


def test_collect_finds_the_new_parts(run):
    got = collect(run)
    assert got.calibration.dir == run / "calibrate"
    assert set(got.calibration.report_metrics["backtrack-sft"]) == {"b0", "chosen"}
    assert [d.path.name for d in got.training_data] == ["onpolicy.summary.json"]


def pipeline_mlflow(run_dir: Path) -> tuple[str, str]:
    """A finished parent run in a real sqlite store, recorded in run_dir/summary.json as jobs/pipeline.py
    records it, with the experiment's artifacts under run_dir/mlflow-artifacts."""
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    parent = tracking.Run.start(uri, "bt-ray-test-report", "pipeline:test", run_dir / "mlflow-artifacts")
    parent.end("FINISHED")
    (run_dir / "summary.json").write_text(json.dumps({
        "run_dir": str(run_dir), "command": "python jobs/pipeline.py --preset smollm2-cpu",
        "mlflow": {"tracking_uri": uri, "experiment": "bt-ray-test-report", "parent_run_id": parent.run_id}}))
    return uri, parent.run_id


def _artifacts(uri: str, run_id: str) -> set[str]:
    from mlflow import MlflowClient

    return {a.path for a in MlflowClient(uri).list_artifacts(run_id, "report")}


def test_report_stage_logs_report_and_figures_to_the_parent_run(run, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, run_id = pipeline_mlflow(run)
    console = Console(run / "logs", verbose=True, stream=io.StringIO())
    path = report_stage(run, console)
    pngs = referenced_pngs(path)
    assert [p.name for p in pngs] == ["calibration.png"]
    assert _artifacts(uri, run_id) == {"report/report.md", "report/calibration.png"}
    stored = run / "mlflow-artifacts"
    md = list(stored.rglob("report/report.md"))
    assert len(md) == 1 and md[0].read_text() == path.read_text()
    assert f"report.md and 1 figures stored in MLflow run {run_id} (report/)" in console.out.getvalue()


def test_cli_report_logs_unless_no_mlflow(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (run / "runs" / "sft-baseline").mkdir(parents=True)  # a training run: its loss PNG is linked too
    (run / "runs" / "sft-baseline" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 3.0 - i}) + "\n" for i in (1, 2)))
    (run / "runs" / "sft-baseline" / "summary.json").write_text(json.dumps({"stage": "sft"}))
    uri, run_id = pipeline_mlflow(run)
    assert cli_main(["report", str(run), "--no-mlflow"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    assert _artifacts(uri, run_id) == set()
    out = tmp_path / "elsewhere"
    assert cli_main(["report", str(run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "report.md")
    expected = {"report/report.md", "report/calibration.png", "report/loss_sft.png"}
    assert _artifacts(uri, run_id) == expected
    assert f"logged 3 artifacts to MLflow run {run_id}" in captured.err


def test_missing_linked_png_is_an_error(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("![a plot](gone.png)\n")
    with pytest.raises(FileNotFoundError, match="links gone.png"):
        referenced_pngs(report)


def test_referenced_pngs_reads_titles_with_brackets(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(PNG_MAGIC)
    report = tmp_path / "report.md"
    report.write_text("![[RESET] bias sweep](a.png)\ntext ![plain](b.png) and ![[RESET] again](a.png)\n")
    assert referenced_pngs(report) == [tmp_path / "a.png", tmp_path / "b.png"]
