"""One local Ray cluster shared by every integration test (each TorchTrainer costs ~30 s to start).

Tests marked ``integration`` run in ``make test``; they take the ``ray_cluster`` fixture, which
starts Ray in-process once per session with 4 logical CPUs (the 2-core machine runs a Train
controller plus 2 workers, or a Data pipeline plus 2 actors) and shuts it down at the end.
"""

from __future__ import annotations

import os

import pytest

# Overrides that make a training or eval job run in seconds (jobs run as subprocesses by several tests).
SFT_FAST = ["data.synthetic.num_train_pairs=32", "data.max_length=256", "optim.global_batch_size=8",
            "optim.micro_batch_size=2", "optim.max_steps=2", "run.save_steps=2", "model.tiny.num_layers=1",
            "scaling.num_workers=1"]
EVAL_FAST = ["engine.kind=hf", "engine.num_actors=1", "engine.batch_size=8", "decode.max_new_tokens=8",
             "worst_of_k=[]", "bias_sweep=[]", "ray_num_cpus=2"]


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


@pytest.fixture(scope="session")
def serve_port(ray_cluster):
    """Ray Serve's HTTP proxy on 127.0.0.1 (a free port), started once on the shared cluster."""
    from ray import serve

    from tests.conftest import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


def deploy_server(port: int, overrides: list[str] = (), *, name: str = "bt-ray-test", route_prefix: str = "/",
                  env: dict | None = None) -> str:
    """Deploy the bt-ray app (tiny preset, HF engine, half a CPU) under ``route_prefix``; returns its
    OpenAI base URL once ``GET /v1/models`` answers. ``env``: variables set while the app is built (the
    API key is read then)."""
    import os

    from ray import serve

    from bt_ray import config
    from bt_ray.serve.app import build_app
    from bt_ray.serve.config import ServeCfg

    cfg = config.load(ServeCfg, None, ["deployment.num_cpus=0.5", "decode.max_new_tokens=16",
                                       "deployment.log_level=WARNING",  # no access log per request
                                       f"http.port={port}", f"app_name={name}", *overrides])
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        app = build_app(cfg)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    prefix = route_prefix.rstrip("/")
    url = f"http://127.0.0.1:{port}{prefix}/v1"
    import runpy

    key = (env or {}).get(cfg.auth.api_key_env or "")
    runpy.run_path("jobs/serve.py")["wait_ready"](url, key, timeout_s=300)
    return url
