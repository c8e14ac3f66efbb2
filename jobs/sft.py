"""Supervised fine-tuning (baseline or backtracking recipe) as a Ray Train job with DeepSpeed.

Run as:
    python jobs/sft.py --config jobs/configs/sft_tiny_demo.yaml [dotted.key=value ...]
    bt-ray sft --config jobs/configs/sft_tiny_demo.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/sft.py --config jobs/configs/sft_tiny_demo.yaml

``bt_ray.train.job.run_stage`` does the work: it checks the config (batch split, precision, GPUs),
builds or reads the rows, opens the MLflow run, then a TorchTrainer runs
``bt_ray.train.loop.train_loop_per_worker`` on ``scaling.num_workers`` workers. Outputs go to
``<run.root>/<run.name>/``: Ray's checkpoints (``checkpoint-<step>``, each an HF model dir plus
DeepSpeed state), ``model/`` (the final HF model), ``config.yaml``, ``metrics.jsonl`` and
``summary.json``. Running the same command again resumes from the latest checkpoint; a finished run
says so and exits.
"""

from __future__ import annotations

from bt_ray import config
from bt_ray.train.config import SFTJobCfg
from bt_ray.train.job import run_stage


def parse_args(argv=None) -> SFTJobCfg:
    return config.parse_job_args(SFTJobCfg, __doc__, argv, example="optim.learning_rate=1e-5")


def main(cfg: SFTJobCfg) -> dict:
    """Train SFT; returns the run's summary (``<run dir>/summary.json``)."""
    return run_stage(cfg)


if __name__ == "__main__":
    main(parse_args())
