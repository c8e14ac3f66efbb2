"""Serve a backtracking model behind an OpenAI-compatible API on Ray Serve, until Ctrl-C.

Run as:
    python jobs/serve.py --config jobs/configs/serve_demo.yaml [dotted.key=value ...]
    bt-ray serve --config jobs/configs/serve_demo.yaml model.name=outputs/demo/runs/dpo-backtrack/model
    make serve

It starts (or joins) Ray, starts Serve's HTTP proxy on http.host:http.port (127.0.0.1:8000 by
default), deploys the app (``bt_ray.serve.app``) and waits until ``GET /v1/models`` answers; then it
prints the base URL and an ``openai`` example, and serves in the foreground. SIGINT or SIGTERM shuts
Serve down cleanly. Any OpenAI client talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-or-your-key")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])

Answers hold only the shown text (after the last [RESET]); a choice's additive ``backtracking``
object says whether it reset. The API key, if any, comes from $BT_RAY_API_KEY or auth.api_key_file.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bt_ray import config
from bt_ray.serve.app import build_app, read_api_key, served_model_name
from bt_ray.serve.config import ServeCfg


def parse_args(argv=None) -> ServeCfg:
    return config.parse_job_args(ServeCfg, __doc__, argv, example="http.port=8001")


def check_model(cfg: ServeCfg) -> None:
    """A model path that does not exist is an error before Ray starts (with a hint for the demo's)."""
    name = cfg.model.name
    looks_local = name.startswith(("/", ".", "~")) or "outputs" in Path(name).parts
    if looks_local and not Path(name).expanduser().is_dir():
        hint = " (run `make demo` first: it trains this model)" if "demo" in name else ""
        raise SystemExit(f"model.name: no such model directory {name}{hint}")


def base_url(cfg: ServeCfg) -> str:
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    return f"http://{host}:{cfg.http.port}/v1"


def wait_ready(url: str, api_key: str | None, timeout_s: float = 600.0) -> dict:
    """Poll ``GET /v1/models`` until it answers 200; returns its JSON."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while True:
        try:
            request = urllib.request.Request(f"{url}/models", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/models did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.5)


def start(cfg: ServeCfg) -> str:
    """Start Ray (or join it), Serve and the app; returns the base URL once ``/v1/models`` answers."""
    import ray
    from ray import serve

    check_model(cfg)
    has_key = read_api_key(cfg.auth) is not None  # a missing key file fails here, before Ray starts
    loopback = cfg.http.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not has_key and not cfg.auth.allow_open_network:
        raise SystemExit(f"http.host={cfg.http.host} exposes the API beyond this machine without an API key: "
                         f"set ${cfg.auth.api_key_env or 'BT_RAY_API_KEY'} or auth.api_key_file (or "
                         "auth.allow_open_network=true)")
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, num_cpus=None if address else cfg.ray_num_cpus, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    url = base_url(cfg)
    wait_ready(url, read_api_key(cfg.auth))
    return url


def stop(cfg: ServeCfg, timeout_s: float = 15.0) -> None:
    """Shut Serve down (replicas drain), then Ray; at most ``timeout_s`` for Serve.

    Ctrl-C in a terminal reaches Ray's own local processes too (one process group), so Serve's
    controller may already be gone; ``serve.shutdown`` would then wait long for it.
    """
    import ray
    from ray import serve

    waiter = threading.Thread(target=serve.shutdown, daemon=True)
    waiter.start()
    waiter.join(timeout_s)
    ray.shutdown()


def main(cfg: ServeCfg) -> None:
    t0 = time.perf_counter()
    url = start(cfg)
    model = served_model_name(cfg)
    print(f"== bt-ray serve: {cfg.model.name} as {model!r} at {url} "
          f"(ready in {time.perf_counter() - t0:.0f} s)")
    print(f"   curl {url}/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}'")
    print("   Ctrl-C stops it.", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("== shutting down Serve", flush=True)
    stop(cfg)


if __name__ == "__main__":
    main(parse_args())
