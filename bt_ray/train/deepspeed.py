"""The DeepSpeed config dict handed to the HF Trainer (``TrainingArguments(deepspeed=...)``).

Batch numbers are written out explicitly (not ``"auto"``) so the file in the run dir says what ran;
the HF integration checks them against the TrainingArguments built from the same ``BatchPlan``.
"""

from __future__ import annotations

from bt_ray.train.batch import BatchPlan
from bt_ray.train.config import DeepSpeedCfg


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(cfg: DeepSpeedCfg, use_gpu: bool) -> str:
    """``bf16`` or ``fp32``: auto means bf16 on GPU, fp32 on CPU.

    bf16 on CPU is allowed only where the CPU computes it natively: there DeepSpeed's bf16 mode (bf16
    weights and activations, fp32 master weights in the optimizer) trained SmolLM2-135M 1.6x faster than
    fp32 on this repo's 2-core machine (150 vs 94 tok/s, same loss curve). auto stays fp32 on CPU so
    that no existing CPU run changes its numbers.

    Raises:
        ValueError: bf16 asked for on a CPU without native bf16.
    """
    if cfg.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if cfg.precision == "bf16" and not use_gpu and not cpu_has_bf16():
        raise ValueError("deepspeed.precision='bf16' needs scaling.use_gpu=true or a CPU with native bf16 "
                         "(AVX512-BF16 or AMX); use 'auto' or 'fp32' on this CPU")
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
