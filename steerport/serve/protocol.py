"""The OpenAI wire format: validating request bodies and shaping responses and errors.

Requests are parsed by hand (not by a schema library) so every problem becomes one clear
message naming the offending field, in the OpenAI error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Steers travel in the extra field ``"steers": {"positive": 3, "detox": 2}`` (``extra_body`` in
the official client); names must be among the steers loaded at start — a client can never
make the server open a file.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from steerport.serve.limits import Limits


class APIError(Exception):
    """A request the server refuses: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Fields we accept only at their neutral value (anything else would be silently wrong).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
}


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{key} must be a finite number, got {v!r}", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"{key} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}", key)
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{key} must be an integer, got {v!r}", key)
    if v < lo or v > hi:
        raise bad(f"{key} must be between {lo} and {hi}, got {v}", key)
    return v


def parse_steers(raw: Any, loaded: dict[str, Any], limits: Limits) -> dict[str, float]:
    """``{"name": value}`` checked against the loaded steers and the allowed range."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad('steers must be an object of name: value, e.g. {"positive": 3}', "steers")
    names = ", ".join(loaded) or "(none)"
    out: dict[str, float] = {}
    for name, v in raw.items():
        if name not in loaded:
            hint = " (steers are chosen by the names loaded at server start; files are never opened)" if any(
                c in name for c in "/\\.") else ""
            raise bad(f"unknown steer {name!r}{hint}; loaded: {names}", f"steers.{name}", "unknown_steer")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"steer {name!r}: value must be a number, got {v!r}", f"steers.{name}")
        if not math.isfinite(v):
            raise bad(f"steer {name!r}: value must be finite, got {v!r}", f"steers.{name}")
        if abs(v) > limits.max_value:
            raise bad(f"steer {name!r}: value {v:g} is outside the allowed range "
                      f"[-{limits.max_value:g}, {limits.max_value:g}]", f"steers.{name}", "steer_value_out_of_range")
        if v != 0:
            out[name] = float(v)
    return out


@dataclass
class Sampling:
    """What every choice of a request shares."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    steers: dict[str, float] = field(default_factory=dict)


def parse_common(body: dict, loaded: dict[str, Any], limits: Limits, *, default_max_tokens: int) -> Sampling:
    """The fields completions and chat completions share."""
    for key, neutral in UNSUPPORTED.items():
        if key in body and body[key] not in neutral:
            raise bad(f"{key} is not supported by this server", key, "unsupported_parameter")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, default_max_tokens, 1, limits.max_tokens) or default_max_tokens
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    if seed is None:
        seed = secrets.randbits(62)
    n = _integer(body, "n", 1, 1, limits.max_n) or 1
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop must be a non-empty string or a list of them", "stop")
    if len(stop) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stop):
        raise bad(f"stop: at most {limits.max_stop} strings of at most {limits.max_stop_chars} characters", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    return Sampling(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, n=n, stop=stop, stream=stream,
        include_usage=bool(opts.get("include_usage", False)), steers=parse_steers(body.get("steers"), loaded, limits),
    )


def parse_prompts(body: dict, limits: Limits) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt is required", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            prompts: list = list(p)
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            prompts = [list(p)]
        elif all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise bad("prompt must be a string, a list of strings, or token ids", "prompt")
        if len(prompts) > limits.max_prompts:
            raise bad(f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", "prompt")
        return prompts
    raise bad("prompt must be a non-empty string, list of strings, or token ids", "prompt")


def parse_messages(body: dict) -> list[dict[str, str]]:
    """``messages``: [{"role": ..., "content": str | [{"type": "text", "text": ...}]}, ...]."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
