"""The HTTP layer: an OpenAI-compatible API with per-request steers, and the playground page.

Routes::

    GET  /                      the playground (plain HTML + a small script, no CDN)
    GET  /v1/models             the one served model
    GET  /v1/steers             loaded steers: meaning of +, kind, ranges, strength curve, keywords
    POST /v1/completions        OpenAI completions (stream by server-sent events or not)
    POST /v1/chat/completions   OpenAI chat completions (the tokenizer's chat template when it has one)
    POST /v1/explain            token-level evidence of an LM-Steer steer on a text (steerport.explain)
    GET  /health

Every refused request gets a 4xx in the OpenAI error shape; the engine thread survives any
single request's failure; a client that disconnects mid-stream cancels its rows.

Example::

    state = ServerState.build(lm, {"positive": steer}, model_name="smollm2-135m")
    app = create_app(state)          # serve with uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerport.errors import SteerportError
from steerport.models import LoadedModel
from steerport.serve.engine import Engine
from steerport.serve.limits import Limits
from steerport.serve.protocol import (
    APIError,
    Sampling,
    bad,
    parse_common,
    parse_messages,
    parse_prompts,
    usage,
)
from steerport.serve.streams import Slot, collect, error_response, events, json_body, sse, start_job
from steerport.steer import Steer

STATIC = {"playground.js": "text/javascript", "playground.css": "text/css"}


@dataclass
class ServerState:
    """Everything the handlers share: the engine, the model's tokenizer, limits and steer info."""

    lm: LoadedModel
    steers: dict[str, Steer]
    engine: Engine
    model_name: str
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    info: list[dict] = field(default_factory=list)
    keywords: dict[str, Any] = field(default_factory=dict)  # name -> keywords (filled in after start)
    active: int = 0
    tok_lock: threading.RLock = field(default_factory=threading.RLock)
    started: float = field(default_factory=time.time)

    @classmethod
    def build(cls, lm: LoadedModel, steers: dict[str, Steer], *, model_name: str, limits: Limits | None = None,
              api_key: str | None = None, curve: bool = True, keywords: bool = True, force: bool = False) -> ServerState:
        """Check the steers, describe them (strength curves), start the engine, queue the keywords."""
        from steerport.serve.info import describe_steers
        from steerport.serve.rows import check_steers
        from steerport.strength import warn_uncalibrated

        limits = limits or Limits()
        check_steers(lm, list(steers.values()), force=force)
        warn_uncalibrated(list(steers.values()), logging.getLogger("steerport.serve").warning)
        info = describe_steers(lm, steers, max_value=limits.max_value, curve=curve, keywords=False)
        lock = threading.RLock()
        engine = Engine(lm, steers, max_batch=limits.max_batch, window_s=limits.window_ms / 1000, tok_lock=lock)
        state = cls(lm=lm, steers=steers, engine=engine, model_name=model_name, limits=limits, api_key=api_key,
                    info=info, tok_lock=lock)
        engine.start()
        if keywords:
            state._queue_keywords()
        return state

    def _queue_keywords(self) -> None:
        from steerport.explain import default_neutral, steer_keywords
        from steerport.serve.info import _kw

        for name, steer in self.steers.items():
            if steer.kind != "lm-steer":
                continue
            self.keywords[name] = None  # pending

            def job(name=name, steer=steer):
                with self.tok_lock:
                    kw = steer_keywords(self.lm, steer, k=12, n_directions=2, texts=default_neutral(4), force=True)
                self.keywords[name] = {
                    "raised": _kw(kw.raised), "lowered": _kw(kw.lowered),
                    "directions": [{"share": round(d.share, 4), "positive": _kw(d.positive), "negative": _kw(d.negative)}
                                   for d in kw.directions],
                }

            self.engine.call(job, background=True)

    # ------------------------------------------------------------------ tokens

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        with self.tok_lock:
            ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        if not ids:  # an empty prompt: start from BOS (or EOS), as OpenAI does with <|endoftext|>
            tok = self.tokenizer
            first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [first if first is not None else 0]
        return ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            try:
                with self.tok_lock:
                    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001  (jinja templates raise many types, e.g. for role orders)
                raise bad(f"the model's chat template refused these messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                          "messages") from None
            return self.encode(text, special=False)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)

    def context_length(self) -> int | None:
        model: Any = self.lm.model
        cfg = model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return getattr(cfg, "max_position_embeddings", None)

    def check_ids(self, ids: list[int], max_tokens: int, param: str = "prompt") -> None:
        V = len(self.tokenizer)
        if any(t < 0 or t >= V for t in ids):
            raise bad(f"token ids must be in [0, {V})", param)
        if len(ids) > self.limits.max_prompt_tokens:
            raise bad(f"the prompt has {len(ids)} tokens; this server allows at most {self.limits.max_prompt_tokens}",
                      param, "context_length_exceeded")
        ctx = self.context_length()
        if ctx and len(ids) + max_tokens > ctx:
            raise bad(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {ctx}",
                      "max_tokens", "context_length_exceeded")


# --------------------------------------------------------------------------- the app


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application over a started :class:`ServerState`."""
    app = FastAPI(title="steerport serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.steerport = state
    limits = state.limits

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(SteerportError)
    async def _steerport_error(request: Request, e: SteerportError):
        return error_response(400, str(e))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), state.api_key.encode()):
                return error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        return await call_next(request)

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is not None and m != state.model_name:
            raise APIError(404, f"model {m!r} is not served here; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------ pages

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("steerport.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:  # a fixed list: no path from the client is ever opened
            raise APIError(404, f"no static file {name!r}", code="not_found")
        data = resources.files("steerport.serve").joinpath(f"static/{name}").read_bytes()
        return Response(data, media_type=STATIC[name])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "active_requests": state.active, **state.engine.stats}

    # ------------------------------------------------------------------ listing

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started),
                                            "owned_by": "steerport", "steers": list(state.steers)}]}

    @app.get("/v1/steers")
    async def steers():
        data = []
        for rec in state.info:
            rec = dict(rec)
            if rec["name"] in state.keywords:
                kw = state.keywords[rec["name"]]
                rec["keywords"] = kw
                rec["keywords_status"] = "ready" if kw is not None else "pending"
            data.append(rec)
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ generation

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request, limits)
        check_model(body)
        s = parse_common(body, state.steers, limits, default_max_tokens=limits.default_max_tokens)
        prompts = [p if isinstance(p, list) else state.encode(p) for p in parse_prompts(body, limits)]
        for ids in prompts:
            state.check_ids(ids, s.max_tokens)
        return await _respond(request, prompts, s, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await json_body(request, limits)
        check_model(body)
        s = parse_common(body, state.steers, limits, default_max_tokens=0)
        ids = state.chat_ids(parse_messages(body))
        if s.max_tokens == 0:  # not given: as much as the limit and the model's context leave
            ctx = state.context_length()
            s.max_tokens = max(1, min(limits.max_tokens, ctx - len(ids) if ctx else limits.max_tokens))
        state.check_ids(ids, s.max_tokens, "messages")
        return await _respond(request, [ids], s, chat=True)

    async def _respond(request: Request, prompts: list[list[int]], s: Sampling, *, chat: bool):
        slot = Slot(state)
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name, "system_fingerprint": None}
        try:
            job = start_job(state, prompts, s)
        except BaseException:
            slot.release()
            raise
        if not s.stream:
            try:
                texts, finish, completion_tokens = await collect(job, request)
            finally:
                job.cancel()
                slot.release()
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
                           for i, (t, f) in enumerate(zip(texts, finish))]
            else:
                choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                           for i, (t, f) in enumerate(zip(texts, finish))]
            return {**head, "object": kind, "choices": choices,
                    "usage": usage(job.prompt_tokens, completion_tokens), "steers": s.steers}

        async def stream():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            tokens = [0] * len(job.rows)
            try:
                if chat:
                    for i in range(len(job.rows)):
                        yield sse({**head, "object": chunk_kind, "choices": [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]})
                async for index, e in events(job):
                    tokens[index] = e.tokens
                    if e.finish == "error":
                        yield sse(APIError(500, e.error or "generation failed", type="server_error").body())
                        break
                    finish = e.finish if e.finish in ("stop", "length") else None
                    if not e.text and finish is None:
                        continue
                    if chat:
                        delta = {"content": e.text} if e.text else {}
                        if e.text and finish:  # the last text, then the finish on its own chunk
                            yield sse({**head, "object": chunk_kind, "choices": [
                                {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}]})
                            delta = {}
                        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
                    else:
                        choice = {"index": index, "text": e.text, "finish_reason": finish, "logprobs": None}
                    yield sse({**head, "object": chunk_kind, "choices": [choice]})
                if s.include_usage:
                    yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(job.prompt_tokens, sum(tokens))})
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects: the rows leave the batch, the slot frees
                job.cancel()
                slot.release()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ explanations

    @app.post("/v1/explain")
    async def explain(request: Request):
        """{"steer": name, "text": str, "value": s} -> per-token Δ = log p(+s) − log p(−s) and spans."""
        from steerport.explain import explain_text
        from steerport.serve.protocol import parse_steers

        body = await json_body(request, limits)
        name, text = body.get("steer"), body.get("text")
        if not isinstance(name, str) or name not in state.steers:
            raise bad(f"steer must be one of the loaded steers: {', '.join(state.steers)}", "steer", "unknown_steer")
        if state.steers[name].kind != "lm-steer":
            raise bad(f"steer {name!r} is {state.steers[name].kind}; explanations are for lm-steer steers", "steer")
        if not isinstance(text, str) or not text.strip():
            raise bad("text must be a non-empty string", "text")
        value = body.get("value", 1.0)
        value = parse_steers({name: value}, state.steers, limits).get(name)
        if value is None:
            raise bad("value must be non-zero", "value")
        n = len(state.encode(text))
        cap = limits.max_prompt_tokens + limits.max_tokens
        if n > cap:
            raise bad(f"text has {n} tokens; at most {cap}", "text", "context_length_exceeded")
        steer = state.steers[name]

        def job():
            with state.tok_lock:
                return explain_text(state.lm, steer, text, abs(value), force=True)

        slot = Slot(state)
        try:
            ex = await asyncio.wrap_future(state.engine.call(job))
        finally:
            slot.release()
        return {"object": "explanation", "steer": name, "text": text, "positive": ex.positive, "value": ex.value,
                "score": ex.score,
                "tokens": [{"text": text[t.start:t.end], "start": t.start, "end": t.end, "delta": t.delta} for t in ex.tokens],
                "spans": [{"text": sp.text, "total": sp.total, "share": sp.share} for sp in ex.spans]}

    return app
