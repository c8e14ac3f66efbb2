"""Running on a cluster: the git sha reaches a submitted job, run.root is a shared POSIX path, and the
KubeRay head (where the driver runs) gets the hub token and data paths."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest
import yaml

from bt_ray import config
from bt_ray.config import ConfigError
from bt_ray.train.config import DPOJobCfg, SFTJobCfg
from tests.conftest import REPO


def _config_module_outside_git(tmp_path):
    """bt_ray/config.py loaded from a copy outside any git tree, as in a ``ray job submit`` upload."""
    copy = tmp_path / "uploaded" / "bt_ray" / "config.py"
    copy.parent.mkdir(parents=True)
    copy.write_text((REPO / "bt_ray" / "config.py").read_text())
    spec = importlib.util.spec_from_file_location("uploaded_bt_ray_config", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_git_sha_comes_from_the_environment_outside_a_git_tree(tmp_path, monkeypatch):
    uploaded = _config_module_outside_git(tmp_path)
    monkeypatch.delenv("BT_RAY_GIT_SHA", raising=False)
    assert uploaded.git_sha() == "unknown"  # what a submitted job recorded before
    monkeypatch.setenv("BT_RAY_GIT_SHA", "0123abc+dirty")
    assert uploaded.git_sha() == "0123abc+dirty"
    assert config.git_sha() == "0123abc+dirty"  # the env var wins inside a git tree too


def test_submit_script_passes_the_checkouts_git_sha_to_the_job(tmp_path):
    """clusters/submit.sh hands ray the checkout's sha, "+dirty" once a tracked file changes (in a
    throwaway repo with a known commit; a stand-in ``ray`` prints its arguments)."""
    repo = tmp_path / "checkout"
    (repo / "clusters").mkdir(parents=True)
    shutil.copy(REPO / "clusters" / "submit.sh", repo / "clusters" / "submit.sh")
    (repo / "README").write_text("v1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    sha = subprocess.run([*git, "log", "-1", "--format=%H"], capture_output=True, text=True,
                         check=True).stdout.strip()
    fake_ray = tmp_path / "ray"
    fake_ray.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_ray.chmod(0o755)

    def submit() -> list[str]:
        return subprocess.run(
            [str(repo / "clusters" / "submit.sh"), "--address", "http://head:8265", "--",
             "python", "jobs/sft.py", "--config", "jobs/configs/sft_llama3_8b.yaml"],
            cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "RAY": str(fake_ray)},
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()

    args = submit()
    assert args[:4] == ["job", "submit", "--working-dir", "."]
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    assert ".git" in runtime_env["excludes"] and ".venv" in runtime_env["excludes"]
    assert runtime_env["env_vars"]["BT_RAY_GIT_SHA"] == sha
    assert args[args.index("--"):] == ["--", "python", "jobs/sft.py", "--config",
                                       "jobs/configs/sft_llama3_8b.yaml"]
    (repo / "README").write_text("v2\n")
    args = submit()
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["BT_RAY_GIT_SHA"] == sha + "+dirty"


@pytest.mark.parametrize("cls", [SFTJobCfg, DPOJobCfg])
@pytest.mark.parametrize("root", ["s3://bucket/runs", "gs://bucket/runs", "hdfs://nn/runs",
                                  "abfs://c@acct.dfs.core.windows.net/runs", "file:///mnt/shared/runs"])
def test_run_root_must_be_a_posix_path_not_a_bucket_uri(cls, root):
    with pytest.raises(ConfigError) as e:
        config.load(cls, None, [f"run.root={root}"])
    assert len(e.value.errors) == 1
    assert e.value.errors[0].startswith("override run.root must be a non-empty path on a shared POSIX "
                                        "filesystem (NFS, EFS, a PVC), not a URI")
    assert config.load(cls, None, ["run.root=/mnt/shared/bt-ray/runs"]).run.root == "/mnt/shared/bt-ray/runs"


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


@pytest.mark.parametrize("manifest", ["kuberay/rayjob-sft-llama3-8b.yaml", "kuberay/raycluster-h100.yaml"])
def test_kuberay_head_gets_the_hub_token_and_data_paths(manifest):
    """The driver runs on the head and loads gated tokenizers and hub data before any worker starts."""
    spec = yaml.safe_load((REPO / "clusters" / manifest).read_text())["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    (head,) = _containers(cluster["headGroupSpec"])
    head_env = {e["name"]: e for e in head["env"]}
    assert {"HF_TOKEN", "HF_HOME", "BT_RAY_DATA_DIR"} <= set(head_env)
    for group in cluster["workerGroupSpecs"]:
        for worker in _containers(group):
            worker_env = {e["name"]: e for e in worker["env"]}
            assert head_env["HF_TOKEN"] == worker_env["HF_TOKEN"]  # the same secret
            for name in ("HF_HOME", "BT_RAY_DATA_DIR"):
                assert head_env[name] == worker_env[name]
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    for name in ("HF_HOME", "BT_RAY_DATA_DIR"):  # on the shared volume, so every node sees one copy
        assert any(head_env[name]["value"].startswith(m) for m in mounts)
