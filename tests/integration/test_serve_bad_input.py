"""Malformed requests to the OpenAI-compatible server: each gets a 4xx with OpenAI error JSON whose
message names the field, never a 5xx, and the server answers a good request right after each one.

Requests a client library can send go through the real ``openai`` client (its typed ``create`` where
the request fits its signature, else its raw ``post``); bodies it cannot send (invalid JSON, NaN,
non-UTF-8 bytes, an oversize body) and wrong methods go through ``httpx``.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from tests.integration.conftest import deploy_server

pytestmark = pytest.mark.integration

MODEL = "tiny"
MSG = [{"role": "user", "content": "hi"}]
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Case:
    """One kind of malformed request.

    Attributes:
        id: the test id.
        route: ``chat`` or ``completions`` (a JSON body), or ``METHOD /path`` under the base URL.
        body: the JSON body (a dict), or raw bytes (sent with httpx).
        status: the expected 4xx.
        names: what the error message must contain (the field, or what is wrong with the body).
        param: the expected ``error.param`` (None: not checked).
        headers: extra headers for a raw body.
    """

    id: str
    route: str
    body: dict | bytes | None
    status: int
    names: str
    param: str | None = None
    headers: dict = field(default_factory=dict)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MSG, "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


LONG_TEXT = "lorem ipsum dolor " * 400  # > 1024 tokens (limits.max_prompt_tokens) and < MAX_BODY

CASES = [
    # --- chat: messages
    Case("messages-missing", "chat", without(chat(), "messages"), 400, "messages: required", "messages"),
    Case("messages-empty", "chat", chat(messages=[]), 400, "messages", "messages"),
    Case("messages-not-a-list", "chat", chat(messages="hi"), 400, "messages", "messages"),
    Case("message-not-an-object", "chat", chat(messages=["hi"]), 400, "messages[0]", "messages[0]"),
    Case("role-unknown", "chat", chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
         "messages[0].role", "messages[0].role"),
    Case("role-missing", "chat", chat(messages=[{"content": "hi"}]), 400, "messages[0].role",
         "messages[0].role"),
    Case("content-wrong-type", "chat", chat(messages=[{"role": "user", "content": 5}]), 400,
         "messages[0].content", "messages[0].content"),
    Case("content-missing", "chat", chat(messages=[{"role": "user"}]), 400, "messages[0].content",
         "messages[0].content"),
    Case("content-part-image", "chat",
         chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         400, "messages[0].content[0]", None),
    Case("content-parts-empty", "chat", chat(messages=[{"role": "user", "content": []}]), 400,
         "at least 1 item", "messages[0].content"),
    Case("message-name-field", "chat", chat(messages=[{"role": "user", "content": "hi", "name": "[RESET]"}]),
         400, "messages[0].name", "messages[0].name"),
    Case("too-many-messages", "chat", chat(messages=MSG * 65), 400, "messages", "messages"),
    Case("prompt-too-long-chat", "chat", chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400,
         "messages", "messages"),
    # --- model
    Case("model-missing", "chat", without(chat(), "model"), 400, "model: required", "model"),
    Case("model-unknown", "chat", chat(model="gpt-4o"), 404, "model", "model"),
    Case("model-wrong-type", "chat", chat(model=7), 400, "model", "model"),
    # --- sampling and lengths
    Case("max-tokens-huge", "chat", chat(max_tokens=10**9), 400, "max_tokens", "max_tokens"),
    Case("max-tokens-zero", "chat", chat(max_tokens=0), 400, "max_tokens", "max_tokens"),
    Case("max-tokens-string", "chat", chat(max_tokens="16"), 400, "max_tokens", "max_tokens"),
    Case("max-tokens-float", "chat", chat(max_tokens=2.5), 400, "max_tokens", "max_tokens"),
    Case("max-completion-tokens-huge", "chat", chat(max_completion_tokens=100_000), 400,
         "max_completion_tokens", "max_completion_tokens"),
    Case("temperature-negative", "chat", chat(temperature=-0.5), 400, "temperature", "temperature"),
    Case("temperature-too-high", "chat", chat(temperature=7), 400, "temperature", "temperature"),
    Case("temperature-nan", "chat", json.dumps(chat(temperature=float("nan"))).encode(), 400, "temperature",
         "temperature"),
    Case("temperature-infinity", "chat", json.dumps(chat(temperature=float("inf"))).encode(), 400,
         "temperature", "temperature"),
    Case("temperature-string", "chat", chat(temperature="hot"), 400, "temperature", "temperature"),
    Case("top-p-zero", "chat", chat(top_p=0), 400, "top_p", "top_p"),
    Case("n-too-large", "chat", chat(n=5), 400, "n", "n"),
    Case("n-zero", "chat", chat(n=0), 400, "n", "n"),
    Case("seed-float", "chat", chat(seed=1.5), 400, "seed", "seed"),
    Case("stream-wrong-type", "chat", chat(stream="yes"), 400, "stream", "stream"),
    Case("stream-options-without-stream", "chat", chat(stream_options={"include_usage": True}), 400,
         "stream_options", "stream_options"),
    Case("stream-options-unknown-key", "chat", chat(stream=True, stream_options={"usage": True}), 400,
         "stream_options.usage", "stream_options.usage"),
    # --- extension fields
    Case("reset-logit-bias-too-high", "chat", chat(reset_logit_bias=500.0), 400, "reset_logit_bias",
         "reset_logit_bias"),
    Case("reset-logit-bias-too-low", "chat", chat(reset_logit_bias=-100.0), 400, "reset_logit_bias",
         "reset_logit_bias"),
    Case("reset-logit-bias-string", "chat", chat(reset_logit_bias="high"), 400, "reset_logit_bias",
         "reset_logit_bias"),
    Case("max-resets-zero", "chat", chat(max_resets=0), 400, "max_resets", "max_resets"),
    Case("max-resets-too-high", "chat", chat(max_resets=99), 400, "max_resets", "max_resets"),
    Case("stream-mode-unknown", "chat", chat(stream=True, stream_mode="sometimes"), 400, "stream_mode",
         "stream_mode"),
    # --- fields that are not ours
    Case("unknown-field", "chat", chat(temprature=0.5), 400, "temprature: unknown field", "temprature"),
    Case("unsupported-logit-bias", "chat", chat(logit_bias={"50256": -100}), 400, "logit_bias: this OpenAI",
         "logit_bias"),
    Case("unsupported-tools", "chat",
         chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400,
         "tools: this OpenAI", "tools"),
    Case("unsupported-stop", "chat", chat(stop=["\n"]), 400, "stop: this OpenAI", "stop"),
    Case("unsupported-response-format", "chat", chat(response_format={"type": "json_object"}), 400,
         "response_format", "response_format"),
    # --- completions
    Case("prompt-missing", "completions", without(completion(), "prompt"), 400, "prompt: required", "prompt"),
    Case("prompt-empty-list", "completions", completion(prompt=[]), 400, "at least 1 item", "prompt"),
    Case("prompt-token-ids", "completions", completion(prompt=[1, 2, 3]), 400, "prompt[0]", "prompt"),
    Case("prompt-too-long", "completions", completion(prompt=LONG_TEXT), 400, "prompt", "prompt"),
    Case("prompt-list-item-too-long", "completions", completion(prompt=["hi", LONG_TEXT]), 400, "prompt[1]",
         "prompt[1]"),
    Case("n-times-prompts-too-large", "completions", completion(prompt=["a", "b", "c"], n=2), 400, "n", "n"),
    Case("completions-with-messages", "completions", completion(messages=MSG), 400, "messages: unknown field",
         "messages"),
    Case("unsupported-echo", "completions", completion(echo=True), 400, "echo: this OpenAI", "echo"),
    Case("unsupported-suffix", "completions", completion(suffix="!"), 400, "suffix", "suffix"),
    # --- the body itself
    Case("invalid-json", "chat", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    Case("non-utf8-bytes", "chat",
         b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "not valid UTF-8"),
    Case("body-empty", "chat", b"", 400, "not valid JSON"),
    Case("body-json-array", "chat", b"[1, 2]", 400, "must be a JSON object"),
    Case("body-form-encoded", "chat", b"model=tiny&messages=hi", 400, "not valid JSON",
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("body-oversize", "chat", json.dumps(chat(messages=[{"role": "user", "content": "x" * MAX_BODY}]))
         .encode(), 413, "body"),
    # --- routes and methods
    Case("get-on-chat", "GET /chat/completions", None, 405, "GET"),
    Case("delete-models", "DELETE /models", None, 405, "DELETE"),
    Case("unknown-route", "POST /embeddings", b"{}", 404, "/v1/embeddings"),
]

ROUTES = {"chat": "/chat/completions", "completions": "/completions"}


def test_enough_kinds():
    """The acceptance asks for at least 25 kinds of malformed request; ids are unique."""
    assert len({c.id for c in CASES}) == len(CASES) >= 25


@pytest.fixture(scope="module")
def base_url(serve_port):
    from ray import serve

    url = deploy_server(serve_port, ["auth.api_key_env=null", f"limits.max_body_bytes={MAX_BODY}"],
                        name="serve-bad-input", route_prefix="/bad")
    yield url
    serve.delete("serve-bad-input")


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _create_params(create) -> set[str]:
    return {p for p in inspect.signature(create).parameters if not p.startswith("extra_")}


def send_with_openai(client, case: Case) -> httpx.Response:
    """The ``openai`` client sends the case: ``create`` when the body fits its signature (required
    arguments present; other fields go in ``extra_body``), else its raw ``post``."""
    create = client.chat.completions.create if case.route == "chat" else client.completions.create
    required = {"model", "messages"} if case.route == "chat" else {"model", "prompt"}
    try:
        if required <= set(case.body):
            known = _create_params(create)
            create(**{k: v for k, v in case.body.items() if k in known},
                   extra_body={k: v for k, v in case.body.items() if k not in known})
        else:
            client.post(ROUTES[case.route], body=case.body, cast_to=httpx.Response)
    except openai.APIStatusError as e:
        return e.response
    pytest.fail(f"{case.id}: the server accepted it")


def send_raw(base_url: str, case: Case) -> httpx.Response:
    if case.route in ROUTES:
        method, path = "POST", ROUTES[case.route]
    else:
        method, path = case.route.split(" ", 1)
    headers = {"Content-Type": "application/json", **case.headers} if case.body is not None else {}
    return httpx.request(method, base_url + path, content=case.body, headers=headers, timeout=60)


def good_request(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request(client, base_url, case):
    if isinstance(case.body, dict):
        response = send_with_openai(client, case)
    else:
        response = send_raw(base_url, case)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == "invalid_request_error"
    assert case.names in error["message"], error
    # fields are named as a client writes them: no pydantic union-branch names in the message
    assert "list[" not in error["message"] and "function-after" not in error["message"], error
    if case.param is not None:
        assert error["param"] == case.param, error
    good_request(client)  # the replica lives on and answers


def test_bad_stream_request_gets_a_4xx_before_streaming(client):
    """A streamed request that is bad is refused with a status, not a broken event stream."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSG, stream=True, max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"
    good_request(client)
