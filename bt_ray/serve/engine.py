"""Token streams for serving, from the same engines evaluation uses (no second decoder).

A ``StreamEngine`` turns one ``GenRequest`` (prompt ids, decoding settings, seed) into an async
stream of generated ids, ``[RESET]`` ids and the stop id included, decoded with the ``[RESET]``
semantics of ``bt_ray.reset`` (bias, ``max_resets``, ``reset_window``). What the client is shown is
decided downstream (``bt_ray.reset.stream``).

* ``HFStreamEngine``: ``HFGenerator.generate_batch`` (transformers ``generate``) with Ray Serve's
  dynamic batching (``serve.batch``): requests that arrive within ``batch_wait_timeout_s`` share one
  ``generate`` call, and each row's ids are streamed out as its step produces them.
* ``bt_ray.serve.vllm_engine.VLLMStreamEngine``: vLLM's ``AsyncLLM`` and its continuous batching.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from bt_ray.eval.config import DecodeCfg


@dataclass(frozen=True, slots=True)
class GenRequest:
    """One generation: prompt ids (already safely encoded) and how to decode them.

    Attributes:
        prompt_ids: the prompt's token ids (``bt_ray.reset.encode_chat_prompt`` or
            ``encode_completion_prompt``; user text never holds a control id).
        decode: decoding settings, ``[RESET]`` knobs included.
        seed: the sampling seed (with temperature > 0).
    """

    prompt_ids: list[int]
    decode: DecodeCfg
    seed: int = 0


class StreamEngine(Protocol):
    """Anything that streams generated ids for a ``GenRequest``."""

    tokenizer: object
    reset_id: int
    stop_ids: tuple[int, ...]
    max_context: int | None
    """Prompt plus answer tokens the model takes at most (None: unknown)."""

    def stream(self, request: GenRequest) -> AsyncIterator[list[int]]:
        """Yield new ids as they are generated; the stream ends after the stop id or the token limit.

        Closing the iterator early (a client went away) stops the generation of this request.
        """
        ...

    async def close(self) -> None:
        """Release the engine (called when the replica shuts down)."""
        ...


_DONE = object()


@dataclass(slots=True)
class _Job:
    request: GenRequest
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False
    finished: bool = False
    produced: int = 0
    stop_ids: frozenset = field(default_factory=frozenset)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class HFStreamEngine:
    """``HFGenerator`` behind dynamic batching (``ray.serve.batch``), streaming each row's ids.

    Rows in one ``generate`` call must share temperature and top_p (transformers samples the batch
    with one setting): a batch is split into groups by those and the groups run one after another.
    On HF, a seed reproduces a sample only when the request ran alone in its batch (transformers
    draws the batch from one random stream); vLLM seeds each request on its own.

    Args:
        generator: a loaded ``HFGenerator`` (policy with ``[RESET]``).
        max_batch_size: requests per ``generate`` call at most.
        batch_wait_timeout_s: how long the first request of a batch waits for others.

    serve.batch forms the next batch every ``batch_wait_timeout_s`` even while a ``generate`` runs (the
    batches then queue), so under load it would run many small batches (3 rows on average at 16 clients). A
    request that arrives while a batch generates waits for it to end and then joins the next batch
    with the others that waited.
    """

    def __init__(self, generator, *, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01):
        from ray import serve

        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.reset_id = generator.reset_id
        self.stop_ids = generator.stop_ids
        self.max_context = getattr(generator.model.config, "max_position_embeddings", None)
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(
            self._run_batch
        )
        self._idle = asyncio.Event()  # set while no batch generates
        self._idle.set()

    async def stream(self, request: GenRequest) -> AsyncIterator[list[int]]:
        job = _Job(request, asyncio.Queue(), asyncio.get_running_loop(), stop_ids=frozenset(self.stop_ids))
        await self._idle.wait()
        task = asyncio.ensure_future(self._batched(job))
        # A failure before the batch runs (serve.batch itself raising) never reaches the queue: forward
        # it, or this stream would wait forever.
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or job.queue.put_nowait(t.exception()))
        try:
            while True:
                item = await job.queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            await task
        finally:
            job.cancelled = True  # ends this row at its next step if the batch is still running

    async def _run_batch(self, jobs: list[_Job]) -> list[None]:
        key = lambda j: (j.request.decode.temperature, j.request.decode.top_p)  # noqa: E731
        self._idle.clear()
        try:
            for _, group in itertools.groupby(sorted(jobs, key=key), key=key):
                group = list(group)
                try:
                    await asyncio.to_thread(self._generate, group)
                except BaseException as e:  # every waiting client hears of it; the replica lives on
                    for job in group:
                        job.put(e)
                    continue
                for job in group:
                    job.put(_DONE)
        finally:
            self._idle.set()
        return [None] * len(jobs)

    def _generate(self, jobs: list[_Job]) -> None:
        """One ``generate_batch`` call (in a worker thread); each step's ids go to their row's queue."""

        def on_step(ids: list[int]) -> list[bool]:
            for job, token in zip(jobs, ids):
                if job.finished:
                    continue
                job.produced += 1
                job.put([token])
                if token in job.stop_ids or job.produced >= job.request.decode.max_new_tokens:
                    job.finished = True
            return [job.cancelled for job in jobs]

        self.generator.generate_batch(
            [j.request.prompt_ids for j in jobs], [j.request.decode for j in jobs],
            [j.request.seed for j in jobs], on_step=on_step,
        )

    async def close(self) -> None:
        return None
