"""Server limits: what one request may ask for, and how much the server takes on at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Every bound a request is checked against (violations are 4xx errors, never a 500)."""

    max_prompt_tokens: int = 1024  # tokens of one prompt (after the chat template)
    max_tokens: int = 256  # cap on a request's max_tokens
    default_max_tokens: int = 16  # completions without max_tokens (the OpenAI default)
    max_n: int = 4  # choices per request
    max_prompts: int = 8  # prompts in one completions request
    max_concurrent: int = 64  # requests in flight; more get 429
    request_timeout_s: float = 120.0  # a request's rows end (finish_reason "length") after this
    max_value: float = 10.0  # |steer value| allowed per steer
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 64
    max_body_bytes: int = 1 << 20  # request body size
    max_batch: int = 32  # rows decoded together
    window_ms: float = 15.0  # how long the engine waits to fill a batch
