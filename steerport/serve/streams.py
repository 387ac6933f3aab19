"""Request plumbing of the HTTP layer: JSON bodies, OpenAI-shaped errors, request slots, and the
queue that carries a request's rows' events from the engine thread to its handler.

Example::

    job = start_job(state, prompts, sampling)        # rows submitted to the engine
    texts, finish, tokens = await collect(job, request)
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse

from steerport.serve.limits import Limits
from steerport.serve.protocol import APIError, Sampling, bad
from steerport.serve.rows import Row

if TYPE_CHECKING:
    from steerport.serve.app import ServerState


def error_response(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type=type, code=code, param=param).body(), status_code=status)


async def json_body(request: Request, limits: Limits) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
        raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
    raw = await request.body()
    if len(raw) > limits.max_body_bytes:
        raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Slot:
    """One of the server's ``max_concurrent`` request slots (429 when none is free)."""

    def __init__(self, state: "ServerState"):
        if state.active >= state.limits.max_concurrent:
            raise APIError(429, f"the server is busy ({state.limits.max_concurrent} requests in flight); retry later",
                           type="rate_limit_error", code="too_many_requests")
        state.active += 1
        self.state, self.held = state, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.active -= 1


@dataclass
class Job:
    """The rows of one request and the queue their events arrive on."""

    rows: list[Row]
    prompt_tokens: int
    queue: asyncio.Queue

    def cancel(self) -> None:
        for r in self.rows:
            r.cancelled.set()


def emitter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, index: int):
    """Hand a row's events from the engine thread to the request's queue (dropped once the loop is gone)."""

    def emit(e) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, (index, e))
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening
            pass

    return emit


def start_job(state: "ServerState", prompts: list[list[int]], s: Sampling) -> Job:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    deadline = time.monotonic() + state.limits.request_timeout_s
    rows = []
    for p, ids in enumerate(prompts):
        for j in range(s.n):
            index = p * s.n + j
            rows.append(Row(
                prompt_ids=ids, max_tokens=s.max_tokens, values=dict(s.steers), temperature=s.temperature,
                top_p=s.top_p, seed=(s.seed + index) % (2**63), stop=s.stop, deadline=deadline,
                emit=emitter(loop, q, index),
            ))
    state.engine.submit(rows)
    return Job(rows, sum(len(ids) for ids in prompts), q)


async def collect(job: Job, request: Request) -> tuple[list[str], list[str], int]:
    """Wait for every row; returns texts, finish reasons, completion tokens (cancels on disconnect)."""
    texts = [""] * len(job.rows)
    finish: list[str | None] = [None] * len(job.rows)
    tokens = [0] * len(job.rows)
    while any(f is None for f in finish):
        try:
            index, e = await asyncio.wait_for(job.queue.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise asyncio.CancelledError
            continue
        texts[index] += e.text
        tokens[index] = e.tokens
        if e.finish:
            if e.finish == "error":
                raise APIError(500, e.error or "generation failed", type="server_error")
            finish[index] = e.finish
    return texts, [f or "stop" for f in finish], sum(tokens)


async def events(job: Job):
    """(index, Event) until every row has finished."""
    left = len(job.rows)
    while left:
        index, e = await job.queue.get()
        if e.finish:
            left -= 1
        yield index, e
