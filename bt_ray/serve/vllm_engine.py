"""``VLLMStreamEngine``: a ``StreamEngine`` on vLLM's ``AsyncLLM``, whose continuous batching serves
concurrent requests (each request joins the running batch at the next engine step; no batch window).

The model, tokenizer, ``[RESET]`` id, stop ids, engine arguments and ``SamplingParams`` are those of
evaluation's ``VLLMGenerator`` (``vllm_policy``, ``vllm_engine_kwargs``, ``vllm_sampling_params``), so
a served answer is the answer evaluation scored. Each request streams ``DELTA`` outputs: every id is
handed on at the engine step that produced it.

``AsyncLLM`` always runs its engine core in a child process (``VLLM_ENABLE_V1_MULTIPROCESSING`` only
concerns the synchronous ``LLM``), started with ``spawn`` on CPU. That works inside a Ray actor (a
Serve replica) and in a script, but a script must keep its top level under
``if __name__ == "__main__":`` (the child re-imports ``__main__``).

Construct the engine on the event loop that will serve its streams (vLLM's output handler and
queues bind to the loop they first run on), and call ``await close()`` (or ``shutdown()``) when done:
it stops the engine core process.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator

from bt_ray.eval.config import EngineCfg
from bt_ray.eval.engines import vllm_engine_kwargs, vllm_policy, vllm_sampling_params
from bt_ray.models import ModelCfg
from bt_ray.serve.engine import GenRequest


class VLLMStreamEngine:
    """vLLM ``AsyncLLM`` streaming the ids of each ``GenRequest`` as they are generated.

    Args:
        model_cfg: the policy (preset or HF dir) and its loading settings, as for ``VLLMGenerator``.
        engine: the vLLM knobs (``vllm_max_model_len``, ``vllm_kv_cache_memory_bytes``,
            ``vllm_omp_threads_bind``).
    """

    def __init__(self, model_cfg: ModelCfg, engine: EngineCfg | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        model, self.tokenizer, self.reset_id, self.stop_ids = vllm_policy(model_cfg)
        kwargs = vllm_engine_kwargs(model, engine or EngineCfg(), model_cfg.dtype, self.reset_id)
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))
        self.max_context = (engine or EngineCfg()).vllm_max_model_len
        # Request ids are unique per engine and across engines (a replica restarted, several replicas).
        self._prefix = f"bt-serve-{uuid.uuid4().hex[:8]}"
        self._counter = itertools.count()

    async def stream(self, request: GenRequest) -> AsyncIterator[list[int]]:
        """Yield the ids of each engine step (generated ids, ``[RESET]`` and the final stop id included).

        A validation error (e.g. a prompt longer than ``vllm_max_model_len``) raises ``ValueError``
        here (vLLM's ``VLLMClientError`` is no ``ValueError``), for this request only. Closing the
        iterator early, or cancelling the task reading it, aborts the request in vLLM (its KV cache
        is freed, the other requests go on).
        """
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        llm = self.llm
        if llm is None:
            raise RuntimeError("VLLMStreamEngine is closed")
        params = vllm_sampling_params(request.decode, request.seed, self.reset_id, self.stop_ids)
        params.output_kind = RequestOutputKind.DELTA
        request_id = f"{self._prefix}-{next(self._counter)}"
        outputs = llm.generate({"prompt_token_ids": list(request.prompt_ids)}, params, request_id)
        finished = False
        last = None
        try:
            async for out in outputs:
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                if out.finished:
                    finished = True
                    # As VLLMGenerator.generate: a stop id vLLM leaves out of token_ids is appended.
                    if completion.finish_reason == "stop" and isinstance(completion.stop_reason, int):
                        if (ids[-1] if ids else last) != completion.stop_reason:
                            ids.append(completion.stop_reason)
                if ids:
                    last = ids[-1]
                    yield ids
        except VLLMClientError as e:  # the request's fault (4xx): a ValueError, as from the HF engine
            raise ValueError(str(e)) from e
        finally:
            if not finished:
                # A client that went away: vLLM's own generator aborts when closed, but it is closed
                # here explicitly (not left to the garbage collector) and the abort is repeated by
                # id in case the request was added before the generator got to hold it.
                await outputs.aclose()
                await llm.abort(request_id)

    async def check_health(self) -> None:
        """Raises when vLLM's engine core is dead (Serve's health check then replaces the replica)."""
        await self.llm.check_health()

    def num_unfinished_requests(self) -> int:
        """Requests vLLM is still generating (0 when idle; aborted ones are gone)."""
        return self.llm.get_num_unfinished_requests()

    def shutdown(self) -> None:
        """Stop the engine core process (idempotent).

        The ``AsyncLLM`` is dropped here, so its ``__del__`` (a second shutdown) runs now and not at
        interpreter exit, where it fails noisily on half-torn-down modules.
        """
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()

    async def close(self) -> None:
        self.shutdown()
