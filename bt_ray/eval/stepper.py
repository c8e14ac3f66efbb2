"""``EngineStepper``: one thread steps a vLLM engine; callers in any thread add requests and wait.

Why: a Ray Data actor that runs one synchronous ``generate`` per batch leaves vLLM idle between
batches and never batches across them. With several batches in flight per actor (Ray Data's
``max_concurrent_calls_per_actor``), each batch's thread hands its requests to this stepper, which
adds them to the running engine at the next step: vLLM's continuous batching then spans every
batch the actor holds, as one offline ``generate`` over all prompts would.

The engine stays in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as ``VLLMGenerator``): no IPC per
step. ``AsyncLLM`` (what serving uses) always runs its core in a child process; on CPU that costs
every step a round trip, and the eval rows need no streaming, only each id's step time.

Only the stepper thread touches the engine (``add_request``, ``step``, ``abort_request``): vLLM's
``LLMEngine`` is not thread-safe. vLLM's own ``AsyncLLM`` does the same with an output-handler task.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Call:
    """The requests of one ``run`` call and their results."""

    requests: list[tuple[str, dict, object]]
    start: float
    admitted: dict[str, int] = field(default_factory=dict)  # request id -> index of its first step
    finals: dict[str, tuple[object, list[float]]] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class EngineStepper:
    """Steps ``engine`` (a vLLM ``LLMEngine``) in a daemon thread while requests are pending.

    ``run`` may be called from several threads at once; their requests share the engine's batch.
    Request ids are made unique here (``<prefix>-<n>``; the counter moves on before each add, so a
    failed add never leaves an id to be reused).
    """

    def __init__(self, engine, prefix: str = "bt"):
        self.engine = engine
        self.prefix = prefix
        self._cond = threading.Condition()
        self._inbox: list[_Call] = []
        self._aborts: list[_Call] = []
        self._active: dict[str, _Call] = {}  # request id -> its call, for requests in the engine
        self._steps: list[float] = []  # perf_counter time of each engine step since the engine was idle
        self._num_requests = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def run(self, requests: list[tuple[dict, object]]) -> list[tuple[object, list[float]]]:
        """Add ``(prompt, sampling_params)`` requests and wait until every one has finished.

        Returns:
            Per request, in order: vLLM's final ``CompletionOutput`` and the times (seconds from this
            call's start) of every engine step from the one that admitted it to the one that
            finished it; the step that produced id i of n is ``len(times) - n + i`` (vLLM gives a
            running request one id per step here: no speculative decoding).

        Raises:
            Whatever ``add_request`` or ``step`` raised for this call (its other requests are
            aborted, so none is left in the engine); ``KeyboardInterrupt`` likewise aborts them.
        """
        call = _Call(requests=[], start=time.perf_counter())
        with self._cond:
            if self._closed:
                raise RuntimeError("EngineStepper is closed")
            for prompt, params in requests:
                call.requests.append((f"{self.prefix}-{self._num_requests}", prompt, params))
                self._num_requests += 1
            self._inbox.append(call)
            self._ensure_thread()
            self._cond.notify_all()
        try:
            call.done.wait()
        except BaseException:
            with self._cond:  # the stepper aborts what it added of this call
                self._aborts.append(call)
                self._cond.notify_all()
            raise
        if call.error is not None:
            raise call.error
        return [call.finals[rid] for rid, _, _ in call.requests]

    def close(self) -> None:
        """Stop the thread after the current step (pending calls fail)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def idle(self) -> bool:
        """No request is queued or in the engine."""
        with self._cond:
            return not self._inbox and not self._active

    # ------------------------------------------------------------ the stepper thread

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="bt-ray-vllm-stepper", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        try:
            self._step_until_closed()
        except BaseException as e:  # a bug here must not leave callers waiting forever
            with self._cond:
                pending = [*self._inbox, *self._aborts, *self._active.values()]
                self._inbox, self._aborts = [], []
            for call in {id(c): c for c in pending}.values():
                self._fail(call, e)
            raise

    def _step_until_closed(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._active or self._closed):
                    self._steps.clear()  # idle: no request needs old step times
                    self._cond.wait()
                if self._closed:
                    for call in {id(c): c for c in [*self._inbox, *self._active.values()]}.values():
                        self._fail(call, RuntimeError("EngineStepper closed"))
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for call in aborts:
                self._fail(call, None)
            for call in inbox:
                self._admit(call)
            if not self._active:
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - every caller waiting on the engine hears it
                for call in {id(c): c for c in self._active.values()}.values():
                    self._fail(call, e)
                continue
            self._steps.append(time.perf_counter())
            for out in outputs:
                if not out.finished or out.request_id not in self._active:
                    continue
                call = self._active.pop(out.request_id)
                first = call.admitted[out.request_id]
                call.finals[out.request_id] = (out.outputs[0], [t - call.start for t in self._steps[first:]])
                if len(call.finals) == len(call.requests):
                    call.done.set()

    def _admit(self, call: _Call) -> None:
        if call.done.is_set():
            return
        for rid, prompt, params in call.requests:
            try:
                self.engine.add_request(rid, prompt, params)
            except BaseException as e:  # noqa: BLE001 - this call fails; its added requests are aborted
                self._fail(call, e)
                return
            self._active[rid] = call
            call.admitted[rid] = len(self._steps)
        if not call.requests:
            call.done.set()

    def _fail(self, call: _Call, error: BaseException | None) -> None:
        """Abort the call's requests still in the engine and wake its caller with ``error``."""
        mine = [rid for rid, c in self._active.items() if c is call]
        for rid in mine:
            del self._active[rid]
        if mine:
            try:
                self.engine.abort_request(mine)
            except Exception:  # noqa: BLE001 - the engine is already failing; the caller hears the cause
                pass
        if not call.done.is_set():
            call.error = error if error is not None else RuntimeError("aborted")
            call.done.set()
