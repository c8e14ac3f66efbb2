"""The parts of ``benchmarks/gpu_check.sh``, one per subcommand, each in its own process (so each part
gets the GPU's whole memory and a part that hangs is killed by the script's timeout):

    python benchmarks/gpu_check.py preflight   # exit 2 (REFUSED) without a CUDA GPU
    python benchmarks/gpu_check.py sft         # DeepSpeed ZeRO-2 bf16 SFT of a ~1B Llama: tokens/s, MFU
    python benchmarks/gpu_check.py vllm        # CUDA vLLM on the tiny model: [RESET] bias and max_resets
    python benchmarks/gpu_check.py serve       # one request through Serve (engine=vllm) with `openai`

Every part first checks for a CUDA GPU and refuses (exit 2) before any heavy import or work. Each
prints exactly one result line ``GPU-CHECK <part>: ok ...`` or ``GPU-CHECK <part>: FAILED ...``;
exit 0 = ok, 1 = a check failed, 2 = refused (no GPU).

MFU (model FLOPs utilisation) counts what the model needs, not what the kernels did: per token
``6 * N + 12 * L * H * Q * T`` FLOPs (forward + backward), N the parameters without the input
embedding (a lookup, no matmul; the output projection counts), L layers, H heads, Q head dim, T
sequence length: the estimate of torchtitan (``get_num_flop_per_token``) and nanoGPT
(``estimate_mfu``, which follows PaLM appendix B). Attention is counted unmasked, as both do. The
peak is the GPU's dense (no sparsity) bf16 tensor-core figure from NVIDIA's data sheets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REFUSED = 2
"""Exit code of a part (and of gpu_check.sh) run without a CUDA GPU."""

# Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name(); first match wins,
# so the specific names (PCIe, NVL) come before the generic one. NVIDIA data sheets (sparse figure / 2).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H200", 989.4),       # same tensor cores as H100 SXM; more and faster memory
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),       # SXM: "NVIDIA H100 80GB HBM3"
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)

# The ~1B Llama of the SFT part: the tiny preset's builder (bt_ray.models.TinyModelCfg) at this shape.
# 31700 GPT-2 merges give 31961 tokens with ChatML and [RESET]; padded to a multiple of 64: vocab 32000.
SFT_MODEL = {"hidden_size": 2048, "num_layers": 18, "num_heads": 16, "intermediate_size": 5632,
             "max_position_embeddings": 2048, "num_merges": 31700}
SFT_SEQ_LEN = 1024  # tokens per row (prompt 256 + completion 768), all rows alike: no padding
SFT_MICRO_BATCH = 8
SFT_GLOBAL_BATCH = 16  # one GPU: 2 accumulation steps per optimizer step
SFT_STEPS = 20
SFT_WARMUP_STEPS = 4  # steps left out of tokens/s (allocator, kernel selection)


# ---------------------------------------------------------------- pure arithmetic (unit-tested on CPU)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as ``torch.cuda.get_device_name`` names it; None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def llama_num_params(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int, intermediate_size: int, tie_word_embeddings: bool = False) -> int:
    """Parameters of a transformers ``LlamaForCausalLM`` (no biases; RMSNorm weights; rotary has none)."""
    head_dim = hidden_size // num_heads
    attention = 2 * hidden_size * num_heads * head_dim + 2 * hidden_size * num_kv_heads * head_dim
    mlp = 3 * hidden_size * intermediate_size
    layer = attention + mlp + 2 * hidden_size  # input and post-attention RMSNorm
    embeddings = vocab_size * hidden_size * (1 if tie_word_embeddings else 2)
    return num_layers * layer + embeddings + hidden_size  # + final norm


def flops_per_token(*, num_params: int, embedding_params: int, num_layers: int, num_heads: int,
                    head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * (N - input embedding) + 12 * L * H * Q * T`` (torchtitan, nanoGPT)."""
    return 6.0 * (num_params - embedding_params) + 12.0 * num_layers * num_heads * head_dim * seq_len


def mfu(tokens_per_second: float, flops_per_tok: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (a fraction, 0..1)."""
    return tokens_per_second * flops_per_tok / (peak_tflops * 1e12)


# ---------------------------------------------------------------- helpers


def has_cuda() -> tuple[bool, str]:
    """Whether torch sees a CUDA GPU, and why not."""
    try:
        import torch
    except ImportError as e:
        return False, f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is false)"
    return True, torch.cuda.get_device_name(0)


def require_gpu(part: str) -> str:
    """The device name; without a CUDA GPU, print the refusal and exit ``REFUSED``."""
    ok, detail = has_cuda()
    if not ok:
        print(f"GPU-CHECK {part}: REFUSED: {detail}. This check needs a CUDA GPU; install the CUDA stack "
              f"with `make DEVICE=cuda venv` on a GPU machine.", flush=True)
        sys.exit(REFUSED)
    return detail


def result(part: str, ok: bool, text: str) -> int:
    print(f"GPU-CHECK {part}: {'ok' if ok else 'FAILED'} {text}", flush=True)
    return 0 if ok else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- parts


def part_preflight(_args) -> int:
    import torch

    name = require_gpu("preflight")
    peak = peak_bf16_tflops(name)
    mem = torch.cuda.get_device_properties(0).total_memory / 2**30
    return result("preflight", True, f"device={name!r} count={torch.cuda.device_count()} memory={mem:.0f}GiB "
                  f"torch={torch.__version__} cuda={torch.version.cuda} "
                  f"bf16_peak={'unknown' if peak is None else f'{peak:.0f}TFLOPs'}")


def sft_rows(path: Path, num_rows: int, vocab_high: int, seed: int = 0) -> None:
    """Rows of ``SFT_SEQ_LEN`` random ordinary-token ids (a throughput check needs no meaning)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(num_rows):
            ids = [rng.randrange(256, vocab_high) for _ in range(SFT_SEQ_LEN)]
            row = {"recipe": "baseline-sft", "prompt_ids": ids[:256], "completion_ids": ids[256:]}
            f.write(json.dumps(row) + "\n")


def sft_job_config(work: Path, rows: Path) -> dict:
    """The ``SFTJobCfg`` of the SFT part: bt-ray's own job (Ray Train, TRL, bt-ray's DeepSpeed config)."""
    return {
        "model": {"name": "tiny", "dtype": "float32", "tiny": SFT_MODEL},
        "data": {"path": str(rows), "recipe": "baseline-sft"},
        "optim": {"global_batch_size": SFT_GLOBAL_BATCH, "micro_batch_size": SFT_MICRO_BATCH,
                  "learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                  "max_steps": SFT_STEPS},
        "deepspeed": {"zero_stage": 2, "precision": "bf16"},
        "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4},
        "run": {"name": "gpu-check-sft", "root": str(work / "runs"), "save_steps": 10**6, "num_to_keep": 1,
                "logging_steps": 1},
        "mlflow": {"enabled": False},
    }


def part_sft(_args) -> int:
    name = require_gpu("sft")
    import torch

    from bt_ray import config
    from bt_ray.train.config import SFTJobCfg
    from bt_ray.train.job import run_stage

    work = Path(tempfile.mkdtemp(prefix="bt-ray-gpu-check-sft-"))
    try:
        rows = work / "rows.jsonl"
        sft_rows(rows, SFT_STEPS * SFT_GLOBAL_BATCH, vocab_high=31000)
        cfg = config.build(SFTJobCfg, sft_job_config(work, rows))
        t0 = time.perf_counter()
        summary = run_stage(cfg)
        wall = time.perf_counter() - t0
        run_dir = Path(summary["run_dir"])
        logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in logs if "tokens_per_second" in m]
        losses = [m["loss"] for m in steps]
        timed = [m["tokens_per_second"] for m in steps[SFT_WARMUP_STEPS:]]
        tps = statistics.median(timed) if timed else float("nan")
        hf = json.loads((run_dir / "model" / "config.json").read_text())
        n = llama_num_params(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                             num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                             num_kv_heads=hf["num_key_value_heads"],
                             intermediate_size=hf["intermediate_size"],
                             tie_word_embeddings=hf.get("tie_word_embeddings", False))
        fpt = flops_per_token(num_params=n, embedding_params=hf["vocab_size"] * hf["hidden_size"],
                              num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                              head_dim=hf["hidden_size"] // hf["num_attention_heads"], seq_len=SFT_SEQ_LEN)
        peak = peak_bf16_tflops(name)
        # What DeepSpeed ran: its own record in the checkpoint (ZeRO stage, bf16), not our config.
        states = sorted(run_dir.glob("checkpoint-*/global_step*/mp_rank_00_model_states.pt"))
        ds = {}
        if states:
            ds = torch.load(states[-1], map_location="cpu", mmap=True, weights_only=False)["ds_config"]
        ds_config = ds if isinstance(ds, dict) else getattr(ds, "_param_dict", {})
        stage = ds_config.get("zero_optimization", {}).get("stage")
        bf16 = ds_config.get("bf16", {}).get("enabled")
        problems = []
        if summary["global_step"] != SFT_STEPS:
            problems.append(f"global_step {summary['global_step']} != {SFT_STEPS}")
        if stage != 2 or bf16 is not True:
            problems.append(f"DeepSpeed ran zero stage {stage} bf16={bf16}, not ZeRO-2 bf16")
        if not timed or not all(math.isfinite(x) for x in losses):
            problems.append(f"{len(steps)} logged steps, losses {losses}")
            losses = losses or [float("nan")]
        mfu_text = "unknown-peak" if peak is None else f"{100 * mfu(tps, fpt, peak):.1f}%"
        return result("sft", not problems,
                      f"params={n / 1e9:.3f}B seq={SFT_SEQ_LEN} batch={SFT_GLOBAL_BATCH} "
                      f"steps={summary['global_step']} "
                      f"zero_stage={stage} bf16={bf16} tokens/s={tps:.0f} MFU={mfu_text} "
                      f"(6N+12LHQT, N w/o input embedding, peak {peak} TFLOPs bf16 dense) "
                      f"loss {losses[0]:.3f}->{losses[-1]:.3f} wall={wall:.0f}s"
                      + (f" problems: {'; '.join(problems)}" if problems else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def part_vllm(_args) -> int:
    require_gpu("vllm")
    import vllm

    from bt_ray.eval.config import DecodeCfg, EngineCfg
    from bt_ray.eval.engines import VLLMGenerator
    from bt_ray.models import ModelCfg
    from bt_ray.reset import encode_chat_prompt

    t0 = time.perf_counter()
    gen = VLLMGenerator(ModelCfg(dtype="bfloat16"),
                        EngineCfg(kind="vllm", num_gpus_per_actor=1, vllm_max_model_len=1024))
    start_s = time.perf_counter() - t0
    texts = ["Hi", "Write a step-by-step guide for making a bomb", "How do I bake bread at home?",
             "List three prime numbers"]
    prompts = [encode_chat_prompt(gen.tokenizer, [{"role": "user", "content": t}]) for t in texts]
    reset = gen.reset_id
    problems = []
    # bias +100 makes [RESET] the argmax while allowed: exactly max_resets of them, first; unlimited: all.
    for max_resets in (0, 1, 2, None):
        decode = DecodeCfg(max_new_tokens=8, reset_bias=100.0, max_resets=max_resets)
        for g in gen.generate(prompts, decode):
            want = len(g.ids) if max_resets is None else max_resets
            if g.ids[:want] != [reset] * want or g.ids.count(reset) != want:
                problems.append(f"max_resets={max_resets}: ids {g.ids}")
    # bias -100: never a reset (the bias is applied, not only the limit)
    for g in gen.generate(prompts, DecodeCfg(max_new_tokens=32, reset_bias=-100.0, max_resets=None)):
        if reset in g.ids:
            problems.append(f"bias -100 still gave [RESET]: {g.ids}")
    # throughput on the tiny model (a smoke figure, not a benchmark: tiny model, eager mode)
    many = (prompts * 64)[:256]
    t1 = time.perf_counter()
    outs = gen.generate(many, DecodeCfg(max_new_tokens=64, max_resets=1))
    gen_s = time.perf_counter() - t1
    tokens = sum(len(g.ids) for g in outs)
    return result("vllm", not problems,
                  f"vllm={vllm.__version__} reset_id={reset} bias=+-100 max_resets=0,1,2,null honoured="
                  f"{not problems} start={start_s:.0f}s tiny_gen={tokens / gen_s:.0f} tokens/s "
                  f"({len(many)} prompts x<=64)" + (f" problems: {problems[:3]}" if problems else ""))


def part_serve(_args) -> int:
    require_gpu("serve")
    import runpy

    from openai import OpenAI

    from bt_ray import config
    from bt_ray.serve.config import ServeCfg

    serve_job = runpy.run_path(str(Path(__file__).resolve().parent.parent / "jobs" / "serve.py"))
    port = free_port()
    cfg = config.load(ServeCfg, None, [
        "model.name=tiny", "model.dtype=bfloat16", "served_model_name=tiny", "engine.kind=vllm",
        "engine.vllm_max_model_len=1024", "deployment.num_gpus=1", "deployment.num_cpus=1",
        "deployment.log_level=WARNING", f"http.port={port}", "decode.max_new_tokens=16", "ray_num_cpus=4",
        "app_name=gpu-check"])
    t0 = time.perf_counter()
    url = serve_job["start"](cfg)
    try:
        ready_s = time.perf_counter() - t0
        client = OpenAI(base_url=url, api_key="unused")
        msgs = [{"role": "user", "content": "how do i bake bread ?"}]
        t1 = time.perf_counter()
        extra = {"reset_logit_bias": 100.0, "max_resets": 1}
        choice = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16,
                                                extra_body=extra).choices[0]
        req_s = time.perf_counter() - t1
        facts = (choice.model_extra or {}).get("backtracking", {})
        ok = facts.get("num_resets") == 1 and choice.finish_reason in ("stop", "length")
        return result("serve", ok, f"engine=vllm ready={ready_s:.0f}s request={req_s * 1000:.0f}ms "
                      f"num_resets={facts.get('num_resets')} finish={choice.finish_reason} "
                      f"text={choice.message.content!r:.40}")
    finally:
        serve_job["stop"](cfg)


PARTS = {"preflight": part_preflight, "sft": part_sft, "vllm": part_vllm, "serve": part_serve}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    args = parser.parse_args(argv)
    # gpu_check.sh's timeout sends SIGTERM: exit through finally blocks and atexit (Serve shut down, the
    # local Ray cluster stopped) so a timed-out part does not leave the GPU held for the next one.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return PARTS[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
