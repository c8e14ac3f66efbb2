"""The per-worker training loop: TRL SFT or DPO under DeepSpeed, inside a Ray Train worker.

``bt_ray.train.job.run_stage`` builds the ``TorchTrainer``; each worker runs
``train_loop_per_worker(loop_config)`` with the dict from ``make_loop_config``.

What every worker does:

1. joins DeepSpeed's comm on Ray's process group (gloo on CPU, nccl on GPU), before any model is
   built: a model created after a ZeRO-3 config exists needs it (DPO's reference model);
2. reads the rows from the object store (same list, same order on every worker; the HF sampler,
   seeded by ``optim.seed``, shards it, so the order is the same for any world size);
3. resumes from Ray's latest checkpoint when there is one (model, optimizer and scheduler state,
   RNG, global step; the sampler skips the batches already trained on);
4. trains; at every ``run.save_steps`` and at the last step the HF checkpoint (an HF model dir
   plus DeepSpeed state) goes to ``ray.train.report``; rank 0 logs metrics to MLflow and to
   ``<run dir>/metrics.jsonl``.

Checkpoints are written to a node-local staging dir shared by the node's workers (every rank writes
its ZeRO shards there); the node's local rank 0 reports it, so Ray uploads each node's files once
and merges them into one checkpoint in the run dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bt_ray import config as config_lib
from bt_ray.train.batch import plan_batch
from bt_ray.train.config import DPOJobCfg, SFTJobCfg
from bt_ray.train.deepspeed import deepspeed_config, resolve_precision


def make_loop_config(stage: str, cfg: SFTJobCfg | DPOJobCfg, rows_ref: Any, run_dir: Path,
                     mlflow: dict | None, git_sha: str) -> dict:
    """The dict each worker receives (plain data: it is pickled to every worker).

    Args:
        stage: "sft" or "dpo".
        cfg: the resolved job config.
        rows_ref: ``ray.put(rows)`` of the training rows.
        run_dir: the run dir (``<run.root>/<run.name>``).
        mlflow: ``{"tracking_uri": ..., "run_id": ...}`` or None.
        git_sha: the driver's git sha, stored in every checkpoint.
    """
    cfg_dict = config_lib.to_dict(cfg)
    # Ray Train workers do not run in the driver's working directory: a relative local model path
    # (the SFT checkpoint DPO starts from) is passed to them absolute. The config the job saved
    # (config.yaml, MLflow, checkpoints) keeps the user's value.
    if Path(cfg.model.name).exists() and not Path(cfg.model.name).is_absolute():
        cfg_dict["model"]["name"] = str(Path(cfg.model.name).resolve())
    return {
        "stage": stage,
        "cfg": cfg_dict,
        "rows_ref": rows_ref,
        "run_dir": str(run_dir),
        "mlflow": mlflow,
        "git_sha": git_sha,
    }


def train_loop_per_worker(loop_config: dict) -> None:
    """Train one stage on this worker (see the module docstring)."""
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    stage = loop_config["stage"]
    cls = SFTJobCfg if stage == "sft" else DPOJobCfg
    cfg = config_lib.build(cls, loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, local_rank, world_size = ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu
    if cfg.scaling.torch_threads is not None:
        torch.set_num_threads(cfg.scaling.torch_threads)
    # Ray has set up torch.distributed; DeepSpeed's comm must wrap it before any model exists.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")

    run_dir = Path(loop_config["run_dir"])
    hf_dir = staging_dir(run_dir) / "hf"
    if local_rank == 0:  # stale checkpoints of an earlier attempt must not be re-reported
        shutil.rmtree(hf_dir, ignore_errors=True)
        hf_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    plan = plan_batch(cfg.optim.global_batch_size, world_size, cfg.optim.micro_batch_size)
    precision = resolve_precision(cfg.deepspeed, use_gpu)
    ds_config = deepspeed_config(cfg.deepspeed, plan, use_gpu=use_gpu, max_grad_norm=cfg.optim.max_grad_norm)
    common_args = dict(
        output_dir=str(hf_dir),
        per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=cfg.optim.learning_rate,
        lr_scheduler_type=cfg.optim.lr_scheduler_type,
        warmup_steps=cfg.optim.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.max_grad_norm,
        num_train_epochs=cfg.optim.num_epochs,
        max_steps=cfg.optim.max_steps,
        seed=cfg.optim.seed,
        data_seed=cfg.optim.seed,
        logging_steps=cfg.run.logging_steps,
        save_strategy="steps",
        save_steps=cfg.run.save_steps,
        save_total_limit=1,  # the staging copy only; Ray keeps run.num_to_keep in the run dir
        report_to="none",
        use_cpu=not use_gpu,
        bf16=precision == "bf16",
        gradient_checkpointing=False,
        ddp_find_unused_parameters=False,
        deepspeed=ds_config,
        dataloader_num_workers=0,
        include_num_input_tokens_seen=True,
        disable_tqdm=True,
        remove_unused_columns=True,
    )

    rows = ray.get(loop_config["rows_ref"])
    model, tokenizer, _ = _load(cfg)
    from bt_ray.train.callbacks import MetricsCallback, RayReportCallback

    callbacks = [RayReportCallback(loop_config, rank, local_rank), MetricsCallback(loop_config, rank)]

    checkpoint = ray.train.get_checkpoint()
    if stage == "sft":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from bt_ray.data.recipes import sft_features

        dataset = Dataset.from_list([sft_features(r) for r in rows])
        args = SFTConfig(**common_args, completion_only_loss=True, max_length=cfg.sft.max_length,
                         packing=False, dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=callbacks)
    else:
        from trl import DPOConfig

        from bt_ray.train.dpo import TokenizedDPOTrainer

        ref_model = None
        if not cfg.dpo.precompute_ref_log_probs:
            ref_model, _, _ = _load(cfg)
        dataset = _dpo_dataset(rows, run_dir / "data", rank)
        args = DPOConfig(**common_args, beta=cfg.dpo.beta, loss_type=list(cfg.dpo.loss_type),
                         precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs, max_length=None,
                         dataset_num_proc=None)
        trainer = TokenizedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=callbacks)

    resume_from = None
    if checkpoint is not None:
        resume_from = checkpoint.to_directory() if not _is_local(checkpoint) else checkpoint.path
        state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        if rank == 0:
            print(f"[bt-ray] resuming {stage} from {checkpoint.path} at global step {state['global_step']}")
    trainer.train(resume_from_checkpoint=resume_from)
    dist.barrier()  # every checkpoint is uploaded (reports are synchronous): drop the staging copies
    if local_rank == 0:
        shutil.rmtree(hf_dir, ignore_errors=True)


def staging_dir(run_dir: Path) -> Path:
    """Where a node's workers stage checkpoints of ``run_dir``: node-local, shared by the node's workers,
    distinct per run dir. Its ``hf`` dir is made when a worker group starts and removed when training ends."""
    run_key = hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / "bt-ray-train" / f"{run_dir.name}-{run_key}"


def _is_local(checkpoint) -> bool:
    import pyarrow.fs

    return isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem)


def _load(cfg):
    """The model and tokenizer to train (and DPO's reference model).

    DPO starts from the SFT dir, whose ``bt_ray.json`` names the ``[RESET]`` SFT trained: it is
    used without repeating ``model.reuse_token``, and a config naming another token is refused.
    """
    from bt_ray.models import load_model

    return load_model(cfg.model)


def _dpo_dataset(rows: list[dict], data_dir: Path, rank: int):
    """The pairs as a Dataset backed by files in the run dir (shared by all workers).

    TRL caches precomputed reference log-probs next to the dataset's files, written by rank 0 and
    read by every rank: an in-memory Dataset would put that cache in a per-process temp dir that the
    other ranks cannot see. The run dir is on storage every node sees (run.root), so this also holds
    across nodes, and a restarted run finds the cached reference log-probs.
    """
    import torch.distributed as dist
    from datasets import Dataset, load_from_disk

    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    data = [{c: r[c] for c in columns} for r in rows]
    digest = hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]
    path = data_dir / f"dpo-pairs-{digest}"
    if rank == 0 and not path.is_dir():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f"dpo-pairs-{digest}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_list(data).save_to_disk(str(tmp))
        os.replace(tmp, path)
    dist.barrier()
    return load_from_disk(str(path))
