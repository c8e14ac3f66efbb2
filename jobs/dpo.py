"""DPO (baseline or backtracking pairs) from an SFT checkpoint as a Ray Train job with DeepSpeed.

Run as:
    python jobs/dpo.py --config jobs/configs/dpo_tiny_demo.yaml [dotted.key=value ...]
    bt-ray dpo --config jobs/configs/dpo_tiny_demo.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/dpo.py --config jobs/configs/dpo_tiny_demo.yaml

``model.name`` is the SFT model's HF directory: DPO starts from it and uses it as the reference
(kept as a frozen copy, or only its log-probs with ``dpo.precompute_ref_log_probs=true``).
``bt_ray.train.job.run_stage`` does the work: it checks the config (SFT checkpoint present, batch
split, precision, GPUs), builds or reads the pairs, opens the MLflow run, then a TorchTrainer runs
``bt_ray.train.loop.train_loop_per_worker`` on ``scaling.num_workers`` workers. Outputs go to
``<run.root>/<run.name>/`` as for SFT: Ray's checkpoints, ``model/``, ``config.yaml``,
``metrics.jsonl`` and ``summary.json``. Running the same command again resumes from the latest
checkpoint; a finished run says so and exits.
"""

from __future__ import annotations

from bt_ray import config
from bt_ray.train.config import DPOJobCfg
from bt_ray.train.job import run_stage


def parse_args(argv=None) -> DPOJobCfg:
    return config.parse_job_args(DPOJobCfg, __doc__, argv, example="optim.learning_rate=1e-5")


def main(cfg: DPOJobCfg) -> dict:
    """Train DPO; returns the run's summary (``<run dir>/summary.json``)."""
    return run_stage(cfg)


if __name__ == "__main__":
    main(parse_args())
