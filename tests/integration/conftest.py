"""One local Ray cluster shared by every integration test (each TorchTrainer costs ~30 s to start).

Tests marked ``integration`` run in ``make test``; they take the ``ray_cluster`` fixture, which
starts Ray in-process once per session with 4 logical CPUs (the 2-core machine runs a Train
controller plus 2 workers, or a Data pipeline plus 2 actors) and shuts it down at the end.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(
        num_cpus=int(os.environ.get("BT_RAY_TEST_CPUS", "4")),
        object_store_memory=1 << 30,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
