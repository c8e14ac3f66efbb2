"""The OpenAI wire format: strict request models, OpenAI-style errors, responses from ``openai`` types.

Responses are the ``openai`` package's own pydantic models (``ChatCompletion``, ``ChatCompletionChunk``,
``Completion``, ``Model``), so what we send is what the client parses; the backtracking extras are
additive fields on a choice (those models allow extra fields).

Requests are parsed by the strict models below, not by a library's request type, because none we
checked can reject the bad input a server must reject: the ``openai`` package's request params are
TypedDicts whose ``Iterable`` fields pydantic validates lazily (a bad message passes), and vLLM's
protocol classes accept unknown roles, NaN and negative temperatures and unknown fields (and import
all of vLLM, ~9 s). Their field names and types mirror ``openai``'s ``CompletionCreateParams``: a
test checks that every standard field accepted here is one of the ``openai`` package's, with our
three extension fields on top. Known OpenAI fields we do not implement are refused by name, never
silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI error JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- requests

EXTENSION_FIELDS = ("reset_logit_bias", "max_resets", "stream_mode")
"""Per-request extension fields (the ``openai`` client sends them with ``extra_body=``)."""


class _Strict(BaseModel):
    # strict: "0.5" is not a number and true is not an int; NaN and infinities are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        """The content as text (text parts joined by newlines, as vLLM does)."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    # extensions (bounds from the server's limits are checked after parsing)
    reset_logit_bias: float | None = None
    max_resets: int | None = None
    stream_mode: Literal["hold", "retract"] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1)]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def _openai_fields(kind: str) -> set[str]:
    """The request fields the ``openai`` package knows for ``chat`` or ``completions``."""
    if kind == "chat":
        from openai.types.chat import completion_create_params as params
    else:
        from openai.types import completion_create_params as params
    return set(params.CompletionCreateParamsBase.__annotations__) | {"stream"}


def _param(loc: tuple) -> str:
    """``('messages', 0, 'role')`` -> ``messages[0].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[TextPart]", "function-after", "constrained-int",
                      "constrained-float"):
            continue  # union branch names pydantic puts in locations
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_request(body: bytes, kind: Literal["chat", "completions"]) -> ChatRequest | CompletionRequest:
    """Parse and validate a request body; every problem is an ``APIError`` (400) naming the field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        message = f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        raise APIError(400, message) from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object; got {type(data).__name__}")
    model = ChatRequest if kind == "chat" else CompletionRequest
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _api_error(e, kind) from None


def _api_error(error: ValidationError, kind: str) -> APIError:
    known = _openai_fields(kind)
    messages, first_param = [], None
    seen: dict[str, int] = {}  # param -> its message's index
    for err in error.errors():
        param = _param(err["loc"])
        first_param = first_param or param
        if err["type"] == "extra_forbidden":
            field = str(err["loc"][-1])
            if len(err["loc"]) == 1 and field in known:
                text = "this OpenAI parameter is not supported by this server"
            else:
                text = "unknown field"
        elif err["type"] == "missing":
            text = "required"
        else:
            got = err.get("input")
            scalar = isinstance(got, str | int | float | bool | None)
            shown = json.dumps(got)[:80] if scalar else type(got).__name__
            text = f"{err['msg']} (got {shown})"
        if param in seen:  # a union reports each branch: one message per field, the branches joined
            messages[seen[param]] += f", or {text}"
            continue
        seen[param] = len(messages)
        messages.append(f"{param}: {text}")
    more = f"; and {len(messages) - 5} more" if len(messages) > 5 else ""
    return APIError(400, "; ".join(messages[:5]) + more, param=first_param)


# ---------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int):
    from openai.types import CompletionUsage

    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def chat_completion(id: str, created: int, model: str, choices: list[dict], usage_) -> dict:
    """A ``ChatCompletion``; each choice dict: index, text, finish_reason, backtracking."""
    from openai.types.chat import ChatCompletion, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice

    out = ChatCompletion(
        id=id, created=created, model=model, object="chat.completion", usage=usage_,
        choices=[Choice(index=c["index"], finish_reason=c["finish_reason"],
                        message=ChatCompletionMessage(role="assistant", content=c["text"]),
                        backtracking=c["backtracking"]) for c in choices],
    )
    return out.model_dump(mode="json", exclude_unset=True)


def chat_chunk(id: str, created: int, model: str, index: int, *, content: str | None = None,
               role: str | None = None, finish_reason: str | None = None,
               backtracking: dict | None = None) -> dict:
    """A ``ChatCompletionChunk`` with one choice."""
    from openai.types.chat import ChatCompletionChunk
    from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta

    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    extra = {"backtracking": backtracking} if backtracking is not None else {}
    chunk = ChatCompletionChunk(
        id=id, created=created, model=model, object="chat.completion.chunk",
        choices=[Choice(index=index, delta=ChoiceDelta(**delta), finish_reason=finish_reason, **extra)],
    )
    return chunk.model_dump(mode="json", exclude_unset=True)


def usage_chunk(id: str, created: int, model: str, kind: str, usage_) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    if kind == "chat":
        from openai.types.chat import ChatCompletionChunk

        return ChatCompletionChunk(id=id, created=created, model=model, object="chat.completion.chunk",
                                   choices=[], usage=usage_).model_dump(mode="json", exclude_unset=True)
    from openai.types import Completion

    return Completion(id=id, created=created, model=model, object="text_completion", choices=[],
                      usage=usage_).model_dump(mode="json", exclude_unset=True)


def completion(id: str, created: int, model: str, choices: list[dict], usage_) -> dict:
    """A ``Completion``; each choice dict: index, text, finish_reason, backtracking."""
    from openai.types import Completion, CompletionChoice

    out = Completion(
        id=id, created=created, model=model, object="text_completion", usage=usage_,
        choices=[CompletionChoice(index=c["index"], text=c["text"], finish_reason=c["finish_reason"],
                                  logprobs=None, backtracking=c["backtracking"]) for c in choices],
    )
    return out.model_dump(mode="json", exclude_unset=True)


def completion_chunk(id: str, created: int, model: str, index: int, *, text: str = "",
                     finish_reason: str | None = None, backtracking: dict | None = None) -> dict:
    """A streamed ``Completion`` with one choice.

    Built with ``model_construct``: ``CompletionChoice.finish_reason`` is required to be set in the
    ``openai`` types, but a chunk before the last has none (null on the wire, as OpenAI and vLLM send).
    """
    from openai.types import Completion, CompletionChoice

    extra = {"backtracking": backtracking} if backtracking is not None else {}
    choice = CompletionChoice.model_construct(index=index, text=text, finish_reason=finish_reason,
                                              logprobs=None, **extra)
    chunk = Completion.model_construct(id=id, created=created, model=model, object="text_completion",
                                       choices=[choice])
    return chunk.model_dump(mode="json")


def model_list(model_id: str, created: int) -> dict:
    from openai.types import Model

    model = Model(id=model_id, created=created, object="model", owned_by="bt-ray")
    return {"object": "list", "data": [model.model_dump(mode="json")]}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def check_bounds(req: Any, limits) -> None:
    """Limits that depend on the server's config (400 naming the field)."""
    max_tokens = req.requested_max_tokens()
    uses_new_name = getattr(req, "max_completion_tokens", None) is not None
    field = "max_completion_tokens" if uses_new_name else "max_tokens"
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"{field}: must be <= {limits.max_tokens} on this server (got {max_tokens})",
                       param=field)
    num_prompts = len(req.prompts()) if isinstance(req, CompletionRequest) else 1
    if req.n * num_prompts > limits.max_n:
        what = "must be" if num_prompts == 1 else "times the number of prompts must be"
        raise APIError(400, f"n: {what} <= {limits.max_n} on this server (got {req.n * num_prompts})",
                       param="n")
    if isinstance(req, ChatRequest) and len(req.messages) > limits.max_messages:
        raise APIError(400, f"messages: at most {limits.max_messages} messages on this server "
                       f"(got {len(req.messages)})", param="messages")
    if req.reset_logit_bias is not None and not (
        limits.min_reset_logit_bias <= req.reset_logit_bias <= limits.max_reset_logit_bias
    ):
        raise APIError(400, f"reset_logit_bias: must be in [{limits.min_reset_logit_bias}, "
                       f"{limits.max_reset_logit_bias}] on this server (got {req.reset_logit_bias})",
                       param="reset_logit_bias")
    if req.max_resets is not None and not limits.min_max_resets <= req.max_resets <= limits.max_max_resets:
        raise APIError(400, f"max_resets: must be in [{limits.min_max_resets}, {limits.max_max_resets}] on "
                       f"this server (got {req.max_resets})", param="max_resets")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
