"""How many sweep trials fit on the cluster at once, and a clear error when one trial cannot fit at all."""

from __future__ import annotations

import math

from bt_ray.tune.config import SweepCfg


def trial_resources(cfg: SweepCfg, job) -> dict[str, float]:
    """What one trial holds at its peak: its training workers, or later its scoring actors and judge."""
    s, e = job.scaling, cfg.selection.engine
    cpus = max(s.num_workers * s.cpus_per_worker, e.num_actors * e.num_cpus_per_actor + 0.25)
    gpus = max(s.num_workers if s.use_gpu else 0, e.num_actors * e.num_gpus_per_actor)
    return {"CPU": cpus, "GPU": gpus}


def concurrency(cfg: SweepCfg, jobs: dict, have: dict[str, float]) -> int:
    """Trials at once on a cluster with resources ``have`` (8 GPUs at 2 per trial: 4), capped by
    ``max_concurrent_trials``.

    Raises:
        RuntimeError: a trial needs more CPUs or GPUs than the whole cluster has, naming the trials.
    """
    fits, problems = math.inf, []
    for name, job in jobs.items():
        for kind, need in trial_resources(cfg, job).items():
            if need > have.get(kind, 0):
                problems.append(f"{name}: needs {need:g} {kind} but the cluster has {have.get(kind, 0):g}")
            elif need > 0:
                fits = min(fits, int(have[kind] // need))
    if problems:
        raise RuntimeError("trials need more than the Ray cluster has (lower scaling.* or "
                           "selection.engine.*):\n  " + "\n  ".join(problems))
    fits = 1 if fits is math.inf else max(1, fits)
    return min(fits, cfg.max_concurrent_trials) if cfg.max_concurrent_trials else fits
