"""Serving's vLLM stream engine (``AsyncLLM``) against evaluation's ``VLLMGenerator`` on the tiny model.

One process, no Ray: the stream engine's ``AsyncLLM`` runs its engine core in a spawned child, the
offline ``VLLMGenerator`` runs in-process. Every async call runs on one module-wide event loop, the
one the stream engine was built on (vLLM binds its output handler to it).
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from bt_ray.eval.config import DecodeCfg, EngineCfg
from bt_ray.models import ModelCfg
from bt_ray.reset import encode_chat_prompt
from tests.integration.test_vllm_engine import TEXTS as ENGINE_TEXTS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

TEXTS = [*ENGINE_TEXTS, "Translate 'good morning' into German", "Why is the sky blue?"]  # 8 concurrent
ENGINE = EngineCfg(kind="vllm", vllm_max_model_len=256, max_prompt_tokens=128,
                   vllm_kv_cache_memory_bytes=128 << 20)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def offline():
    from bt_ray.eval.engines import VLLMGenerator

    return VLLMGenerator(ModelCfg(), ENGINE)


@pytest.fixture(scope="module")
def streamer(loop):
    from bt_ray.serve.vllm_engine import VLLMStreamEngine

    async def build():
        return VLLMStreamEngine(ModelCfg(), ENGINE)

    engine = loop.run_until_complete(build())
    yield engine
    loop.run_until_complete(engine.close())


def _prompts(tok) -> list[list[int]]:
    return [encode_chat_prompt(tok, [{"role": "user", "content": t}]) for t in TEXTS]


async def _collect(engine, prompt, decode, seed=0) -> tuple[list[int], list[list[int]]]:
    from bt_ray.serve.engine import GenRequest

    chunks = [chunk async for chunk in engine.stream(GenRequest(prompt, decode, seed))]
    return [t for c in chunks for t in c], chunks


def test_same_model_resolution(offline, streamer):
    assert (streamer.reset_id, streamer.stop_ids) == (offline.reset_id, offline.stop_ids)
    assert _prompts(streamer.tokenizer) == _prompts(offline.tokenizer)


DECODES = {
    "greedy": DecodeCfg(max_new_tokens=24),
    "bias, one reset": DecodeCfg(max_new_tokens=24, reset_bias=100.0, max_resets=1),
    "bias, window": DecodeCfg(max_new_tokens=24, reset_bias=100.0, max_resets=2, reset_window=3),
    "sampled": DecodeCfg(max_new_tokens=24, temperature=1.0, reset_bias=2.0),
}


@pytest.mark.parametrize("name", list(DECODES))
def test_stream_equals_offline_generate(loop, offline, streamer, name):
    """Each stream, one id per chunk, is the id list ``VLLMGenerator.generate`` gives (same seed)."""
    decode = DECODES[name]
    prompts = _prompts(offline.tokenizer)[:4]
    seeds = [7, 8, 9, 10]
    want = [g.ids for g in offline.generate(prompts, decode, seeds=seeds)]
    for prompt, seed, ids in zip(prompts, seeds, want):
        got, chunks = loop.run_until_complete(_collect(streamer, prompt, decode, seed))
        assert got == ids
        # DELTA: ids leave as steps make them (a reader that falls behind gets the steps it missed merged)
        assert len(chunks) > 1
    reset = offline.reset_id
    if name == "bias, one reset":
        assert all(ids[0] == reset and ids.count(reset) == 1 for ids in want)
    if name == "bias, window":
        assert all(ids[:2] == [reset] * 2 and ids.count(reset) == 2 for ids in want)


def test_concurrent_streams_equal_their_sequential_results(loop, streamer):
    """8 streams at once (vLLM batches them) give what each gives alone."""
    decode = DecodeCfg(max_new_tokens=32, reset_bias=4.0, max_resets=2)
    prompts = _prompts(streamer.tokenizer)
    alone = [loop.run_until_complete(_collect(streamer, p, decode))[0] for p in prompts]

    async def together():
        return await asyncio.gather(*(_collect(streamer, p, decode) for p in prompts))

    assert [ids for ids, _ in loop.run_until_complete(together())] == alone
    assert len(set(map(tuple, alone))) > 1
    assert streamer.num_unfinished_requests() == 0


def test_closing_a_stream_aborts_its_request(loop, streamer):
    """A client that leaves after 2 ids (iterator closed, or its task cancelled) frees its request."""
    from bt_ray.serve.engine import GenRequest

    prompt = _prompts(streamer.tokenizer)[3]
    decode = DecodeCfg(max_new_tokens=200)

    async def close_after_two():
        stream = streamer.stream(GenRequest(prompt, decode))
        got = [await anext(stream), await anext(stream)]
        assert streamer.num_unfinished_requests() == 1
        await stream.aclose()
        return got

    assert len(loop.run_until_complete(close_after_two())) == 2
    assert streamer.num_unfinished_requests() == 0

    async def cancel_after_two():
        two = asyncio.Event()

        async def reader():
            n = 0
            async for _ in streamer.stream(GenRequest(prompt, decode)):
                n += 1
                if n == 2:
                    two.set()

        task = asyncio.ensure_future(reader())
        await two.wait()
        assert streamer.num_unfinished_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    loop.run_until_complete(cancel_after_two())
    assert streamer.num_unfinished_requests() == 0
    # the engine serves on
    ids, _ = loop.run_until_complete(_collect(streamer, prompt, DecodeCfg(max_new_tokens=5)))
    assert len(ids) == 5


def test_a_bad_request_fails_alone(loop, streamer):
    """A prompt longer than the context raises for its request; a concurrent one completes."""
    prompt = _prompts(streamer.tokenizer)[0]
    decode = DecodeCfg(max_new_tokens=16)
    want, _ = loop.run_until_complete(_collect(streamer, prompt, decode))

    async def both():
        return await asyncio.gather(_collect(streamer, [prompt[0]] * 400, decode),
                                    _collect(streamer, prompt, decode), return_exceptions=True)

    bad, good = loop.run_until_complete(both())
    assert isinstance(bad, ValueError) and "maximum context length is 256" in str(bad), bad
    assert good[0] == want
    assert streamer.num_unfinished_requests() == 0


def test_streams_end_with_the_stop_id_as_offline(loop, offline, streamer):
    """A stream that stops ends with the stop id, as ``VLLMGenerator``'s ids do.

    The random tiny model never emits its real stop id, so both engines are given, for this test, a
    stop id the model does emit: the 6th greedy id of the first prompt.
    """
    decode = DecodeCfg(max_new_tokens=24)
    prompts = _prompts(offline.tokenizer)
    stop = offline.generate(prompts[:1], decode)[0].ids[5]
    saved = offline.stop_ids, streamer.stop_ids
    offline.stop_ids = streamer.stop_ids = (stop,)
    try:
        want = [g.ids for g in offline.generate(prompts, decode)]
        got = [loop.run_until_complete(_collect(streamer, p, decode))[0] for p in prompts]
    finally:
        offline.stop_ids, streamer.stop_ids = saved
    assert got == want
    assert want[0][-1] == stop and len(want[0]) <= 6
