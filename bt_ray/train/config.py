"""Typed configs of the SFT and DPO training jobs (``jobs/sft.py``, ``jobs/dpo.py``).

One YAML per run; every field has a default and a one-line doc. Cross-field problems that need the
machine or the file system (a missing SFT checkpoint, GPUs asked for but absent, a global batch the
world size cannot split) are checked by ``bt_ray.train.driver.preflight`` before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bt_ray.config import ConfigError, check
from bt_ray.data.build import SourceCfg
from bt_ray.data.judge_filter import JudgeFilterCfg, JudgeFilterName
from bt_ray.data.recipes import PrefixCfg
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.models import ModelCfg


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainDataCfg:
    """Where the training rows come from: a prebuilt JSONL, or sources built on the driver."""

    path: str | None = None
    """A JSONL written by ``bt-ray data build`` (rows of the job's recipe); null = build from sources."""
    recipe: Literal["baseline-sft", "backtrack-sft", "baseline-dpo", "backtrack-dpo"] = "backtrack-sft"
    """Recipe of the rows (checked against the JSONL's rows; used to build them when path is null)."""
    sources: tuple[SourceCfg, ...] = (SourceCfg(),)
    """Sources to build rows from on the driver (ignored when path is set)."""
    synthetic: SyntheticWorldCfg = field(default_factory=SyntheticWorldCfg)
    """The synthetic world of the synthetic sources (ignored when path is set)."""
    prefix: PrefixCfg = field(default_factory=PrefixCfg)
    """Prefix-length sampler of backtracking rows (ignored when path is set)."""
    judge_filter: JudgeFilterName = "off"
    """Who decides which pairs give backtracking rows: off, synthetic, judge or column (see
    bt_ray.data.recipes.RecipeCfg.judge_filter; ignored when path is set)."""
    filter: JudgeFilterCfg = field(default_factory=JudgeFilterCfg)
    """Settings of judge_filter=judge (the judge, its engine) and column (label columns)."""
    max_length: int = 1024
    """Building rows from sources (ignored when path is set): the longest row made, in tokens (prompt +
    completion, or prompt + the longer response). Backtracking rows shorten their prefix to fit; a row
    that cannot fit is skipped and counted, never truncated (RecipeCfg.max_length). sft.max_length is
    the other limit: a check on the rows SFT trains on."""
    shuffle_seed: int | None = 0
    """Seed of the shuffle after mixing sources when building; null keeps source order."""
    limit: int | None = None
    """Use only the first N rows (after loading or building); null = all."""

    def __post_init__(self):
        check(self, [
            ("path", self.path is None or self.path.endswith(".jsonl"), "must be a .jsonl file or null"),
            ("sources", self.path is not None or len(self.sources) > 0,
             "must list a source when path is null"),
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("limit", self.limit is None or self.limit > 0, "must be > 0 or null"),
            ("judge_filter", self.judge_filter != "judge" or self.filter.judge.safety != "llm"
             or self.filter.judge.llm.base_url is not None,
             "needs filter.judge.llm.base_url when filter.judge.safety is llm"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class DeepSpeedCfg:
    """DeepSpeed ZeRO settings (bf16 on GPU, fp32 on CPU; gloo on CPU, nccl on GPU)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 2 shards optimizer state and gradients, 3 also the parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (uses DeepSpeedCPUAdam, JIT-compiled on first use)."""
    offload_param: bool = False
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU; bf16 on CPU only where native (AVX512-BF16/AMX: ~1.6x faster)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (useful on GPU clusters)."""

    def __post_init__(self):
        check(self, [
            ("offload_param", not self.offload_param or self.zero_stage == 3, "needs zero_stage 3"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimCfg:
    """Optimisation: the batch is global (PAPER.md: 128); per-device batch and accumulation derive from it."""

    global_batch_size: int = 128
    """Sequences per optimizer step over all workers (= micro batch x accumulation x world size)."""
    micro_batch_size: int | None = None
    """Sequences per device per forward; null = global_batch_size / num_workers (no accumulation)."""
    learning_rate: float = 2e-5
    """Peak learning rate."""
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Schedule after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent warming up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    num_epochs: float = 1.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = num_epochs over the data."""
    seed: int = 0
    """Seed of the data order and dropout; the same seed gives the same order on any world size."""

    def __post_init__(self):
        check(self, [
            ("global_batch_size", self.global_batch_size >= 1, "must be >= 1"),
            ("micro_batch_size", self.micro_batch_size is None or self.micro_batch_size >= 1, "must be >= 1"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "must be > 0"),
            ("num_epochs", self.num_epochs > 0, "must be > 0"),
            ("max_steps", self.max_steps == -1 or self.max_steps > 0, "must be > 0 or -1"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalingCfg:
    """Ray Train workers (one process per device)."""

    num_workers: int = 2
    """Training processes (the world size)."""
    use_gpu: bool = False
    """One GPU per worker, bf16 and nccl; an error when the cluster has too few GPUs."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker asks for (fractional values let a 2-core laptop host more workers)."""
    torch_threads: int | None = None
    """torch.set_num_threads in each worker; null keeps torch's default."""

    def __post_init__(self):
        check(self, [
            ("num_workers", self.num_workers >= 1, "must be >= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("torch_threads", self.torch_threads is None or self.torch_threads >= 1, "must be >= 1 or null"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCfg:
    """Where outputs go, how often to checkpoint, and what to do when a worker dies."""

    name: str = "sft"
    """Run name (deterministic, no timestamps): the run dir is <root>/<name>; restarting it resumes."""
    root: str = "outputs/runs"
    """Run root (Ray storage path): local, or on a cluster a shared POSIX filesystem (NFS, EFS, a PVC)."""
    save_steps: int = 50
    """Checkpoint every this many optimizer steps (and always at the last step)."""
    num_to_keep: int | None = 2
    """Checkpoints kept (chosen by keep_by); null keeps all."""
    keep_by: Literal["latest", "loss"] = "latest"
    """Which checkpoints survive: the latest ones, or those with the lowest training loss."""
    logging_steps: int = 1
    """Log metrics every this many steps."""
    max_failures: int = 0
    """Worker-group restarts allowed; each resumes from the latest checkpoint."""

    def __post_init__(self):
        check(self, [
            ("name", bool(self.name) and "/" not in self.name, "must be a non-empty name without '/'"),
            ("root", bool(self.root) and "://" not in self.root,
             "must be a non-empty path on a shared POSIX filesystem (NFS, EFS, a PVC), not a URI "
             "(s3://, gs://, ...): checkpoints, the exported model and metrics.jsonl are written as files"),
            ("save_steps", self.save_steps >= 1, "must be >= 1"),
            ("num_to_keep", self.num_to_keep is None or self.num_to_keep >= 1, "must be >= 1 or null"),
            ("logging_steps", self.logging_steps >= 1, "must be >= 1"),
            ("max_failures", self.max_failures >= -1, "must be >= 0 (or -1 for unlimited)"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class MLflowCfg:
    """MLflow tracking from the driver (params, tags, artifacts) and rank 0 (metrics)."""

    enabled: bool = True
    """Track this run in MLflow."""
    tracking_uri: str | None = None
    """Store URI; null = $MLFLOW_TRACKING_URI, else sqlite:///<run root>/mlflow.db."""
    experiment: str = "bt-ray"
    """Experiment name."""

    def __post_init__(self):
        check(self, [("experiment", bool(self.experiment), "must not be empty")])


@dataclass(frozen=True, kw_only=True, slots=True)
class SFTCfg:
    """SFT-specific settings (TRL SFTTrainer, completion-only loss on pre-tokenized rows)."""

    max_length: int | None = None
    """Training, not building: the longest sequence (prompt + completion tokens) SFT trains on. A row
    over it, from data.path or built, stops the job before training (rows are never truncated; build
    them with data.max_length at most this to skip long ones instead); null = no limit."""


# TRL 1.16's DPO losses (trl.DPOConfig.loss_type): a typo fails here, not on the workers.
DPOLossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                      "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DPOCfg:
    """DPO-specific settings (TRL DPOTrainer; the reference model is the SFT checkpoint)."""

    beta: float = 0.1
    """KL penalty (PAPER.md grid: 0.025, 0.05, 0.1, 0.2)."""
    loss_type: tuple[DPOLossType, ...] = ("sigmoid",)
    """TRL loss types (summed); ["sigmoid", "sft"] adds an NLL term on the chosen response."""
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs once before training instead of keeping a reference model copy."""

    def __post_init__(self):
        check(self, [
            ("beta", self.beta > 0, "must be > 0"),
            ("loss_type", len(self.loss_type) > 0, "must list at least one loss"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class SFTJobCfg:
    """``jobs/sft.py``: supervised fine-tuning (baseline or backtracking recipe) on Ray Train."""

    model: ModelCfg = field(default_factory=ModelCfg)
    """Model to start from (a preset, HF directory or hub id)."""
    data: TrainDataCfg = field(default_factory=TrainDataCfg)
    """Training rows."""
    optim: OptimCfg = field(default_factory=OptimCfg)
    """Optimisation and the global batch."""
    sft: SFTCfg = field(default_factory=SFTCfg)
    """SFT settings."""
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    """DeepSpeed ZeRO settings."""
    scaling: ScalingCfg = field(default_factory=ScalingCfg)
    """Ray Train workers."""
    run: RunCfg = field(default_factory=RunCfg)
    """Outputs, checkpoints, fault tolerance."""
    mlflow: MLflowCfg = field(default_factory=MLflowCfg)
    """Tracking."""

    def __post_init__(self):
        if not self.data.recipe.endswith("-sft"):
            raise ConfigError([f"data.recipe must be baseline-sft or backtrack-sft for SFT; "
                               f"got {self.data.recipe!r}"])


@dataclass(frozen=True, kw_only=True, slots=True)
class DPOJobCfg:
    """``jobs/dpo.py``: DPO (baseline or backtracking pairs) from an SFT checkpoint on Ray Train."""

    model: ModelCfg = field(default_factory=lambda: ModelCfg(name="outputs/runs/sft/model"))
    """model.name is the HF directory of the SFT model DPO starts from and uses as its reference."""
    data: TrainDataCfg = field(default_factory=lambda: TrainDataCfg(recipe="backtrack-dpo"))
    """Training pairs."""
    optim: OptimCfg = field(default_factory=lambda: OptimCfg(learning_rate=5e-7))
    """Optimisation and the global batch."""
    dpo: DPOCfg = field(default_factory=DPOCfg)
    """DPO settings."""
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    """DeepSpeed ZeRO settings."""
    scaling: ScalingCfg = field(default_factory=ScalingCfg)
    """Ray Train workers."""
    run: RunCfg = field(default_factory=lambda: RunCfg(name="dpo"))
    """Outputs, checkpoints, fault tolerance."""
    mlflow: MLflowCfg = field(default_factory=MLflowCfg)
    """Tracking."""

    def __post_init__(self):
        if not self.data.recipe.endswith("-dpo"):
            raise ConfigError([f"data.recipe must be baseline-dpo or backtrack-dpo for DPO; "
                               f"got {self.data.recipe!r}"])


# Job config class by YAML file-name prefix (jobs/configs/sft_*.yaml, dpo_*.yaml).
JOB_CONFIGS = {"sft": SFTJobCfg, "dpo": DPOJobCfg}
