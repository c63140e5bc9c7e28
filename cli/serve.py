"""`localmix serve`: parse the options, load the model, run the server (localmix.serve)."""

from typing import Annotated

import typer
from localmix.cli.options import Where, with_groups

from localmix.defaults import (
    API_KEY_ENV,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_QUEUE,
    SERVER_HOST,
    SERVER_PORT,
)


@with_groups
def serve(
    model: Annotated[
        str | None, typer.Argument(help="model to load at start (default: on first request)")
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on (loopback by default)")] = (
        SERVER_HOST
    ),
    port: Annotated[int, typer.Option(help="port (0: any free one)")] = SERVER_PORT,
    keep_alive: Annotated[
        str,
        typer.Option(help="how long an idle model stays loaded: 5m, 30s, 0, -1 (forever)"),
    ] = DEFAULT_KEEP_ALIVE,
    api_key: Annotated[
        str | None,
        typer.Option(help="answer only requests with this bearer key", envvar=API_KEY_ENV),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="requests that may wait before the server answers 'overloaded'")
    ] = DEFAULT_MAX_QUEUE,
    *,
    where: Where,
) -> None:
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health)
    that keeps the model loaded; `run` and `chat` use it when it runs on the default address."""
    from localmix.cli.render import err

    from localmix.errors import OptionError
    from localmix.serve import serve as run_server
    from localmix.serve.worker import parse_keep_alive
    from localmix.store import resolve
    from localmix.threads import set_threads

    if not 0 <= port <= 65535:
        raise OptionError("--port must be between 0 and 65535")
    if max_queue < 1:
        raise OptionError("--max-queue must be at least 1")
    alive = parse_keep_alive(keep_alive)
    set_threads(where.threads)
    if model is not None:
        resolve(model)  # a name that names no model is refused before anything loads
        err.print(f"loading {model}…")

    def ready(url: str) -> None:
        err.print(f"localmix is serving on {url}/v1 (OpenAI API) and {url}/health; Ctrl+C stops")

    run_server(
        model,
        host=host,
        port=port,
        keep_alive=alive,
        max_queue=max_queue,
        api_key=api_key,
        load_options=where.load_options,
        ready=ready,
    )
