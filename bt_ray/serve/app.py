"""The OpenAI-compatible backtracking server: a Ray Serve deployment with a FastAPI ingress.

Why not Ray Serve LLM (``ray.serve.llm``)? Its OpenAI server is vLLM's: it renders chat templates as
text (a literal ``[RESET]`` in a message would become the control token), returns every generated
token as text (the discarded, unsafe part included), and has no place for hold/retract streaming or
the ``backtracking`` fields; a ``server_cls`` subclass would have to replace its request handling,
templating and streaming, i.e. all of it, and it serves vLLM only (no HF engine for CPU). So this is
a plain Serve deployment: FastAPI routes, the engines of ``bt_ray.serve.engine`` (HF with Serve's
dynamic batching, vLLM with its continuous batching) and ``bt_ray.reset.stream`` for what a client
may see. Routes: ``/v1/chat/completions``, ``/v1/completions`` (JSON or SSE), ``/v1/models``,
``/health``; metrics go to Ray's Prometheus endpoint (``bt_ray_serve_*``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import secrets
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from bt_ray.reset import encode_chat_prompt, encode_completion_prompt, shown_text
from bt_ray.reset.stream import ResetStream
from bt_ray.serve import protocol
from bt_ray.serve.config import AuthCfg, ServeCfg
from bt_ray.serve.engine import GenRequest
from bt_ray.serve.protocol import APIError

app = FastAPI(title="bt-ray", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Unknown routes and methods answer in OpenAI's error shape too.
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)


def served_model_name(cfg: ServeCfg) -> str:
    """The model id clients send: ``served_model_name``, else the model dir's name (its parent's for a
    dir named ``model``, as training writes ``<run>/model``)."""
    from bt_ray.models import model_label

    return cfg.served_model_name or model_label(cfg.model.name)


def read_api_key(auth: AuthCfg) -> str | None:
    """The key clients must send: the first line of ``auth.api_key_file``, else ``$auth.api_key_env``;
    None when there is none.

    Raises:
        ValueError: ``auth.api_key_file`` is missing or empty.
    """
    if auth.api_key_file:
        path = Path(auth.api_key_file).expanduser()
        if not path.is_file():
            raise ValueError(f"auth.api_key_file: no such file {path}")
        key = (path.read_text().splitlines() or [""])[0].strip()
        if not key:
            raise ValueError(f"auth.api_key_file: {path} is empty")
        return key
    if auth.api_key_env:
        return os.environ.get(auth.api_key_env, "").strip() or None
    return None


def api_key_sha256(auth: AuthCfg) -> str | None:
    """SHA-256 of ``read_api_key(auth)``; None: no key. Only the digest reaches the replicas
    (deployment arguments are stored by Ray), never the key."""
    key = read_api_key(auth)
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def build_stream_engine(cfg: ServeCfg):
    """The ``StreamEngine`` ``cfg.engine.kind`` names, with the model loaded."""
    engine_cfg = cfg.engine.eval_engine(cfg.deployment.num_gpus)
    if cfg.engine.kind == "vllm":
        from bt_ray.serve.vllm_engine import VLLMStreamEngine

        return VLLMStreamEngine(cfg.model, engine_cfg)
    from bt_ray.eval.engines import HFGenerator
    from bt_ray.serve.engine import HFStreamEngine

    return HFStreamEngine(HFGenerator.from_cfg(cfg.model, engine_cfg),
                          max_batch_size=cfg.engine.max_batch_size,
                          batch_wait_timeout_s=cfg.engine.batch_wait_timeout_s)


class _Metrics:
    """Ray Serve metrics (exported on Ray's Prometheus endpoint, tagged with deployment and replica)."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("bt_ray_serve_requests", "Requests by route and status.",
                                        tag_keys=("route", "status"))
        self.resets = metrics.Counter("bt_ray_serve_resets", "[RESET] tokens generated.")
        self.discarded = metrics.Counter("bt_ray_serve_discarded_tokens", "Tokens discarded by a reset.")
        self.generated = metrics.Counter("bt_ray_serve_generated_tokens",
                                         "Tokens generated, discarded ones included.")
        self.unheld = metrics.Counter("bt_ray_serve_unheld_resets",
                                      "Resets after text was released in hold mode (should stay 0).")
        bounds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        self.latency = metrics.Histogram("bt_ray_serve_latency_s", "Request latency.", boundaries=bounds,
                                         tag_keys=("route",))
        self.ttfkt = metrics.Histogram("bt_ray_serve_time_to_first_kept_token_s",
                                       "Time to the first token of the shown answer.", boundaries=bounds)


@serve.deployment
@serve.ingress(app)
class BacktrackingServer:
    """One replica: a loaded engine behind the OpenAI routes."""

    def __init__(self, cfg: ServeCfg, api_key_digest: str | None):
        self.cfg = cfg
        self.api_key_digest = api_key_digest
        self.engine = build_stream_engine(cfg)
        self.model_id = served_model_name(cfg)
        self.created = int(time.time())
        self.metrics = _Metrics()

    async def check_health(self) -> None:
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            await check()

    async def __del__(self):
        await self.engine.close()

    # ------------------------------------------------------------ routes

    @app.get("/health")
    async def health(self):
        return {"status": "ok", "model": self.model_id}

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return protocol.model_list(self.model_id, self.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "completions")

    # ------------------------------------------------------------ request handling

    async def _handle(self, request: Request, kind: str):
        start = time.perf_counter()
        try:
            self._authorize(request)
            req = protocol.parse_request(await self._read_body(request), kind)
            if req.model != self.model_id:
                raise APIError(404, f"model: {req.model!r} is not served here; this server serves "
                               f"{self.model_id!r} (GET /v1/models)", param="model", code="model_not_found")
            protocol.check_bounds(req, self.cfg.limits)
            choices = self._generations(req, kind)
            if req.stream:
                self.metrics.requests.inc(tags={"route": kind, "status": "200"})
                return StreamingResponse(self._stream(req, kind, choices, start),
                                         media_type="text/event-stream")
            body = await self._complete(req, kind, choices)
        except APIError as e:
            self.metrics.requests.inc(tags={"route": kind, "status": str(e.status)})
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # a fault of ours, not of the request: 500, and the replica lives on
            self.metrics.requests.inc(tags={"route": kind, "status": "500"})
            error = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            return JSONResponse(error.body(), status_code=500)
        self.metrics.requests.inc(tags={"route": kind, "status": "200"})
        self.metrics.latency.observe(time.perf_counter() - start, tags={"route": kind})
        return JSONResponse(body)

    def _authorize(self, request: Request) -> None:
        if self.api_key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if not hmac.compare_digest(digest, self.api_key_digest):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {declared} bytes; at most {limit} on this server")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is over {limit} bytes, the most this server takes")
        return bytes(body)

    def _generations(self, req, kind: str) -> list[tuple[GenRequest, str]]:
        """One ``(GenRequest, stream mode)`` per choice, prompts encoded safely and checked for length."""
        tokenizer, limits = self.engine.tokenizer, self.cfg.limits
        if kind == "chat":
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:  # contents never become control tokens (encode_chat_prompt); the template may refuse
                prompts = [encode_chat_prompt(tokenizer, messages)]
            except Exception as e:  # jinja's TemplateError, e.g. "roles must alternate"
                raise APIError(400, f"messages: the model's chat template refused them: {e}",
                               param="messages") from None
            fields = ["messages"]
        else:
            prompts = [encode_completion_prompt(tokenizer, p) for p in req.prompts()]
            fields = (["prompt"] if isinstance(req.prompt, str)
                      else [f"prompt[{i}]" for i in range(len(prompts))])
        decode = self.cfg.decode
        max_tokens = req.requested_max_tokens() or decode.max_new_tokens
        context = getattr(self.engine, "max_context", None)
        for ids, field in zip(prompts, fields):
            if len(ids) > limits.max_prompt_tokens:
                raise APIError(400, f"{field}: {len(ids)} prompt tokens; at most {limits.max_prompt_tokens} "
                               "on this server", param=field, code="context_length_exceeded")
            if context is not None and len(ids) + max_tokens > context:
                raise APIError(400, f"{field}: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed the "
                               f"model's context of {context} tokens", param=field,
                               code="context_length_exceeded")
        mode = req.stream_mode or self.cfg.stream.mode
        window = decode.reset_window
        if req.stream and mode == "hold":  # hold back at most hold_window_tokens
            window = min(w for w in (window, self.cfg.stream.hold_window_tokens) if w is not None)
        temperature = decode.temperature if req.temperature is None else req.temperature
        per_choice = dataclasses.replace(
            decode, max_new_tokens=max_tokens, temperature=temperature,
            top_p=decode.top_p if req.top_p is None else req.top_p,
            reset_bias=decode.reset_bias if req.reset_logit_bias is None else req.reset_logit_bias,
            max_resets=decode.max_resets if req.max_resets is None else req.max_resets,
            reset_window=window,
        )
        if req.seed is not None:
            base_seed = req.seed
        else:  # OpenAI semantics: no seed, a fresh sample each time
            base_seed = secrets.randbits(31) if temperature > 0 else decode.seed
        return [(GenRequest(ids, per_choice, base_seed + j), mode)
                for ids in prompts for j in range(req.n)]

    def _reset_stream(self, gen: GenRequest, mode: str) -> ResetStream:
        return ResetStream(self.engine.tokenizer, self.engine.reset_id, self.engine.stop_ids, mode=mode,
                           max_resets=gen.decode.max_resets, window=gen.decode.reset_window)

    async def _run(self, gen: GenRequest, stream: ResetStream, on_events=None) -> None:
        """Generate one choice into ``stream``; ``on_events`` gets each batch of events."""
        start = time.perf_counter()
        times: list[float] = []
        async for ids in self.engine.stream(gen):
            times += [time.perf_counter() - start] * len(ids)
            events = stream.feed(ids)
            if on_events is not None and events:
                await on_events(events)
        events = stream.finish()
        if on_events is not None and events:
            await on_events(events)
        out = stream.output
        m = self.metrics
        for counter, value in ((m.generated, len(stream.ids)), (m.resets, out.num_resets),
                               (m.discarded, out.num_discarded_tokens),
                               (m.unheld, stream.unheld_resets)):
            if value:  # Ray's Counter.inc refuses 0
                counter.inc(value)
        if out.shown_ids:
            self.metrics.ttfkt.observe(times[out.first_kept_index])

    def _summary(self, stream: ResetStream) -> dict:
        out = stream.output
        summary = {"reset": out.did_reset, "num_resets": out.num_resets,
                   "discarded_tokens": out.num_discarded_tokens}
        if self.cfg.return_discarded:
            split = out.raw_ids[: len(out.raw_ids) - len(out.shown_ids)]
            summary["discarded_text"] = self.engine.tokenizer.decode(split, skip_special_tokens=False)
        return summary

    async def _complete(self, req, kind: str, choices) -> dict:
        streams = [self._reset_stream(gen, "retract") for gen, _ in choices]
        await asyncio.gather(*(self._run(gen, s) for (gen, _), s in zip(choices, streams)))
        tokenizer = self.engine.tokenizer
        rows = [{"index": i, "text": shown_text(tokenizer, s.output), "backtracking": self._summary(s),
                 "finish_reason": "stop" if s.output.stopped else "length"} for i, s in enumerate(streams)]
        usage = protocol.usage(sum(len(gen.prompt_ids) for gen, _ in choices[:: req.n]),
                               sum(len(s.ids) for s in streams))
        build = protocol.chat_completion if kind == "chat" else protocol.completion
        return build(f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()),
                     self.model_id, rows, usage)

    async def _stream(self, req, kind: str, choices, start: float):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created, model = int(time.time()), self.model_id
        queue: asyncio.Queue = asyncio.Queue()
        streams = [self._reset_stream(gen, mode) for gen, mode in choices]

        async def pump(index: int, gen: GenRequest) -> None:
            async def put(events):
                await queue.put((index, events))
            try:
                await self._run(gen, streams[index], put)
                await queue.put((index, None))
            except Exception as e:  # reported to the client as an SSE error event
                await queue.put((index, e))

        def chunk(index, **kw):
            if kind == "chat":
                return protocol.chat_chunk(rid, created, model, index, **kw)
            kw.pop("role", None)
            text = kw.pop("content", None) or ""
            return protocol.completion_chunk(rid, created, model, index, text=text, **kw)

        tasks = [asyncio.ensure_future(pump(i, gen)) for i, (gen, _) in enumerate(choices)]
        try:
            if kind == "chat":
                for i in range(len(choices)):
                    yield protocol.sse(chunk(i, role="assistant", content=""))
            remaining = len(choices)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                    finish = "stop" if streams[index].output.stopped else "length"
                    summary = self._summary(streams[index])
                    yield protocol.sse(chunk(index, finish_reason=finish, backtracking=summary))
                elif isinstance(item, Exception):
                    yield protocol.sse(APIError(500, f"generation failed: {type(item).__name__}: {item}",
                                                type="server_error").body())
                    return
                else:
                    for event in item:
                        if event.kind == "text":
                            yield protocol.sse(chunk(index, content=event.text))
                        else:
                            yield protocol.sse(chunk(index, content="", backtracking={
                                "event": "reset", "retracted_chars": event.retracted_chars,
                                "num_resets": event.num_resets}))
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = protocol.usage(sum(len(gen.prompt_ids) for gen, _ in choices[:: req.n]),
                                       sum(len(s.ids) for s in streams))
                yield protocol.sse(protocol.usage_chunk(rid, created, model, kind, usage))
            yield protocol.sse("[DONE]")
            self.metrics.latency.observe(time.perf_counter() - start, tags={"route": kind})
        finally:
            for task in tasks:
                task.cancel()  # a client that went away: its generations stop


def build_app(cfg: ServeCfg):
    """The Serve application for ``cfg`` (replicas, autoscaling and resources from ``cfg.deployment``)."""
    d = cfg.deployment
    options = dict(
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        max_ongoing_requests=d.max_ongoing_requests,
        health_check_period_s=d.health_check_period_s,
        health_check_timeout_s=d.health_check_timeout_s,
        logging_config={"log_level": d.log_level},
    )
    if d.autoscaling.enabled:
        a = d.autoscaling
        options["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "target_ongoing_requests": a.target_ongoing_requests}
    else:
        options["num_replicas"] = d.num_replicas
    return BacktrackingServer.options(**options).bind(cfg, api_key_sha256(cfg.auth))
