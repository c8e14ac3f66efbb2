"""HF Trainer callbacks run inside Ray Train workers: checkpoint reporting and metrics."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

from transformers import TrainerCallback

from bt_ray.models import write_metadata

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"


class RayReportCallback(TrainerCallback):
    """Reports each HF checkpoint to Ray (all ranks call report; the node's local rank 0 attaches it)."""

    def __init__(self, loop_config: dict, rank: int, local_rank: int):
        self._loop_config = loop_config
        self._rank = rank
        self._local_rank = local_rank
        self._last_logs: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._last_logs = {k: v for k, v in logs.items() if isinstance(v, (int, float))}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:  # the last step always checkpoints
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        import ray.train
        import torch.distributed as dist
        from ray.train import Checkpoint

        ckpt_dir = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if self._rank == 0:
            metadata = {
                "stage": self._loop_config["stage"],
                "global_step": state.global_step,
                "max_steps": state.max_steps,
                "config": self._loop_config["cfg"],
                "git_sha": self._loop_config["git_sha"],
            }
            # with the [RESET] token (text and id) of the tokenizer trained, so loading reads it back
            write_metadata(ckpt_dir, metadata, kwargs["processing_class"])
        dist.barrier()  # every rank's shards are on disk before the node's files are uploaded
        metrics = {"step": state.global_step, "epoch": state.epoch or 0.0,
                   "loss": self._last_logs.get("loss", float("nan"))}
        checkpoint = Checkpoint.from_directory(str(ckpt_dir)) if self._local_rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{state.global_step:06d}")


class MetricsCallback(TrainerCallback):
    """Rank 0: per-step metrics (with tokens/s) to ``metrics.jsonl`` and MLflow."""

    def __init__(self, loop_config: dict, rank: int):
        self._rank = rank
        self._mlflow = loop_config["mlflow"]
        self._path = Path(loop_config["run_dir"]) / METRICS_FILE
        self._last_time = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._rank != 0 or not logs:
            return
        now = time.perf_counter()
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        if "loss" in metrics and self._last_time is not None and now > self._last_time:
            # num_input_tokens_seen counts every rank's tokens (padding included).
            num_tokens = state.num_input_tokens_seen - self._last_tokens
            metrics["tokens_per_second"] = num_tokens / (now - self._last_time)
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        with self._path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, "pid": os.getpid(), **metrics}) + "\n")
        if self._mlflow is not None:
            from bt_ray.tracking import log_metrics

            log_metrics(self._mlflow["tracking_uri"], self._mlflow["run_id"], metrics, state.global_step)
