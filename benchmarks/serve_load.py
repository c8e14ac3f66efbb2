"""The serving stack under load, on loopback: Ray Serve + the bt-ray app (tiny model, HF engine).

Run as:
    python benchmarks/serve_load.py                       # the full run (a few minutes on 2 cores)
    python benchmarks/serve_load.py --soak-requests 200   # a quick look

Bounded in count (every phase has a fixed number of requests) and in time (``--phase-timeout-s``: no
request starts after it; a phase cut short says so and fails its goal). Clients: the ``openai``
package's ``AsyncOpenAI`` (one httpx connection pool, no retries, a timeout per request), chat
completions, greedy, ``--max-tokens`` tokens. Lines printed (goals from issue 9):
  * throughput (requests/s, generated tokens/s) at 1 and 16 concurrent clients and
    ``ratio concurrency-16/concurrency-1`` (goal >= 4: Serve's dynamic batching at work);
  * p50 / p99 latency (non-streaming) and time to first kept token (streaming: the first content
    chunk not retracted later by a reset event), at 1 and 16 clients;
  * ``ratio serve-overhead-p50-ms``: p50 latency through HTTP + Serve minus p50 of the same requests on
    the same engine in this process (``HFStreamEngine.stream``, same torch threads as the replica)
    (goal <= 15 ms);
  * a soak at 16 clients (goal: 0 5xx; other errors counted too).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import runpy
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bt_ray import config
from bt_ray.serve.config import ServeCfg

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "How do I bake bread at home?",
    "Explain why the sky is blue.",
    "Write a short poem about rivers.",
    "What is the capital of France?",
    "Give me three tips for learning to code.",
    "Summarise the plot of a detective story.",
    "How does a bicycle stay upright?",
    "Name a few uses of copper.",
]


@dataclass
class Result:
    latency_s: float
    tokens: int = 0
    ttfkt_s: float | None = None
    status: str = "ok"
    """ok, 5xx (an HTTP 5xx or an error event in a 200 stream), or error (4xx, connection, timeout)."""
    detail: str = ""


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


async def one_request(client, i: int, max_tokens: int, stream: str | None, timeout_s: float) -> Result:
    """One chat request; ``stream``: None (JSON), or the stream mode (hold, retract)."""
    import openai

    messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    start = time.perf_counter()
    try:
        if not stream:
            out = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                       temperature=0.0, timeout=timeout_s)
            return Result(time.perf_counter() - start, tokens=out.usage.completion_tokens)
        kept: list[float] = []  # arrival times of content chunks not (yet) retracted
        tokens = 0
        response = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"stream_mode": stream}, timeout=timeout_s)
        async for chunk in response:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                extra = (choice.model_extra or {}).get("backtracking") or {}
                if extra.get("event") == "reset":
                    kept.clear()  # what came before the reset is retracted
                elif choice.delta.content:
                    kept.append(time.perf_counter() - start)
        return Result(time.perf_counter() - start, tokens=tokens, ttfkt_s=kept[0] if kept else None)
    except openai.APIStatusError as e:
        status = "5xx" if e.status_code >= 500 else "error"
        detail = f"{e.status_code}: {e.message}"[:160]
        return Result(time.perf_counter() - start, status=status, detail=detail)
    except openai.APIConnectionError as e:  # timeouts included
        return Result(time.perf_counter() - start, status="error", detail=f"{type(e).__name__}: {e}"[:160])
    except openai.APIError as e:  # an error event inside a 200 stream: the server failed the request
        return Result(time.perf_counter() - start, status="5xx", detail=f"stream error: {e.message}"[:160])


async def run_phase(client, num: int, concurrency: int, args, *, stream: str | None = None, offset: int = 0):
    """``num`` requests from ``concurrency`` clients; returns (results, wall seconds, cut short?)."""
    results: list[Result] = []
    indices = iter(range(offset, offset + num))
    deadline = time.perf_counter() + args.phase_timeout_s

    async def client_loop():
        for i in indices:
            if time.perf_counter() > deadline:
                return
            results.append(await one_request(client, i, args.max_tokens, stream, args.request_timeout_s))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results, time.perf_counter() - start, len(results) < num


def summary(name: str, results: list[Result], wall_s: float, cut: bool) -> dict:
    ok = [r for r in results if r.status == "ok"]
    lat = [r.latency_s for r in ok]
    ttfkt = [r.ttfkt_s for r in ok if r.ttfkt_s is not None]
    s = {"rps": len(ok) / wall_s, "tps": sum(r.tokens for r in ok) / wall_s, "p50": pct(lat, 50),
         "p99": pct(lat, 99), "ttfkt50": pct(ttfkt, 50), "ttfkt99": pct(ttfkt, 99),
         "failed": len(results) - len(ok)}
    cut_note = " (CUT SHORT by the phase timeout)" if cut else ""
    line = (f"{name}: {len(results)} requests in {wall_s:.1f} s{cut_note}: {s['rps']:.1f} req/s, "
            f"{s['tps']:.0f} tok/s; latency p50 {s['p50'] * 1e3:.0f} ms, p99 {s['p99'] * 1e3:.0f} ms")
    if ttfkt:
        line += f"; time to first kept token p50 {s['ttfkt50'] * 1e3:.0f} ms, p99 {s['ttfkt99'] * 1e3:.0f} ms"
    if s["failed"]:
        line += f"; {s['failed']} FAILED (first: {next(r.detail for r in results if r.status != 'ok')})"
    print(line, flush=True)
    return s


async def in_process(cfg: ServeCfg, args) -> tuple[list[float], list[int]]:
    """Latencies and token counts of the benchmark's requests, one at a time, on the same engine here."""
    import torch

    # Ray 2.60's serve.batch reads the replica context only to warn about max_ongoing_requests, and raises
    # outside a deployment: skip that warning here so the same batching runs in this process.
    from ray.serve import batching

    from bt_ray.reset import encode_chat_prompt
    from bt_ray.serve.app import build_stream_engine
    from bt_ray.serve.engine import GenRequest

    batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
    torch.set_num_threads(max(1, math.floor(cfg.deployment.num_cpus)))  # what Ray gives the replica
    engine = build_stream_engine(cfg)
    decode = dataclasses.replace(cfg.decode, max_new_tokens=args.max_tokens, temperature=0.0)
    requests = [GenRequest(encode_chat_prompt(engine.tokenizer, [{"role": "user", "content": p}]), decode,
                           decode.seed) for p in PROMPTS]

    async def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        n = 0
        async for ids in engine.stream(requests[i % len(requests)]):
            n += len(ids)
        return time.perf_counter() - start, n

    for i in range(args.warmup):
        await one(i)
    runs = [await one(i) for i in range(args.c1_requests)]
    await engine.close()
    return [t for t, _ in runs], [n for _, n in runs]


def start_server(cfg: ServeCfg) -> str:
    import ray
    from ray import serve

    from bt_ray.serve.app import build_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.http.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{cfg.http.port}/v1"
    runpy.run_path(str(REPO / "jobs" / "serve.py"))["wait_ready"](url, None, timeout_s=300)
    return url


async def bench(cfg: ServeCfg, url: str, args, inproc_s: list[float], inproc_tokens: list[int]) -> None:
    import httpx
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    pool = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0,
                         http_client=DefaultAsyncHttpxClient(limits=pool))
    await run_phase(client, args.warmup * 4, args.concurrency, args)  # warm-up (both batch shapes)
    await run_phase(client, args.warmup, 1, args)

    c1 = summary("concurrency 1, json", *await run_phase(client, args.c1_requests, 1, args))
    c16 = summary(f"concurrency {args.concurrency}, json",
                  *await run_phase(client, args.c16_requests, args.concurrency, args))
    for mode in ("hold", "retract"):  # hold: held back up to stream.hold_window_tokens (all 16 here)
        summary(f"concurrency 1, stream {mode}",
                *await run_phase(client, args.c1_requests // 2, 1, args, stream=mode))
        summary(f"concurrency {args.concurrency}, stream {mode}",
                *await run_phase(client, args.c16_requests // 2, args.concurrency, args, stream=mode))

    ratio = c16["rps"] / c1["rps"]
    print(f"ratio concurrency-{args.concurrency}/concurrency-1: {ratio:.2f} (goal >= 4) {mark(ratio >= 4)} "
          f"({c16['rps']:.1f} vs {c1['rps']:.1f} req/s; {c16['tps']:.0f} vs {c1['tps']:.0f} tok/s)")

    # The HTTP c=1 requests are the in-process ones (same prompts, greedy): same token counts expected.
    check = await run_phase(client, len(PROMPTS), 1, args)
    same = [r.tokens for r in check[0]] == inproc_tokens[: len(PROMPTS)]
    overhead_ms = (c1["p50"] - pct(inproc_s, 50)) * 1e3
    print(f"ratio serve-overhead-p50-ms: {overhead_ms:.1f} (goal <= 15) {mark(overhead_ms <= 15)} "
          f"(HTTP + Serve p50 {c1['p50'] * 1e3:.1f} ms vs in-process engine p50 "
          f"{pct(inproc_s, 50) * 1e3:.1f} ms; "
          f"same tokens generated: {'yes' if same else 'NO'})")

    soak, wall, cut = await run_phase(client, args.soak_requests, args.concurrency, args, offset=10_000)
    n5xx = sum(r.status == "5xx" for r in soak)
    other = sum(r.status == "error" for r in soak)
    summary(f"soak, concurrency {args.concurrency}", soak, wall, cut)
    print(f"soak 5xx: {n5xx} of {len(soak)} (goal 0, >= 2000 requests) "
          f"{mark(n5xx == 0 and len(soak) >= 2000 and not cut)}; other errors: {other}")
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--c1-requests", type=int, default=48, help="requests at concurrency 1")
    parser.add_argument("--c16-requests", type=int, default=256, help="requests at --concurrency")
    parser.add_argument("--soak-requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--replica-cpus", type=float, default=1.0,
                        help="Ray CPUs of the replica (its torch threads)")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=None, help="default: the config's")
    parser.add_argument("--request-timeout-s", type=float, default=60.0)
    parser.add_argument("--phase-timeout-s", type=float, default=300.0, help="no request starts after it")
    args = parser.parse_args()

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [f"http.port={port}", f"decode.max_new_tokens={args.max_tokens}",
                 f"deployment.num_cpus={args.replica_cpus}", f"engine.max_batch_size={args.concurrency}",
                 f"deployment.max_ongoing_requests={max(64, 2 * args.concurrency)}"]
    if args.batch_wait_timeout_s is not None:
        overrides.append(f"engine.batch_wait_timeout_s={args.batch_wait_timeout_s}")
    cfg = config.load(ServeCfg, None, overrides)
    print(f"tiny model, HF engine, 1 replica ({cfg.deployment.num_cpus:g} CPU), max_batch_size "
          f"{cfg.engine.max_batch_size}, batch_wait_timeout_s {cfg.engine.batch_wait_timeout_s}, greedy, "
          f"max_tokens {args.max_tokens}, loopback", flush=True)
    inproc_s, inproc_tokens = asyncio.run(in_process(cfg, args))
    url = start_server(cfg)
    try:
        asyncio.run(bench(cfg, url, args, inproc_s, inproc_tokens))
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
