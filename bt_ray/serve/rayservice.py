"""The application builder a KubeRay ``RayService`` imports: the same Serve app as ``jobs/serve.py``,
built from a config file and dotted overrides.

A RayService's ``serveConfigV2`` names an import path and passes it ``args``; Serve calls the builder
with that dict on the cluster (``clusters/kuberay/rayservice-llama3-8b.yaml``)::

    applications:
      - name: bt-ray
        import_path: bt_ray.serve.rayservice:app
        args:
          config: /app/jobs/configs/serve_llama3_8b.yaml
          overrides: ["model.name=/mnt/shared/bt-ray/runs/dpo-backtrack-llama3-8b/model"]

Changing ``args`` (e.g. the ``model.name=`` override: a new model dir) makes KubeRay hand Serve the new
config; Serve rebuilds the app and replaces its replicas in a rolling update. Serve's HTTP proxy
(host, port) comes from ``serveConfigV2.http_options``, not ``http.*`` of the config; the API key
rule is that of ``jobs/serve.py``: the proxy listens beyond the pod, so a key is required unless
``auth.allow_open_network=true``.
"""

from __future__ import annotations

from bt_ray import config
from bt_ray.serve.app import build_app, read_api_key
from bt_ray.serve.config import ServeCfg

ARGS = ("config", "overrides")


def load_cfg(args: dict) -> ServeCfg:
    """The ``ServeCfg`` of a serveConfigV2 ``args`` dict (``config``: a YAML path; ``overrides``: a list
    of dotted ``key=value``); every problem is listed at once, naming the field."""
    errors = [f"args.{key}: unknown argument (expected {', '.join(ARGS)})" for key in args if key not in ARGS]
    path = args.get("config")
    if not isinstance(path, str) or not path:
        errors.append(f"args.config: must be the path of a serve config YAML, got {path!r}")
    overrides = args.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        errors.append(f"args.overrides: must be a list of dotted key=value strings, got {overrides!r}")
    if errors:
        raise config.ConfigError(errors, header="invalid RayService application args")
    return config.load(ServeCfg, path, overrides)


def app(args: dict):
    """Serve application builder (``import_path: bt_ray.serve.rayservice:app``)."""
    cfg = load_cfg(args)
    if read_api_key(cfg.auth) is None and not cfg.auth.allow_open_network:
        raise config.ConfigError(
            [f"auth: a RayService exposes the API beyond the pod without an API key: set "
             f"${cfg.auth.api_key_env or 'BT_RAY_API_KEY'} or auth.api_key_file (or "
             "auth.allow_open_network=true)"], header="invalid RayService application args")
    return build_app(cfg)
