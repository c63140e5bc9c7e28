"""`localmix serve`: an OpenAI-compatible HTTP server that keeps one model loaded.

    protocol  the wire format: request gate, error shape, answers and stream chunks
    worker    the resident model (Ollama-style keep-alive and swap) and the thread that serves
              the queued requests on it, one at a time
    app       the FastAPI application: endpoints, server-sent events, the error barrier

It runs on uvicorn (as vLLM's and llama-cpp-python's servers do), bound to loopback unless told
otherwise.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def serve(
    model: str | None,
    *,
    host: str,
    port: int,
    keep_alive: float | None,
    max_queue: int,
    api_key: str | None = None,
    load_options: dict[str, Any] | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted. `model` (optional) is loaded before the port opens and is the
    one a request without a model gets; `load_options` go to `localmix.load` for every model;
    `ready(url)` is called once the port listens (port 0: one the system chose)."""
    import uvicorn

    import localmix

    from ..store import resolve
    from .app import create_app
    from .worker import Residency

    options = dict(load_options or {})
    residency = Residency(lambda name: localmix.load(name, **options), keep_alive)
    if model is not None:
        residency.engine_for(*resolve(model))
    app = create_app(residency, max_queue=max_queue, default_model=model, api_key=api_key)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    if ready is not None:
        ready(f"http://{_url_host(bound_host)}:{bound_port}")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port` (port 0: a free one)."""
    from ..errors import LocalmixError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LocalmixError(
            f"cannot listen on {host}:{port} ({e.strerror}): another server may hold the port; "
            "choose another with --port"
        ) from None
    sock.listen(128)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
