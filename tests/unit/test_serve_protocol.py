"""The request models mirror the openai package's request params: every standard field the server
accepts is one of openai's, with the same name, and only our three extensions are added."""

from __future__ import annotations

import pytest

from bt_ray.serve import protocol
from bt_ray.serve.protocol import EXTENSION_FIELDS, ChatRequest, CompletionRequest


@pytest.mark.parametrize("model,kind", [(ChatRequest, "chat"), (CompletionRequest, "completions")])
def test_accepted_fields_are_openai_fields_plus_our_extensions(model, kind):
    ours = set(model.model_fields) - set(EXTENSION_FIELDS)
    openai_fields = protocol._openai_fields(kind)
    assert ours <= openai_fields, sorted(ours - openai_fields)
    assert set(EXTENSION_FIELDS) <= set(model.model_fields)
    assert not set(EXTENSION_FIELDS) & openai_fields  # an extension never shadows a real OpenAI field


def test_known_but_unsupported_openai_fields_are_refused_by_name():
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}'
    with pytest.raises(protocol.APIError, match="logit_bias: this OpenAI parameter is not supported"):
        protocol.parse_request(body, "chat")
    body = b'{"model": "m", "prompt": "hi", "suffix": "x"}'
    with pytest.raises(protocol.APIError, match="suffix: this OpenAI parameter is not supported"):
        protocol.parse_request(body, "completions")
