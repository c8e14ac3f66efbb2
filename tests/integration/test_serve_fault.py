"""A replica killed (SIGKILL) in the middle of a bounded load: Serve replaces it, no request hangs, and
none fails once the replacement is up.

The load is real: 8 client threads with the ``openai`` client (no retries, a timeout on every request),
non-streaming and streaming chat requests mixed, against 2 replicas of the tiny model on Serve's
proxy on 127.0.0.1. The requests in flight on the killed replica may fail (their process is gone);
the test prints how many did and bounds that.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil
import pytest

from tests.integration.conftest import deploy_server

pytestmark = pytest.mark.integration  # 28-63 s on the 2-core machine (2 replicas, one replaced)

CONCURRENCY = 8
LOAD_REQUESTS = 64
KILL_AFTER = 12
"""Completed requests before the kill: the load is in full swing."""
AFTER_REQUESTS = 24
REQUEST_TIMEOUT_S = 30.0
"""Client timeout of every request (a request that hangs fails with it, and the test sees it)."""
RECOVERY_TIMEOUT_S = 240.0


@dataclass
class Outcome:
    index: int
    stream: bool
    start: float
    end: float
    error: str | None


def one_request(client, index: int, stream: bool) -> Outcome:
    start = time.monotonic()
    error = None
    try:
        messages = [{"role": "user", "content": f"request {index}: say something"}]
        if stream:
            finish = None
            for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                        stream=True):
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            if finish is None:
                error = "stream ended without a finish_reason"
        else:
            out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16)
            if out.choices[0].finish_reason not in ("stop", "length"):
                error = f"finish_reason {out.choices[0].finish_reason!r}"
    except Exception as e:  # noqa: BLE001 - every failure is counted and printed
        error = f"{type(e).__name__}: {e}"[:200]
    return Outcome(index, stream, start, time.monotonic(), error)


def run_load(client, indices: range, on_done=None) -> list[Outcome]:
    def task(i):
        outcome = one_request(client, i, stream=i % 2 == 1)
        if on_done is not None:
            on_done(outcome)
        return outcome

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(task, indices))


def replica_pids(app_name: str) -> set[int]:
    """Pids of this app's replica processes (Ray titles them ``ray::ServeReplica:<app>:<deployment>``)."""
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{app_name}:" in cmdline:
            pids.add(p.info["pid"])
    return pids


def healthy_with(app_name: str, replicas: int) -> bool:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or app.status != "RUNNING":
        return False
    (deployment,) = app.deployments.values()
    return deployment.status == "HEALTHY" and deployment.replica_states.get("RUNNING", 0) == replicas \
        and sum(deployment.replica_states.values()) == replicas


def test_killed_replica_is_replaced_under_load(serve_port):
    from openai import OpenAI
    from ray import serve

    name = f"bt-ray-fault-{os.getpid()}"  # unique: the pids found by title are this test's replicas
    url = deploy_server(serve_port, ["deployment.num_replicas=2", "deployment.num_cpus=0.5",
                                     "deployment.health_check_period_s=1"],
                        name=name, route_prefix="/fault")
    try:
        deadline = time.monotonic() + 120
        while not (healthy_with(name, 2) and len(replica_pids(name)) == 2):
            assert time.monotonic() < deadline, f"2 replicas never came up: {serve.status()}"
            time.sleep(0.5)
        before = replica_pids(name)
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        run_load(client, range(CONCURRENCY))  # warm-up: both replicas have served

        # The load, with one replica killed once KILL_AFTER requests have completed.
        done_count, lock = [0], threading.Lock()
        killed: dict = {}

        def on_done(_):
            with lock:
                done_count[0] += 1
                if done_count[0] == KILL_AFTER:
                    victim = min(before)
                    os.kill(victim, signal.SIGKILL)
                    killed.update(pid=victim, at=time.monotonic())

        # Watch for the replacement while the load runs: the moment Serve is back to 2 healthy replicas
        # and the killed process is not one of them.
        replaced: dict = {}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                if killed and healthy_with(name, 2):
                    pids = replica_pids(name)
                    if len(pids) == 2 and killed["pid"] not in pids:
                        replaced.update(at=time.monotonic(), pids=pids)
                        return
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        load = run_load(client, range(CONCURRENCY, CONCURRENCY + LOAD_REQUESTS), on_done)
        assert killed, "the kill never happened"
        watcher.join(timeout=RECOVERY_TIMEOUT_S)
        stop.set()
        assert replaced, f"no replacement within {RECOVERY_TIMEOUT_S:.0f} s: {serve.status()}"
        after = run_load(client, range(1000, 1000 + AFTER_REQUESTS))

        failed = [o for o in load if o.error]
        in_flight = [o for o in load if o.start <= killed["at"] <= o.end]
        late = [o for o in load + after if o.error and o.start >= replaced["at"]]
        slowest = max(o.end - o.start for o in load + after)
        print(f"\n{len(load)} requests under load ({CONCURRENCY} clients), replica pid {killed['pid']} "
              f"killed after {KILL_AFTER}: {len(failed)} failed, {len(in_flight)} in flight at the kill; "
              f"replacement up {replaced['at'] - killed['at']:.1f} s after the kill; "
              f"{len(after)} requests after it, {sum(1 for o in after if o.error)} failed; "
              f"slowest request {slowest:.1f} s")
        for o in failed:
            print(f"  failed: request {o.index} ({'stream' if o.stream else 'json'}, started "
                  f"{o.start - killed['at']:+.2f} s from the kill): {o.error}")

        assert slowest < REQUEST_TIMEOUT_S, "a request ran into its client timeout (a hang)"
        assert not late, f"requests failed after the replacement was up: {[o.error for o in late]}"
        assert all(o.error is None for o in after), [o.error for o in after]
        # Only what the dead process held (or was being routed to it before Serve noticed) may fail; the
        # surviving replica served the rest of the load.
        assert len(failed) <= CONCURRENCY, f"{len(failed)} failures: more than the requests in flight"
        assert sum(1 for o in load if o.error is None and o.start > killed["at"]) > 0
        assert replaced["pids"].isdisjoint({killed["pid"]}) and len(replaced["pids"] & before) == 1
    finally:
        serve.delete(name)
