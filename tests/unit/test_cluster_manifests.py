"""The cluster definitions (clusters/) against the schemas their tools check and against the repo's jobs.

No cluster is reachable here, so these tests check what can be checked offline: the launcher YAML against
Ray's own schema; each KubeRay manifest's ``spec`` against KubeRay's CRD schema (tests/assets/kuberay);
that each entrypoint names a job file and config of this repo that load with its overrides (with the
job's own argument parser); that the GPUs each cluster requests are what its job asks Ray for; that
every job tracks to the MLflow Service of clusters/kuberay/mlflow.yaml; and that the RayService's import
path builds the Serve app (without starting Serve).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import runpy
import shlex
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import ray
import yaml

from bt_ray import config, tracking
from tests.conftest import REPO

CLUSTERS = REPO / "clusters"
KUBERAY = CLUSTERS / "kuberay"
ASSETS = REPO / "tests" / "assets" / "kuberay"
APP = "/app"  # where the images hold the checkout (the entrypoints' working dir)
SHARED = "/mnt/shared"
IMAGES = {"<REGISTRY>/bt-ray:cuda", "<REGISTRY>/bt-ray:cpu"}
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
# Every RayJob: the job it runs. A job added to jobs/ without a RayJob fails test_every_job_has_a_rayjob.
RAYJOBS = {
    "rayjob-sft-llama3-8b.yaml": "sft",
    "rayjob-dpo-llama3-8b.yaml": "dpo",
    "rayjob-sweep-paper-sft.yaml": "sweep",
    "rayjob-sweep-paper-dpo.yaml": "sweep",
    "rayjob-eval-paper.yaml": "eval",
    "rayjob-attack-paper.yaml": "attack",
    "rayjob-pipeline.yaml": "pipeline",  # the demo preset on the CPU image
    "rayjob-onpolicy-llama3-8b.yaml": "onpolicy",
    "rayjob-calibrate-paper.yaml": "calibrate",
}
RAYSERVICE = "rayservice-llama3-8b.yaml"
MANIFESTS = ["raycluster-h100.yaml", *RAYJOBS, RAYSERVICE]


def _load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator of ``spec`` of a KubeRay resource (the schema is checked once: it is large)."""
    with gzip.open(ASSETS / f"ray.io_{CRDS[kind]}.v1.spec.json.gz") as f:
        crd = json.load(f)
    assert crd["kind"] == kind and crd["version"] == "v1"
    jsonschema.Draft7Validator.check_schema(crd["spec"])
    return jsonschema.Draft7Validator(crd["spec"])


def _cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _groups(manifest: dict) -> list[tuple[str, int, dict]]:
    """(role, pods, container) of the head and of every worker group."""
    cluster = _cluster_spec(manifest)
    out = [("head", 1, c) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for g in cluster["workerGroupSpecs"]:
        out += [(g["groupName"], g["replicas"], c) for c in g["template"]["spec"]["containers"]]
    return out


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    limit = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
    assert limit == int(res.get("requests", {}).get("nvidia.com/gpu", limit)), "GPU request != limit"
    return limit


def _cpus(container: dict) -> float:
    return float(container["resources"]["requests"]["cpu"])


def _worker_gpus(manifest: dict) -> int:
    return sum(pods * _gpus(c) for role, pods, c in _groups(manifest) if role != "head")


def _head_gpus(manifest: dict) -> int:
    return sum(_gpus(c) for role, _, c in _groups(manifest) if role == "head")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _mlflow_service_uri() -> str:
    docs = list(yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text()))
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (port,) = svc["spec"]["ports"]
    return f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port['port']}"


# ---------------------------------------------------------------- schemas


def test_launcher_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((CLUSTERS / "aws-h100.yaml").read_text())
    jsonschema.validate(launcher, schema)
    broken = dict(launcher, head_start_ray_commands="ray start --head")  # a string, not a list
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_validates_against_the_crd_schema(name):
    manifest = _load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["metadata"]["name"]
    validator = _crd_validator(manifest["kind"])
    validator.validate(manifest["spec"])
    if manifest["kind"] == "RayJob":
        # The schema itself catches what kubectl would refuse (here: a replica count as a string).
        bad = json.loads(json.dumps(manifest["spec"]))
        bad["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"
        with pytest.raises(jsonschema.ValidationError, match="'2' is not of type 'integer'"):
            validator.validate(bad)


def test_every_job_has_a_rayjob_and_serve_a_rayservice():
    jobs = {p.stem for p in (REPO / "jobs").glob("*.py")}
    # demo: an alias of the pipeline's demo preset (rayjob-pipeline.yaml); report: reads a finished run
    # dir on the shared volume and starts no Ray (the pipeline's last stage writes it on the cluster)
    assert jobs - {"serve", "demo", "report"} <= set(RAYJOBS.values()), "a job without a RayJob"
    on_disk = {p.name for p in KUBERAY.glob("ray*.yaml")}
    assert on_disk == set(MANIFESTS), "a manifest this test does not know (add it to RAYJOBS)"
    assert _load(RAYSERVICE)["kind"] == "RayService"


# ---------------------------------------------------------------- one cluster shape, kept in step


@pytest.mark.parametrize("name", [*RAYJOBS, RAYSERVICE])
def test_every_cluster_shares_the_long_lived_clusters_pod_shape(name):
    """Each RayJob brings up its own cluster sized for its job; image, environment, shared volume and
    Ray version are those of raycluster-h100.yaml (the CPU image only for the CPU pipeline)."""
    reference = _load("raycluster-h100.yaml")
    (ref_head,) = [c for role, _, c in _groups(reference) if role == "head"]
    manifest = _load(name)
    assert _cluster_spec(manifest)["rayVersion"] == _cluster_spec(reference)["rayVersion"] == ray.__version__
    head_start = _cluster_spec(manifest)["headGroupSpec"]["rayStartParams"]
    assert head_start["num-cpus"] == "0", "the head runs the driver, no Ray tasks"
    images = set()
    for role, _, container in _groups(manifest):
        images.add(container["image"])
        env = _env(container)
        for key in ("HF_TOKEN", "HF_HOME", "BT_RAY_DATA_DIR", "MLFLOW_TRACKING_URI"):
            assert env[key] == _env(ref_head)[key], f"{role}: {key}"
        assert {"name": "shared", "mountPath": SHARED} in container["volumeMounts"]
        if role != "head" or _gpus(container):
            assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"]) or role == "head"
    assert len(images) == 1 and images <= IMAGES, images
    gpu_image = images == {"<REGISTRY>/bt-ray:cuda"}
    assert gpu_image == (_worker_gpus(manifest) + _head_gpus(manifest) > 0), "GPUs need the CUDA image"
    if _head_gpus(manifest):
        assert head_start.get("num-gpus") == "0", "the head's GPU is the driver's, not Ray's"
    for pod in [_cluster_spec(manifest)["headGroupSpec"], *_cluster_spec(manifest)["workerGroupSpecs"]]:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"bt-ray-shared"}
        containers = pod["template"]["spec"]["containers"]
        if any(_gpus(c) for c in containers):
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                pod["template"]["spec"]["tolerations"]


# ---------------------------------------------------------------- entrypoints: real files, configs that load


def _entrypoint_argv(manifest: dict) -> list[str]:
    words = shlex.split(manifest["spec"]["entrypoint"])
    assert words[:3] == ["cd", APP, "&&"], "the entrypoint runs from the image's checkout"
    assert words[3] == "python"
    return words[4:]


def _job_cfg(name: str, monkeypatch):
    """(job name, config) of a RayJob's entrypoint, parsed by the job's own ``parse_args``."""
    argv = _entrypoint_argv(_load(name))
    script, args = argv[0], argv[1:]
    assert (REPO / script).is_file(), f"{script} does not exist"
    assert args[0] == "--config" and (REPO / args[1]).is_file(), f"config {args[1]} does not exist"
    monkeypatch.chdir(REPO)  # relative paths resolve as in /app
    job = runpy.run_path(str(REPO / script))
    return Path(script).stem, job["parse_args"](args)


def _outputs(job: str, cfg) -> list[str]:
    if job in ("sft", "dpo"):
        return [cfg.run.root]
    if job == "onpolicy":
        return [cfg.out]
    return [cfg.run_dir]


@pytest.mark.parametrize("name", RAYJOBS)
def test_entrypoint_runs_a_real_job_whose_config_loads_with_its_overrides(name, monkeypatch):
    job, cfg = _job_cfg(name, monkeypatch)
    assert job == RAYJOBS[name]
    for path in _outputs(job, cfg):  # checkpoints, results and models outlive the RayJob's pods
        assert str(path).startswith(SHARED + "/"), f"{name}: output {path} is not on the shared volume"
    if hasattr(cfg, "ray_num_cpus"):  # the driver joins the RayJob's cluster: ray.init refuses num_cpus
        assert cfg.ray_num_cpus is None, f"{name}: ray_num_cpus must be null on a cluster"
    for model in getattr(cfg, "models", ()):
        assert model.startswith(SHARED + "/"), f"{name}: model {model} is not on the shared volume"


# ---------------------------------------------------------------- GPUs: what each job asks Ray for


def test_sft_and_dpo_clusters_have_one_gpu_per_training_worker_and_one_for_the_driver(monkeypatch):
    for name in ("rayjob-sft-llama3-8b.yaml", "rayjob-dpo-llama3-8b.yaml"):
        manifest = _load(name)
        _, cfg = _job_cfg(name, monkeypatch)
        assert cfg.scaling.use_gpu
        assert _worker_gpus(manifest) == cfg.scaling.num_workers
        per_pod = [(pods, c) for role, pods, c in _groups(manifest) if role != "head"]
        for _, c in per_pod:  # the workers a pod holds get their CPUs
            assert _cpus(c) >= _gpus(c) * cfg.scaling.cpus_per_worker
        # The driver labels rows with Llama Guard 2 in its own process when it builds them.
        driver_judge = cfg.data.path is None and cfg.data.judge_filter == "judge"
        assert _head_gpus(manifest) == int(driver_judge), name


@pytest.mark.parametrize("name", ["rayjob-sweep-paper-sft.yaml", "rayjob-sweep-paper-dpo.yaml"])
def test_sweep_cluster_fits_a_trial_and_trials_read_prebuilt_rows(name, monkeypatch):
    from bt_ray.tune.grid import trial_configs
    from bt_ray.tune.resources import concurrency, trial_resources

    manifest = _load(name)
    _, cfg = _job_cfg(name, monkeypatch)
    jobs, _ = trial_configs(cfg)
    have = {"GPU": _worker_gpus(manifest),
            "CPU": sum(pods * _cpus(c) for role, pods, c in _groups(manifest) if role != "head")}
    assert concurrency(cfg, jobs, have) == 1  # one paper-scale trial at a time, on the whole cluster
    assert max(trial_resources(cfg, j)["GPU"] for j in jobs.values()) == have["GPU"]
    for job in jobs.values():  # a trial's function holds no GPU: it cannot run Llama Guard 2 itself
        assert job.data.path and job.data.path.startswith(SHARED + "/")
    assert _head_gpus(manifest) == 0


def test_eval_cluster_has_the_generation_and_judge_gpus(monkeypatch):
    manifest = _load("rayjob-eval-paper.yaml")
    _, cfg = _job_cfg("rayjob-eval-paper.yaml", monkeypatch)
    e = cfg.engine
    judge = e.num_gpus_per_actor if cfg.judge.safety == "llama-guard-2" else 0  # as eval.pipeline.run_passes
    assert judge == 1.0
    assert _worker_gpus(manifest) == e.num_actors * e.num_gpus_per_actor + judge == 2
    assert _head_gpus(manifest) == 0


def test_attack_cluster_runs_whole_behaviours_on_its_gpus(monkeypatch):
    manifest = _load("rayjob-attack-paper.yaml")
    _, cfg = _job_cfg("rayjob-attack-paper.yaml", monkeypatch)
    gpus = _worker_gpus(manifest)
    assert cfg.attack.num_gpus == 1 and gpus % cfg.attack.num_gpus == 0 and gpus >= cfg.attack.num_gpus
    in_parallel = gpus // cfg.attack.num_gpus
    cpus = sum(pods * _cpus(c) for role, pods, c in _groups(manifest) if role != "head")
    assert cpus >= in_parallel * cfg.attack.num_cpus


def test_pipeline_is_the_cpu_chain_of_the_demo_preset(monkeypatch):
    manifest = _load("rayjob-pipeline.yaml")
    job, cfg = _job_cfg("rayjob-pipeline.yaml", monkeypatch)
    assert job == "pipeline" and cfg.preset == "demo"
    from bt_ray.train.config import DPOJobCfg, SFTJobCfg

    for cls, path in [(SFTJobCfg, cfg.sft_config), (DPOJobCfg, cfg.dpo_config)]:
        assert not config.load(cls, REPO / path).scaling.use_gpu
    assert _worker_gpus(manifest) == _head_gpus(manifest) == 0


# ---------------------------------------------------------------- MLflow: every job tracks to the Service


def _store_of(name: str, cfg, job: str) -> str:
    if job in ("sft", "dpo"):
        return tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.run.root)
    if job == "sweep":
        from bt_ray.tune.grid import trial_configs

        return trial_configs(cfg)[1]
    return tracking.resolve_tracking_uri(None, cfg.run_dir)  # eval, attack, the demo chain


@pytest.mark.parametrize("name", RAYJOBS)
def test_every_job_tracks_to_the_mlflow_service(name, monkeypatch):
    """With the head's MLFLOW_TRACKING_URI, the job resolves its store to the Service of mlflow.yaml (a
    URI hard-coded in a job config would win over the variable: the entrypoints null it)."""
    service = _mlflow_service_uri()
    manifest = _load(name)
    (head,) = [c for role, _, c in _groups(manifest) if role == "head"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _env(head)["MLFLOW_TRACKING_URI"]["value"])
    job, cfg = _job_cfg(name, monkeypatch)
    if job != "onpolicy":  # the on-policy step logs no MLflow run: its summary.json lies beside its output
        assert _store_of(name, cfg, job) == service
    for _, _, container in _groups(manifest):
        assert _env(container)["MLFLOW_TRACKING_URI"]["value"] == service


def test_mlflow_deployment_serves_the_service_with_a_postgres_store_and_s3_artifacts():
    from mlflow.server.security_utils import is_allowed_host_header

    docs = {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text())}
    deploy, svc = docs["Deployment"], docs["Service"]
    namespace = docs["Namespace"]["metadata"]["name"]
    assert svc["metadata"]["namespace"] == deploy["metadata"]["namespace"] == namespace
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] in IMAGES
    assert container["workingDir"] == APP and container["command"] == ["clusters/mlflow-server.sh"]
    assert (CLUSTERS / "mlflow-server.sh").is_file()
    env = _env(container)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    (port,) = svc["spec"]["ports"]
    (cport,) = container["ports"]
    assert port["targetPort"] == cport["name"] and int(env["MLFLOW_PORT"]["value"]) == cport["containerPort"]
    assert env["MLFLOW_HOST"]["value"] == "0.0.0.0"
    # The Host header the jobs send (the Service's name) passes MLflow's own host check, and so do probes.
    allowed = env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")
    assert is_allowed_host_header(allowed, urlparse(_mlflow_service_uri()).netloc)
    assert is_allowed_host_header(allowed, "10.1.2.3:5000")
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


# ---------------------------------------------------------------- the launcher's MLflow server


def _alive(pid: int) -> bool:
    """Running (a killed child not yet reaped by its new parent is a zombie: not alive)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\tZ" not in next(line for line in status.splitlines() if line.startswith("State:"))


def test_launcher_head_starts_the_mlflow_server_and_every_node_points_ray_at_it(tmp_path):
    """The head command, run by bash with a stand-in server script: it gets the store and artifact
    settings, keeps running in the background, and a second ``ray up`` replaces it (no port clash)."""
    launcher = yaml.safe_load((CLUSTERS / "aws-h100.yaml").read_text())
    (command,) = [c for c in launcher["head_start_ray_commands"] if "mlflow-server.sh" in c]
    assert "nohup" in command
    fake = tmp_path / "bt-ray" / "clusters" / "mlflow-server.sh"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\nenv > "$HOME/server-env.$$"\nexec sleep 60\n')
    fake.chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    pids = []
    try:
        for _ in range(2):
            subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
            pids.append(int((tmp_path / "mlflow-server.pid").read_text()))
            deadline = time.monotonic() + 10
            while not (tmp_path / f"server-env.{pids[-1]}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert not _alive(pids[0]), "the first server was not stopped"
        assert _alive(pids[1])
        lines = (tmp_path / f"server-env.{pids[1]}").read_text().splitlines()
        seen = dict(line.split("=", 1) for line in lines if "=" in line)
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    assert seen["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert seen["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert seen["MLFLOW_HOST"] == "0.0.0.0"
    port = seen["MLFLOW_PORT"]
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    ray_starts = [c for c in starts if c.split()[-1] != "stop" and "ray start" in c]
    assert len(ray_starts) == 2
    for c in ray_starts:  # the drivers and training workers inherit Ray's environment
        assert c.startswith("MLFLOW_TRACKING_URI=http://") and f":{port} ray start" in " ".join(c.split())
    assert "$RAY_HEAD_IP:" + port in launcher["worker_start_ray_commands"][-1]


# ---------------------------------------------------------------- the RayService


def _serve_config() -> dict:
    from ray.serve.schema import ServeDeploySchema

    text = _load(RAYSERVICE)["spec"]["serveConfigV2"]
    ServeDeploySchema.model_validate(yaml.safe_load(text))  # Serve's own schema for a config deploy
    return yaml.safe_load(text)


def _local_args(args: dict) -> dict:
    return dict(args, config=str(REPO / Path(args["config"]).relative_to(APP)))


def test_rayservice_import_path_builds_the_serve_app_as_the_job_does(monkeypatch):
    """Serve's own loader imports the builder and calls it with the manifest's args (no Serve started);
    the app is the one jobs/serve.py deploys for the same config and overrides."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from bt_ray.serve.app import build_app
    from bt_ray.serve.config import ServeCfg

    serve_cfg = _serve_config()
    (application,) = serve_cfg["applications"]
    assert serve_cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    builder = import_attr(application["import_path"])
    args = _local_args(application["args"])
    monkeypatch.setenv("BT_RAY_API_KEY", "k")
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    cfg = app._bound_deployment.init_args[0]
    expected = config.load(ServeCfg, args["config"], args["overrides"])
    assert cfg == expected and cfg.model.name.startswith(SHARED + "/")
    reference = build_app(expected)._bound_deployment
    deployment = app._bound_deployment
    assert deployment._deployment_config == reference._deployment_config
    assert deployment.ray_actor_options == reference.ray_actor_options
    assert deployment._deployment_config.health_check_period_s == 10
    # Replicas: at most max_replicas x num_gpus GPUs, which the worker group has.
    a = cfg.deployment.autoscaling
    assert a.enabled and _worker_gpus(_load(RAYSERVICE)) == a.max_replicas * cfg.deployment.num_gpus
    # The key the replicas check is the one from the pods' secret.
    for _, _, container in _groups(_load(RAYSERVICE)):
        assert _env(container)["BT_RAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "bt-ray-api-key"


def test_rayservice_model_dir_change_is_a_new_app_and_bad_args_fail_naming_the_field(monkeypatch):
    from bt_ray.serve.rayservice import app

    (application,) = _serve_config()["applications"]
    args = _local_args(application["args"])
    monkeypatch.setenv("BT_RAY_API_KEY", "k")
    new = dict(args, overrides=[*args["overrides"], "model.name=/mnt/shared/bt-ray/runs/v2/model"])
    assert app(new)._bound_deployment.init_args[0].model.name == "/mnt/shared/bt-ray/runs/v2/model"
    with pytest.raises(config.ConfigError) as e:
        app({"config": args["config"], "overrides": "model.name=x", "extra": 1})
    assert e.value.errors == [
        "args.extra: unknown argument (expected config, overrides)",
        "args.overrides: must be a list of dotted key=value strings, got 'model.name=x'",
    ]
    with pytest.raises(config.ConfigError, match="deployment.num_gpuz"):
        app(dict(args, overrides=["deployment.num_gpuz=1"]))
    monkeypatch.delenv("BT_RAY_API_KEY")
    with pytest.raises(config.ConfigError, match="BT_RAY_API_KEY"):
        app(args)
