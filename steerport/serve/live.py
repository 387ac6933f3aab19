"""Run the server in a background thread on a free loopback port (tests, benchmarks, notebooks).

Example::

    with live_server(state) as url:          # e.g. "http://127.0.0.1:51234"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from steerport.errors import SteerportError


@contextlib.contextmanager
def live_server(state, *, host: str = "127.0.0.1", shutdown_engine: bool = True) -> Iterator[str]:
    """Serve ``state`` (a started ServerState) with uvicorn in a thread; yields the base URL."""
    import uvicorn

    from steerport.serve.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="steerport-uvicorn", daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise SteerportError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        if shutdown_engine:
            state.engine.shutdown()
