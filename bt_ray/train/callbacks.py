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
    """Reports each HF checkpoint to Ray (all ranks call report; the node's local rank 0 attaches it).

    Used instead of Ray's ``ray.train.huggingface.transformers.RayTrainReportCallback``, which every
    rank runs the same way: it copies the latest HF checkpoint into a temp dir and reports it, with
    the metrics of the whole log history, under a timestamped name with the HF files nested in
    ``checkpoint/``. Here instead:

    * one upload per node: HF writes to a node-local staging dir shared by the node's workers
      (``loop.py``), and only local rank 0 attaches it, after a barrier that waits for every rank's
      DeepSpeed shards; the other ranks report metrics only. No temp copy is made;
    * named checkpoint dirs: ``checkpoint-<step:06d>`` with the HF files at the top, which the driver
      sorts, exports and resumes from (``driver.checkpoints``, ``driver.export_model``, ``loop.py``
      reads ``trainer_state.json`` at the top);
    * metadata: rank 0 writes ``bt_ray.json`` into the checkpoint before it is uploaded (stage, steps,
      resolved config, git sha, the ``[RESET]`` trained and, when tracked, the MLflow run), so every
      checkpoint and the exported model say what they are and which run made them;
    * the reported metrics are step, epoch and the last logged loss, the score that ``run.keep_by:
      loss`` ranks checkpoints by; and the last step always saves, so the final model is a checkpoint.
    """

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
            # with the [RESET] token (text and id) of the tokenizer trained, so loading reads it back
            metadata = checkpoint_metadata(self._loop_config, state)
            write_metadata(ckpt_dir, metadata, kwargs["processing_class"])
        dist.barrier()  # every rank's shards are on disk before the node's files are uploaded
        metrics = {"step": state.global_step, "epoch": state.epoch or 0.0,
                   "loss": self._last_logs.get("loss", float("nan"))}
        checkpoint = Checkpoint.from_directory(str(ckpt_dir)) if self._local_rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{state.global_step:06d}")


def checkpoint_metadata(loop_config: dict, state) -> dict:
    """What a checkpoint's ``bt_ray.json`` records besides its ``[RESET]``: stage, steps, the resolved
    config, git sha and, when the stage is tracked, its MLflow run (so a run that uses the model,
    e.g. an eval, names the run that trained it: ``tracking.lineage_tags``)."""
    metadata = {
        "stage": loop_config["stage"],
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "config": loop_config["cfg"],
        "git_sha": loop_config["git_sha"],
    }
    if loop_config["mlflow"] is not None:
        metadata["mlflow_run_id"] = loop_config["mlflow"]["run_id"]
        metadata["mlflow_tracking_uri"] = loop_config["mlflow"]["tracking_uri"]
    return metadata


class MetricsCallback(TrainerCallback):
    """Rank 0: per-step metrics (with tokens/s) to ``metrics.jsonl`` and MLflow, each step once.

    Not HF's ``MLflowCallback``: that one logs through the fluent API into a run it finds by
    ``MLFLOW_RUN_ID`` and knows nothing of tokens/s, peak RSS or ``metrics.jsonl``. Here the driver's
    run id comes in the loop config and ``tracking.log_metrics`` reuses one client per process.

    A worker group that died (a killed worker, a lost node) logged steps past the checkpoint the next
    group resumes from; those steps are trained again. So that every step is recorded once:

    * ``metrics.jsonl`` is rolled back when training begins: records past the resumed global step
      (and a line torn by the kill) are dropped, and the redone steps are appended, so the file
      holds the history of the checkpointed run;
    * MLflow cannot delete a metric value, so a (key, step) its history already holds is not logged
      again: the first value stays. The redone step starts from the same checkpoint, data order and
      RNG state, so it recomputes that value (up to floating-point reduction order).
    """

    def __init__(self, loop_config: dict, rank: int):
        self._rank = rank
        self._mlflow = loop_config["mlflow"]
        self._path = Path(loop_config["run_dir"]) / METRICS_FILE
        self._last_time = None
        self._last_tokens = 0
        self._mlflow_last_step: dict[str, int] = {}  # per key: the last step MLflow held at the start

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        if self._rank == 0:
            rollback_metrics(self._path, state.global_step)

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

            new = {k: v for k, v in metrics.items() if state.global_step > self._mlflow_step(k)}
            log_metrics(self._mlflow["tracking_uri"], self._mlflow["run_id"], new, state.global_step)

    def _mlflow_step(self, key: str) -> int:
        """The last step of ``key`` that the MLflow run held when this worker group started (-1: none),
        asked once per key: later steps are this group's own."""
        if key not in self._mlflow_last_step:
            from bt_ray.tracking import client

            history = client(self._mlflow["tracking_uri"]).get_metric_history(self._mlflow["run_id"], key)
            self._mlflow_last_step[key] = max((m.step for m in history), default=-1)
        return self._mlflow_last_step[key]


def rollback_metrics(path: Path, global_step: int) -> None:
    """Keep only the complete records of ``metrics.jsonl`` at steps up to ``global_step`` (atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # torn by a kill mid-write
            continue
        if record.get("step", 0) <= global_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
