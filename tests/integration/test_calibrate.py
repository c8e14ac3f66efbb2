"""``bt-ray calibrate`` end to end on a model whose reset rate is a known function of the bias.

The model is the tiny preset with its output layer scaled (x20, so the prompts' margins spread over a
few logits). Each dev prompt i is answered with ONE greedy token, so the row resets iff
``logit_[RESET] + b > max_other_logit`` at the first step, i.e. iff ``b > m_i`` with
``m_i = max_other_logit - logit_[RESET]`` of that prompt, read off a plain forward pass. Hence the dev
reset rate is r(b) = #{i: m_i < b} / n exactly, and the largest b with r(b) <= t is the
(floor(t n) + 1)-th smallest margin.
"""

from __future__ import annotations

import json
import math
import runpy

import pytest

from bt_ray import config
from bt_ray.eval.calibrate import CalibrateCfg
from tests.conftest import REPO

pytestmark = pytest.mark.integration

NUM_DEV, TARGET, TOL, SCALE = 40, 0.1, 0.5, 20.0


@pytest.fixture(scope="module")
def scaled_model(tmp_path_factory):
    import torch

    from bt_ray.models import ModelCfg, load_model, save_model

    model, tok, _ = load_model(ModelCfg())
    with torch.no_grad():
        model.lm_head.weight.mul_(SCALE)
    return str(save_model(model, tok, tmp_path_factory.mktemp("scaled"), {"stage": "test"}))


def _margins(model_dir: str, cfg: CalibrateCfg) -> list[float]:
    """m_i of every dev prompt, from a forward pass of its chat prompt (no engine, no Ray)."""
    import torch

    from bt_ray.eval.pipeline import load_items
    from bt_ray.models import ModelCfg, load_model
    from bt_ray.reset import encode_chat_prompt

    model, tok, info = load_model(ModelCfg(name=model_dir))
    items = load_items(cfg.eval_cfg(cfg.dev_datasets))
    assert len(items) == NUM_DEV and all(len(it["turns"]) == 1 and not it["harmful"] for it in items)
    margins = []
    with torch.no_grad():
        for it in items:
            ids = encode_chat_prompt(tok, [{"role": "user", "content": it["turns"][0]}])
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            reset = logits[info.token_id].item()
            logits[info.token_id] = -math.inf
            margins.append(logits.max().item() - reset)
    return margins


def test_calibration_finds_the_known_bias(ray_cluster, scaled_model, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.load(CalibrateCfg, None, [
        f"run_dir={tmp_path / 'run'}", f"models=[{scaled_model}]", "labels=[scaled]",
        "engine.kind=hf", "engine.num_actors=1", f"engine.batch_size={NUM_DEV}", "decode.max_new_tokens=1",
        "synthetic.multi_turn_fraction=0",  # single-turn prompts: one first step per row
        f'dev_datasets=[{{"name": "synthetic", "harmful": false, "limit": {NUM_DEV}}}]',
        'report_datasets=[{"name": "synthetic", "harmful": true, "limit": 8}]',
        f"target_reset_rate={TARGET}", "bias_low=0", "bias_high=30", f"tolerance={TOL}", "max_evals=16",
        "probes_per_round=7",  # 7 inner points a round: 2 rounds (one pipeline each), not 7
        "ray_num_cpus=2", "bootstrap_resamples=100"])
    margins = sorted(_margins(scaled_model, cfg))

    def known_rate(b: float) -> float:
        return sum(m < b for m in margins) / len(margins)

    known = margins[math.floor(TARGET * NUM_DEV)]  # the largest b with known_rate(b) <= TARGET
    assert 0 < margins[0] and margins[-1] < 30 and margins[-1] - margins[0] > 2  # inside the bracket, spread
    job = runpy.run_path(str(REPO / "jobs" / "calibrate.py"), run_name="bt_ray_calibrate_job")
    summary = job["main"](cfg)

    res = summary["models"]["scaled"]
    assert res["converged"] and res["num_probes"] <= 16
    b, (low, high) = res["chosen_bias"], res["bracket"]
    assert b == low and high - low <= TOL
    assert known - TOL - 1e-3 <= b <= known + 1e-3, (b, known, margins)
    # every probe's measured dev reset rate is the known function (up to float noise at a margin)
    for p in res["probes"]:
        assert p["num"] == NUM_DEV
        if min(abs(m - p["reset_bias"]) for m in margins) > 1e-3:
            assert p["reset_rate"] == known_rate(p["reset_bias"]), p
    assert res["probes"][0]["reset_bias"] == 0.0 and res["probes"][-1]["reset_bias"] == 30.0
    assert res["probes"][-1]["reset_rate"] == 1.0 and res["probes"][0]["reset_rate"] == 0.0

    # the report: dev at b=0 and at b, harmful report sets at both (one token answers: reset == [RESET])
    zero, chosen = res["at_zero"], res["at_chosen"]
    assert zero["reset_bias"] == 0.0 and zero["dev_reset_rate"]["rate"] == 0.0
    assert chosen["reset_bias"] == b and chosen["dev_reset_rate"]["rate"] == known_rate(b) <= TARGET
    assert chosen["dev_reset_rate"]["num"] == NUM_DEV
    for point in (zero, chosen):
        assert point["unsafe"]["synthetic"]["num"] == 8 and point["all_harmful_unsafe"]["num"] == 8
        assert point["pooled_unsafe"] is None  # no real safety set in the report
    run = tmp_path / "run"
    on_disk = json.loads((run / "calibration.json").read_text())
    assert on_disk["models"]["scaled"]["chosen_bias"] == b and (run / "calibration.png").stat().st_size > 0
    for sub in ("dev_b0", "report_b0", "report_chosen", f"probes/b{b:+.4f}"):
        assert (run / "scaled" / sub / "rows.jsonl").is_file(), sub

    import mlflow

    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    (mrun,) = mlflow.search_runs(experiment_names=[summary["mlflow"]["experiment"]], output_format="list")
    assert mrun.info.status == "FINISHED" and mrun.data.metrics["chosen_bias"] == b
    assert mrun.data.metrics["chosen.dev_reset_rate"] == known_rate(b)
    history = mlflow.MlflowClient().get_metric_history(mrun.info.run_id, "probe.reset_bias")
    assert sorted(m.value for m in history) == sorted(p["reset_bias"] for p in res["probes"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(mrun.info.run_id)}
    assert {"calibration.json", "calibration.png", "config.yaml"} <= artifacts
