"""The ``steerport serve`` command: load a model and named steers, then serve them over HTTP.

Wire it into a typer app with :func:`register`::

    from steerport.serve.command import register
    register(app)          # adds `steerport serve MODEL --steer NAME=FILE.st ...`
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

import typer

from steerport.errors import SteerportError
from steerport.serve.limits import Limits

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_named_steers(args: list[str]) -> dict[str, Path]:
    """``["positive=pos.st", "detox=detox.st"]`` -> {"positive": Path("pos.st"), ...}."""
    out: dict[str, Path] = {}
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep or not path:
            raise SteerportError(f"--steer {arg!r}: expected NAME=FILE.st")
        if not NAME.match(name):
            raise SteerportError(f"--steer {arg!r}: a steer name is 1-64 letters, digits, '-' or '_'")
        if name in out:
            raise SteerportError(f"--steer: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


def build_state(model: str, steer_args: list[str], *, limits: Limits, dtype: str = "float32", device: str = "cpu",
                api_key: str | None = None, force: bool = False, curve: bool = True, keywords: bool = True,
                served_name: str | None = None, lm=None):
    """Load everything and start the engine (no HTTP yet); returns a ServerState."""
    from steerport.models import load_model
    from steerport.serve.app import ServerState
    from steerport.steer import Steer

    steers = {name: Steer.load(path) for name, path in parse_named_steers(steer_args).items()}
    lm = lm or load_model(model, dtype=dtype, device=device)
    return ServerState.build(lm, steers, model_name=served_name or model, limits=limits, api_key=api_key,
                             curve=curve, keywords=keywords, force=force)


def serve(
    model: str,
    steer: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    force: bool = False,
    curve: bool = True,
    keywords: bool = True,
    served_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Load ``model`` with the named steers and serve until interrupted."""
    import uvicorn

    from steerport.serve.app import create_app

    limits = limits or Limits()
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    state = build_state(model, steer, limits=limits, dtype=dtype, device=device, api_key=api_key, force=force,
                        curve=curve, keywords=keywords, served_name=served_name)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.getLogger("steerport.serve").warning("listening on %s without --api-key: anyone who can reach it can use it", host)
    try:
        uvicorn.run(create_app(state), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        state.engine.shutdown()


def serve_command(
    model: Annotated[str, typer.Argument(help="Model: alias, catalog name, hub id, local dir or .gguf file.")],
    steer: Annotated[list[str] | None, typer.Option(
        "--steer", "-s", help="A steer to offer, NAME=FILE.st; repeat. Clients pick steers by NAME.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (default loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="STEERPORT_API_KEY", help="Require Authorization: Bearer KEY on /v1/*.")] = None,
    served_name: Annotated[str | None, typer.Option(help="Model id clients send (default: MODEL as given).")] = None,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt, in tokens.")] = Limits.max_prompt_tokens,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = Limits.max_tokens,
    max_n: Annotated[int, typer.Option(help="Most choices (n) per request.")] = Limits.max_n,
    max_concurrent: Annotated[int, typer.Option(help="Requests in flight; more get HTTP 429.")] = Limits.max_concurrent,
    request_timeout: Annotated[float, typer.Option(help="Seconds a request may generate for.")] = Limits.request_timeout_s,
    max_value: Annotated[float, typer.Option(help="Largest |steer value| a request may use.")] = Limits.max_value,
    max_batch: Annotated[int, typer.Option(help="Rows decoded together in one forward pass.")] = Limits.max_batch,
    batch_window_ms: Annotated[float, typer.Option(help="How long to wait for more requests to batch.")] = Limits.window_ms,
    curve: Annotated[bool, typer.Option(help="Measure each steer's strength curve (KL at a few values) at start.")] = True,
    keywords: Annotated[bool, typer.Option(help="Compute LM-Steer keywords for /v1/steers and the playground.")] = True,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Serve steers made for a model with another fingerprint.")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads (default: torch's choice; 1 can be faster on a busy machine).")] = None,
):
    """Serve MODEL over an OpenAI-compatible HTTP API, with per-request steers and a playground at /."""
    limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_n=max_n,
                    max_concurrent=max_concurrent, request_timeout_s=request_timeout, max_value=max_value,
                    max_batch=max_batch, window_ms=batch_window_ms)
    for k in ("max_prompt_tokens", "max_tokens", "max_n", "max_concurrent", "max_batch"):
        if getattr(limits, k) < 1:
            raise SteerportError(f"--{k.replace('_', '-')} must be at least 1")
    if threads is not None:
        if threads < 1:
            raise SteerportError("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
    serve(model, steer or [], host=host, port=port, api_key=api_key, limits=limits, dtype=dtype, device=device,
          force=force, curve=curve, keywords=keywords, served_name=served_name, log_level=log_level)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to a typer app."""
    app.command("serve")(serve_command)
