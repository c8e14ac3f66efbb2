"""Driver-side steps of a training stage (``bt_ray.train.job.run_stage``): checks, rows, resume state, export.

Everything here runs on the driver, before or after the ``TorchTrainer``; nothing here trains.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

from bt_ray import config
from bt_ray.train.batch import BatchPlan, plan_batch
from bt_ray.train.callbacks import CHECKPOINT_PREFIX
from bt_ray.train.config import DPOJobCfg, SFTJobCfg, TrainDataCfg
from bt_ray.train.deepspeed import resolve_precision

# Files of a checkpoint that are training state, not part of the exported HF model.
_TRAINING_STATE = ("global_step", "latest", "zero_to_", "rng_state", "optimizer.pt", "scheduler.pt",
                   "training_args.bin")
# Environment variables workers need to see as the driver does (JIT op cache, preset cache, offline hub).
# The path-valued ones are passed absolute: workers do not run in the driver's working directory.
_PATH_ENV = ("TORCH_EXTENSIONS_DIR", "BT_RAY_CACHE", "BT_RAY_DATA_DIR", "HF_HOME")
_WORKER_ENV = (*_PATH_ENV, "HF_HUB_OFFLINE")


def run_dir_of(cfg: SFTJobCfg | DPOJobCfg) -> Path:
    """``<run.root>/<run.name>``, absolute (Ray's storage path must be); ``RunCfg`` refuses a URI root."""
    return Path(cfg.run.root).resolve() / cfg.run.name


def preflight(cfg: SFTJobCfg | DPOJobCfg) -> BatchPlan:
    """Every check that needs no cluster, run before anything starts.

    Returns:
        The batch split for ``scaling.num_workers`` workers.

    Raises:
        ValueError: the global batch does not divide, bf16 on CPU, a missing SFT checkpoint for DPO,
            a missing data file, or training data that is an evaluation test set
            (``check_not_evaluated_data``).
        FileNotFoundError: a data source cannot be found.
    """
    plan = plan_batch(cfg.optim.global_batch_size, cfg.scaling.num_workers, cfg.optim.micro_batch_size)
    resolve_precision(cfg.deepspeed, cfg.scaling.use_gpu)
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1; got 0")
    if isinstance(cfg, DPOJobCfg):
        sft_dir = Path(cfg.model.name)
        if not (sft_dir / "config.json").is_file():
            raise ValueError(
                f"model.name must be the HF directory of the SFT checkpoint DPO starts from; "
                f"{cfg.model.name!r} has no config.json (run jobs/sft.py first, or point at its "
                f"<run dir>/model)"
            )
    if cfg.data.path is not None and not Path(cfg.data.path).is_file():
        raise ValueError(f"data.path must be an existing JSONL file; got {cfg.data.path!r} "
                         "(build it with bt-ray data build, or set data.path=null to build on the driver)")
    check_not_evaluated_data(cfg.data)
    return plan


def check_not_evaluated_data(data: TrainDataCfg) -> None:
    """Never train on what is evaluated: refuse sources (or a prebuilt JSONL built from sources) that
    resolve to an evaluation test set (``bt_ray.data.build.check_not_evaluated``).

    A prebuilt ``data.path`` is checked through the ``<name>.summary.json`` that ``bt-ray data build``
    writes beside it (its sources' origins); without one there is nothing to check.
    """
    from bt_ray.data.build import check_not_evaluated, part_conflict
    from bt_ray.data.sources import eval_overlap, eval_test_sets, parse_origin

    if data.path is None:
        check_not_evaluated(data.sources, field="data.sources")
        return
    summary = Path(data.path).with_suffix(".summary.json")
    if not summary.is_file():
        return
    test_sets = eval_test_sets()
    problems = []
    for i, source in enumerate(json.loads(summary.read_text()).get("sources", [])):
        origin = parse_origin(str(source.get("origin", "")))
        hit = eval_overlap(origin, test_sets) if origin is not None else None
        parts = source.get("parts") or {}  # a seeded part of the file (bt_ray.data.parts): train is disjoint
        if hit is not None and part_conflict(parts.get("part"), parts.get("seed"), parts.get("fractions"),
                                             hit.name) is not None:
            problems.append(f"data.path={data.path} was built from {summary.name} sources[{i}] "
                            f"({source.get('source')}, {origin}), the evaluation test set {hit.name!r} "
                            f"({hit.where})")
    if problems:
        raise ValueError("never train on what is evaluated:\n  " + "\n  ".join(problems)
                         + "\nrebuild the rows from a training split")


# Settings a run may change between a stop and its resume: they touch neither the model nor the data.
# Not mlflow.experiment: a resumed stage reopens its MLflow run, and a run cannot move to another
# experiment, so a new value would be silently ignored.
RESUMABLE_KEYS = frozenset({
    "run.max_failures", "run.num_to_keep", "run.logging_steps", "scaling.cpus_per_worker",
    "scaling.torch_threads", "mlflow.enabled", "mlflow.tracking_uri",
})


def check_resumable(cfg: SFTJobCfg | DPOJobCfg, run_dir: Path) -> None:
    """A run dir is resumed (or found finished) only with the config that made it.

    Raises:
        ValueError: ``<run dir>/config.yaml`` differs in a setting outside ``RESUMABLE_KEYS``; every
            difference is listed (a changed learning rate must never reuse the old model).
    """
    import yaml

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = config.flatten(yaml.safe_load(saved.read_text()) or {})
    new = config.flatten(config.to_dict(cfg))
    diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
             for k in sorted(set(old) | set(new)) if k not in RESUMABLE_KEYS and old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(
            f"{run_dir} holds a run made with another config ({saved}):\n  " + "\n  ".join(diffs)
            + "\nchoose another run.name (or run.root), or delete that run dir to start over"
        )


def check_cluster(cfg: SFTJobCfg | DPOJobCfg) -> None:
    """Checks against the running Ray cluster (after ``ray.init``), before any worker starts.

    Raises:
        RuntimeError: GPUs asked for but the cluster has too few; too few CPUs for the workers.
    """
    import ray

    resources = ray.cluster_resources()
    s = cfg.scaling
    if s.use_gpu and resources.get("GPU", 0) < s.num_workers:
        raise RuntimeError(
            f"scaling.use_gpu=true needs {s.num_workers} GPU(s) (one per worker) but the Ray cluster has "
            f"{resources.get('GPU', 0):g}; set scaling.use_gpu=false to train on CPU"
        )
    need = s.num_workers * s.cpus_per_worker
    if resources.get("CPU", 0) < need:
        raise RuntimeError(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker:g} CPUs = {need:g} CPUs, but the Ray "
            f"cluster has {resources.get('CPU', 0):g}; lower scaling.cpus_per_worker (fractions are fine)"
        )


def worker_env() -> dict[str, str]:
    """Environment variables to pass to the workers' runtime env."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in _WORKER_ENV if os.environ.get(k)})
    for key in _PATH_ENV:
        if key in env:
            env[key] = os.path.abspath(env[key])
    return env


# ---------------------------------------------------------------- rows


def load_rows(cfg: SFTJobCfg | DPOJobCfg, run_dir: Path, plan: BatchPlan, *, log=print) -> list[dict]:
    """The training rows, in a deterministic order, trimmed to whole global batches.

    From ``data.path`` (a JSONL of the recipe), or built on the driver from ``data.sources`` into
    ``<run dir>/data/<recipe>.jsonl`` (same rows for the same config). Rows that do not fill a last
    global batch are left out, with a warning, so that every optimizer step sees exactly
    ``global_batch_size`` sequences on any number of workers.

    Raises:
        ValueError: rows of the wrong recipe or stage, or fewer rows than one global batch.
    """
    data: TrainDataCfg = cfg.data
    if data.path is None:
        from bt_ray.data.build import DataBuildCfg, build_dataset
        from bt_ray.data.recipes import RecipeCfg

        build_cfg = DataBuildCfg(
            model=cfg.model,
            recipe=RecipeCfg(name=data.recipe, prefix=data.prefix, judge_filter=data.judge_filter,
                             filter=data.filter, max_length=data.max_length),
            sources=data.sources,
            synthetic=data.synthetic,
            shuffle_seed=data.shuffle_seed,
            out=str(run_dir / "data" / f"{data.recipe}.jsonl"),
        )
        path = Path(build_dataset(build_cfg, log=lambda m: log(f"[data] {m}"), field="data.sources")["out"])
    else:
        path = Path(data.path)
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if data.limit is not None:
        rows = rows[: data.limit]
    keys = ("prompt_ids", "completion_ids") if data.recipe.endswith("-sft") else (
        "prompt_ids", "chosen_ids", "rejected_ids")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing or row.get("recipe", data.recipe) != data.recipe:
            raise ValueError(
                f"{path}: row {i} is not a {data.recipe} row (recipe {row.get('recipe')!r}, missing "
                f"{missing}); data.recipe must match the rows"
            )
    max_length = cfg.sft.max_length if isinstance(cfg, SFTJobCfg) else None
    if max_length is not None:
        lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
        too_long = [i for i, n in enumerate(lengths) if n > max_length]
        if too_long:
            raise ValueError(f"{path}: {len(too_long)} rows are longer than sft.max_length={max_length} "
                             f"(first: row {too_long[0]}); rows are never truncated: rebuild them with a "
                             f"smaller data.max_length or raise sft.max_length")
    num_used = len(rows) // plan.global_batch_size * plan.global_batch_size
    if num_used == 0:
        raise ValueError(f"{path}: {len(rows)} rows are fewer than one global batch "
                         f"(optim.global_batch_size={plan.global_batch_size})")
    if num_used < len(rows):
        warnings.warn(f"data: {len(rows) - num_used} of {len(rows)} rows left out to fill whole global "
                      f"batches of {plan.global_batch_size}", stacklevel=2)
    log(f"[data] {num_used} rows from {path}")
    return rows[:num_used]


def planned_steps(cfg: SFTJobCfg | DPOJobCfg, num_rows: int) -> int:
    """Optimizer steps the run will take (HF's count for whole global batches)."""
    if cfg.optim.max_steps > 0:
        return cfg.optim.max_steps
    return math.ceil(cfg.optim.num_epochs * (num_rows // cfg.optim.global_batch_size))


# ---------------------------------------------------------------- checkpoints


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint dirs Ray kept in the run dir, oldest first."""
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / "trainer_state.json").read_text())["global_step"])


def export_model(checkpoint: Path, out_dir: Path) -> Path:
    """Copy a checkpoint's HF model files (no optimizer/DeepSpeed state) to ``out_dir``, atomically."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name.startswith(_TRAINING_STATE):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
