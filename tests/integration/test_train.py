"""SFT and DPO as Ray Train jobs on 2 CPU workers with DeepSpeed: learning, checkpoints, MLflow, equivalence.

Every TorchTrainer costs ~30 s to start here, so the checks share few runs:

* ``sft_zero2`` (module fixture): backtracking SFT, ZeRO-2, 2 workers; also the reference trajectory
  for the 1-worker ZeRO-3 run and for the killed-worker run, and the SFT model DPO starts from.
* DPO ZeRO-3 with precomputed reference log-probs from it; DPO ZeRO-2 with a reference model is slow-tier.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from bt_ray import config
from bt_ray.train.config import DPOJobCfg, SFTJobCfg
from bt_ray.train.loop import staging_dir
from tests.conftest import REPO

pytestmark = pytest.mark.integration

SFT_YAML = REPO / "jobs/configs/sft_tiny_demo.yaml"
DPO_YAML = REPO / "jobs/configs/dpo_tiny_demo.yaml"
SFT_STEPS = 6
# Small and fast: 1 layer, short rows, 8 sequences per step (2 per forward x 2 accumulation x 2 workers).
SFT_FAST = [
    "model.tiny.num_layers=1", "data.synthetic.num_train_pairs=64", "data.max_length=256",
    "optim.global_batch_size=8", "optim.micro_batch_size=2", f"optim.max_steps={SFT_STEPS}",
    "optim.learning_rate=3e-3", "optim.warmup_ratio=0", "run.save_steps=2", "run.num_to_keep=2",
    "mlflow.experiment=test",
]
DPO_FAST = [
    "data.synthetic.num_train_pairs=64", "data.max_length=256", "optim.global_batch_size=8",
    "optim.micro_batch_size=2", "optim.max_steps=4", "optim.learning_rate=2e-3", "optim.warmup_ratio=0",
    "run.save_steps=2", "mlflow.experiment=test",
]


def job(name: str):
    spec = importlib.util.spec_from_file_location(f"bt_ray_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses(checkpoint: Path) -> list[tuple[int, float]]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def assert_all_parameters_changed(before, model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    after = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    unchanged = [n for n, p in before.named_parameters() if torch.equal(p.detach(), after[n].detach())]
    assert not unchanged, f"parameters not trained: {unchanged}"


def assert_reloads_and_generates(model_dir: Path, stage: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reset_ids = tokenizer.encode("[RESET]", add_special_tokens=False)
    assert len(reset_ids) == 1 and "[RESET]" in tokenizer.all_special_tokens
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    meta = json.loads((model_dir / "bt_ray.json").read_text())
    assert meta["stage"] == stage and meta["git_sha"] and meta["config"]["run"]["name"]
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("global_step*")), "optimizer state leaked into the exported model"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "how do i bake bread ?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def initial_tiny_model(cfg):
    from bt_ray.models import load_model

    return load_model(cfg.model)[0]


@pytest.fixture(scope="module")
def sft_zero2(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = config.load(SFTJobCfg, SFT_YAML, [*SFT_FAST, f"run.root={root}", "run.name=sft-z2"])
    summary = job("sft").main(cfg)
    return cfg, Path(summary["run_dir"]), summary


def test_sft_zero2_learns_checkpoints_and_tracks(sft_zero2, capsys):
    cfg, run_dir, summary = sft_zero2
    assert summary["global_step"] == SFT_STEPS
    model_dir = Path(summary["model_dir"])
    trajectory = losses(Path(summary["checkpoint"]))
    assert [s for s, _ in trajectory] == list(range(1, SFT_STEPS + 1))
    assert trajectory[-1][1] < trajectory[0][1] - 0.5, trajectory
    assert_all_parameters_changed(initial_tiny_model(cfg), model_dir)
    assert_reloads_and_generates(model_dir, "sft")
    # Ray keeps run.num_to_keep checkpoints, each a loadable HF dir.
    kept = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert kept == ["checkpoint-000004", "checkpoint-000006"]

    # MLflow: one run for the stage with params, per-step metrics, tags and the config artifact.
    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id],
                              "tags.stage = 'sft' and attributes.run_name = 'sft-z2'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["optim.global_batch_size"] == "8"
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert run.data.tags["recipe"] == "backtrack-sft" and run.data.tags["git_sha"]
    assert run.data.tags["final_model"] == str(model_dir)
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, SFT_STEPS + 1)), key
    assert math.isclose(client.get_metric_history(run.info.run_id, "loss")[-1].value, trajectory[-1][1],
                        rel_tol=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(run_dir.parent)

    # Running the finished job again trains nothing and says so.
    capsys.readouterr()
    again = job("sft").main(cfg)
    assert "nothing to do" in capsys.readouterr().out
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]


def test_one_worker_zero3_matches_two_workers_zero2(sft_zero2, tmp_path):
    """Same global batch on 1 worker (accumulation 4, ZeRO-3) and 2 workers (accumulation 2, ZeRO-2)."""
    cfg2, _, summary2 = sft_zero2
    cfg1 = config.load(SFTJobCfg, SFT_YAML, [*SFT_FAST, f"run.root={tmp_path}", "run.name=sft-1w",
                                             "scaling.num_workers=1", "deepspeed.zero_stage=3",
                                             "mlflow.enabled=false"])
    summary1 = job("sft").main(cfg1)
    one, two = losses(Path(summary1["checkpoint"])), losses(Path(summary2["checkpoint"]))
    assert [s for s, _ in one] == [s for s, _ in two]
    for (step, a), (_, b) in zip(one, two):
        assert math.isclose(a, b, rel_tol=1e-4), f"step {step}: 1 worker {a} vs 2 workers {b}"
    assert_reloads_and_generates(Path(summary1["model_dir"]), "sft")


def test_dpo_zero3_precomputed_reference_learns(sft_zero2, tmp_path):
    _, sft_dir, sft_summary = sft_zero2
    cfg = config.load(DPOJobCfg, DPO_YAML, [*DPO_FAST, f"model.name={sft_summary['model_dir']}",
                                            f"run.root={sft_dir.parent}", "run.name=dpo-z3",
                                            "deepspeed.zero_stage=3", "dpo.precompute_ref_log_probs=true"])
    summary = job("dpo").main(cfg)
    trajectory = losses(Path(summary["checkpoint"]))
    assert [s for s, _ in trajectory] == [1, 2, 3, 4]
    assert math.isclose(trajectory[0][1], math.log(2), rel_tol=1e-3)  # policy == reference at step 1
    assert trajectory[-1][1] < trajectory[0][1] - 0.05, trajectory
    from transformers import AutoModelForCausalLM

    assert_all_parameters_changed(AutoModelForCausalLM.from_pretrained(sft_summary["model_dir"]),
                                  Path(summary["model_dir"]))
    assert_reloads_and_generates(Path(summary["model_dir"]), "dpo")

    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["stage"] == "dpo" and run.info.status == "FINISHED"
    margins = client.get_metric_history(run.info.run_id, "rewards/margins")
    accuracies = client.get_metric_history(run.info.run_id, "rewards/accuracies")
    assert len(margins) == 4 and len(accuracies) == 4
    assert margins[-1].value > 0


@pytest.mark.slow
def test_dpo_zero2_reference_model_learns(sft_zero2, tmp_path):
    _, _, sft_summary = sft_zero2
    cfg = config.load(DPOJobCfg, DPO_YAML, [*DPO_FAST, f"model.name={sft_summary['model_dir']}",
                                            f"run.root={tmp_path}", "run.name=dpo-z2"])
    summary = job("dpo").main(cfg)
    trajectory = losses(Path(summary["checkpoint"]))
    assert trajectory[-1][1] < trajectory[0][1] - 0.05, trajectory
    assert_reloads_and_generates(Path(summary["model_dir"]), "dpo")


def test_use_gpu_without_gpus_fails_before_any_worker(ray_cluster, tmp_path):
    cfg = config.load(SFTJobCfg, SFT_YAML, [*SFT_FAST, f"run.root={tmp_path}", "run.name=gpu",
                                            "scaling.use_gpu=true", "mlflow.enabled=false",
                                            "data.synthetic.num_train_pairs=16"])
    with pytest.raises(RuntimeError, match=r"scaling.use_gpu=true needs 2 GPU\(s\)"):
        job("sft").main(cfg)
    # No worker ever started: a worker group's first act is to make its checkpoint staging dir.
    assert not staging_dir(tmp_path / "gpu").exists()
    assert not (tmp_path / "gpu" / "metrics.jsonl").exists()


def _committed_checkpoint(run_dir: Path) -> str | None:
    """The latest checkpoint Ray's controller has committed (its snapshot file), or None."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None
    return latest["checkpoint_dir_name"] if latest else None


def _train_worker_pids(since: float) -> list[int]:
    """Pids of the Ray Train workers started after ``since`` in this session's Ray cluster.

    The ``ray_cluster`` fixture starts Ray under this process, so its workers are this process's
    descendants (never another session's on the same machine); Ray titles an actor's process
    ``ray::<class>[.<method>]``.
    """
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = proc.cmdline()[:1]
            if title and title[0].startswith("ray::RayTrainWorker") and proc.create_time() >= since:
                pids.append(proc.pid)
        except psutil.Error:  # exited while we looked
            continue
    return pids


def _rank0_pid(run_dir: Path) -> int | None:
    """Rank 0's pid, from the last line it logged to ``metrics.jsonl`` (None before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["pid"] if lines else None
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None


def test_killed_worker_resumes_from_checkpoint_without_losing_or_repeating_steps(sft_zero2, tmp_path):
    """SIGKILL a worker other than rank 0 after a committed checkpoint: the group restarts from it.

    The finished run has the same steps and losses as the uninterrupted ``sft_zero2`` run (same config
    but for ``run.save_steps``, which does not change the trajectory), so the data order and optimizer
    state continued exactly. A checkpoint every step paces training to the controller (each report
    waits for the previous one to be taken), which leaves time to kill a worker mid-run.
    """
    import os
    import signal
    import threading
    import time

    _, _, reference = sft_zero2
    cfg = config.load(SFTJobCfg, SFT_YAML, [*SFT_FAST, f"run.root={tmp_path}", "run.name=sft-kill",
                                            "run.max_failures=1", "run.save_steps=1",
                                            "mlflow.experiment=test-kill"])
    run_dir = tmp_path / "sft-kill"
    killed: dict = {}
    started = time.time()

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline:
            # Ray's controller commits a reported checkpoint when it next polls the workers (every
            # 2 s): a worker dying before that loses the report, and the group restarts from the
            # checkpoint before it. Kill only once the controller's snapshot names a checkpoint.
            # Not rank 0 (the pid in metrics.jsonl): it writes metrics.jsonl, and a kill mid-line
            # would leave a broken record.
            committed, rank0 = _committed_checkpoint(run_dir), _rank0_pid(run_dir)
            others = [pid for pid in _train_worker_pids(started) if pid != rank0]
            if committed and rank0 is not None and others:
                killed["after"], killed["pid"] = committed, others[0]
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = job("sft").main(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed"

    # The worker group was replaced: rank 0 logged from two processes, the second starting right
    # after a checkpoint.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    pids = list(dict.fromkeys(r["pid"] for r in records))
    assert len(pids) == 2, pids
    resumed = [r["step"] for r in records if "loss" in r and r["pid"] == pids[1]]
    committed_step = int(killed["after"].removeprefix("checkpoint-"))
    assert committed_step <= resumed[0] - 1 < SFT_STEPS, (killed, steps)
    assert resumed == list(range(resumed[0], SFT_STEPS + 1)), steps

    # The committed history has every step exactly once, same count and losses as the uninterrupted run.
    assert summary["global_step"] == reference["global_step"] == SFT_STEPS
    got, want = losses(Path(summary["checkpoint"])), losses(Path(reference["checkpoint"]))
    assert [s for s, _ in got] == list(range(1, SFT_STEPS + 1))
    for (step, a), (_, b) in zip(got, want):
        assert math.isclose(a, b, rel_tol=1e-4), f"step {step}: resumed {a} vs uninterrupted {b}"

    # One MLflow run across the restart.
    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("test-kill")
    assert len(client.search_runs([experiment.experiment_id])) == 1
