"""The DeepSpeed config dict handed to the HF Trainer (``TrainingArguments(deepspeed=...)``).

Batch numbers are written out explicitly (not ``"auto"``) so the file in the run dir says what ran;
the HF integration checks them against the TrainingArguments built from the same ``BatchPlan``.
"""

from __future__ import annotations

from bt_ray.train.batch import BatchPlan
from bt_ray.train.config import DeepSpeedCfg


def resolve_precision(cfg: DeepSpeedCfg, use_gpu: bool) -> str:
    """``bf16`` or ``fp32``: auto means bf16 on GPU, fp32 on CPU.

    Raises:
        ValueError: bf16 asked for on CPU.
    """
    if cfg.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if cfg.precision == "bf16" and not use_gpu:
        raise ValueError("deepspeed.precision='bf16' needs scaling.use_gpu=true; use 'auto' or 'fp32' on CPU")
    return cfg.precision


def deepspeed_config(cfg: DeepSpeedCfg, plan: BatchPlan, *, use_gpu: bool, max_grad_norm: float) -> dict:
    """A DeepSpeed config for ZeRO stage ``cfg.zero_stage`` and the given batch split."""
    precision = resolve_precision(cfg, use_gpu)
    zero: dict = {
        "stage": cfg.zero_stage,
        "overlap_comm": cfg.overlap_comm,
        "contiguous_gradients": True,
    }
    if cfg.zero_stage == 3:
        # Gathers the sharded weights on save, so checkpoints hold a plain model.safetensors.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    ds = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own prints are noise
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        # Offloaded optimizer state needs DeepSpeed's CPU Adam (JIT-compiled once, ~70 s, +9 GB peak);
        # otherwise the HF Trainer's torch AdamW is used and nothing is compiled.
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}}
    return ds
