"""Ray Train overhead: tokens/s of the same tiny SFT in a bare TRL process and through Ray Train (1 worker).

Run as:
    python benchmarks/train_overhead.py [--steps 30] [--zero-stage 2] [--num-layers 2]

Both runs train the same rows with the same TRL SFTTrainer, DeepSpeed config, batch and seed; the
bare run is a plain single-process ``deepspeed`` world in a subprocess, the other is ``jobs/sft.py``'s
path (TorchTrainer, one worker, checkpointing only at the end). Throughput is counted over steps 2..N
(step 1 carries one-off warm-up), from the same per-step metrics callback in both. Ray's cluster
start-up and the TorchTrainer's worker start-up are reported separately; peak RSS is per training
process. The last line reads ``ratio ray/bare = X`` (goal >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def job_overrides(args, root: Path) -> list[str]:
    return [
        f"model.tiny.num_layers={args.num_layers}", "data.synthetic.num_train_pairs=2000",
        "data.max_length=256", f"optim.global_batch_size={args.batch}",
        f"optim.micro_batch_size={args.batch}",
        f"optim.max_steps={args.steps}", "optim.warmup_ratio=0", "scaling.num_workers=1",
        f"deepspeed.zero_stage={args.zero_stage}", f"run.save_steps={args.steps}", f"run.root={root}",
        "run.name=ray", "mlflow.enabled=false", f"scaling.torch_threads={args.threads}",
    ]


def steady_tokens_per_second(metrics_file: Path) -> tuple[float, float]:
    """(tokens/s over steps 2..N, peak RSS MB) from a metrics.jsonl written by MetricsCallback."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    # Each record's rate covers the tokens since the previous log; weight by those tokens.
    tokens = [b["num_input_tokens_seen"] - a["num_input_tokens_seen"] for a, b in zip(records, records[1:])
              if "tokens_per_second" in b and b["step"] >= 2]
    rates = [b["tokens_per_second"] for a, b in zip(records, records[1:])
             if "tokens_per_second" in b and b["step"] >= 2]
    total_time = sum(t / r for t, r in zip(tokens, rates))
    return sum(tokens) / total_time, max(r.get("peak_rss_mb", 0.0) for r in records)


def bare(args) -> None:
    """Single-process TRL + DeepSpeed on the rows the Ray run used (runs in a subprocess)."""
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(29500 + os.getpid() % 1000)})
    import deepspeed
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bt_ray import config
    from bt_ray.data.recipes import sft_features
    from bt_ray.models import load_model
    from bt_ray.train.batch import plan_batch
    from bt_ray.train.callbacks import MetricsCallback
    from bt_ray.train.config import SFTJobCfg
    from bt_ray.train.deepspeed import deepspeed_config

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(args.bare_dir)
    cfg = config.load(SFTJobCfg, REPO / "jobs/configs/sft_tiny_demo.yaml", job_overrides(args, out))
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    rows = rows[: len(rows) // args.batch * args.batch]  # as the job's driver trims them: same sampler order
    plan = plan_batch(cfg.optim.global_batch_size, 1, cfg.optim.micro_batch_size)
    model, tokenizer, _ = load_model(cfg.model)
    sft_args = SFTConfig(
        output_dir=str(out / "hf"), per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps, learning_rate=cfg.optim.learning_rate,
        lr_scheduler_type=cfg.optim.lr_scheduler_type, warmup_steps=0.0, max_steps=cfg.optim.max_steps,
        seed=cfg.optim.seed, data_seed=cfg.optim.seed, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0,
        include_num_input_tokens_seen=True, disable_tqdm=True, completion_only_loss=True, max_length=None,
        deepspeed=deepspeed_config(cfg.deepspeed, plan, use_gpu=False, max_grad_norm=cfg.optim.max_grad_norm),
    )
    callback = MetricsCallback({"mlflow": None, "run_dir": str(out)}, rank=0)
    dataset = Dataset.from_list([sft_features(r) for r in rows])
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[callback])
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the training process")
    parser.add_argument("--bare-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_dir:
        bare(args)
        return

    import importlib.util

    import ray

    from bt_ray import config
    from bt_ray.train.config import SFTJobCfg

    root = Path(tempfile.mkdtemp(prefix="bt-ray-bench-"))
    spec = importlib.util.spec_from_file_location("sft_job", REPO / "jobs" / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster_s = time.perf_counter() - t0
    cfg = config.load(SFTJobCfg, REPO / "jobs/configs/sft_tiny_demo.yaml", job_overrides(args, root))
    t0 = time.perf_counter()
    summary = sft.main(cfg)
    ray_wall = time.perf_counter() - t0
    ray.shutdown()
    ray_tps, ray_rss = steady_tokens_per_second(root / "ray" / "metrics.jsonl")

    bare_dir = root / "bare"
    bare_dir.mkdir()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--bare-dir", str(bare_dir), "--rows",
                    str(root / "ray" / "data" / "backtrack-sft.jsonl"), "--steps", str(args.steps),
                    "--batch", str(args.batch), "--num-layers", str(args.num_layers),
                    "--zero-stage", str(args.zero_stage), "--threads", str(args.threads)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare_wall = time.perf_counter() - t0
    bare_tps, bare_rss = steady_tokens_per_second(bare_dir / "metrics.jsonl")

    print(f"tiny SFT, {args.steps} steps x {args.batch} sequences, ZeRO-{args.zero_stage}, 1 process, "
          f"{args.threads} torch threads")
    print(f"bare TRL      : {bare_tps:8.0f} tokens/s (steps 2..N), wall {bare_wall:5.1f} s, "
          f"peak RSS {bare_rss:6.0f} MB")
    print(f"Ray Train (1w): {ray_tps:8.0f} tokens/s (steps 2..N), wall {ray_wall:5.1f} s "
          f"(fit {summary['fit_seconds']} s), peak RSS {ray_rss:6.0f} MB (worker)")
    print(f"Ray cluster start-up {cluster_s:.1f} s (separate); driver peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    shutil.rmtree(root, ignore_errors=True)
    print(f"ratio ray/bare = {ray_tps / bare_tps:.3f} (tokens/s; goal >= 0.90)")


if __name__ == "__main__":
    main()
