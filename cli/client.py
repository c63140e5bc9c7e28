"""The client side of `run` and `chat`: a running `localmix serve` stands in for the engine.

`find_server` looks for one at $LOCALMIX_HOST (default 127.0.0.1:11435); `RemoteEngine` offers
what `run` and `ChatSession` use of an `Engine`, its replies streamed from the server's OpenAI
endpoints. Only the standard library and localmix's modules that do not import PyTorch are
imported here, so that a reply through the server starts at once.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from localmix.defaults import API_KEY_ENV, DEFAULT_CONTEXT, SERVER_ENV, SERVER_HOST, SERVER_PORT
from localmix.errors import LocalmixError
from localmix.events import Event, Summary, TokenEvent

PROBE_TIMEOUT_S = 0.5  # a server on this machine answers /health in milliseconds
# What `run` and `chat` take that a request to the server carries (or the client does itself).
PER_REQUEST = {
    *("model", "prompt", "system", "raw", "as_json", "verbose", "no_server"),
    *("temperature", "top_p", "top_k", "seed", "max_tokens", "stop"),
    *("cont", "conversation", "load"),
}


@dataclass(frozen=True)
class Server:
    """A localmix server that answered, and its /health at that moment."""

    host: str
    port: int
    health: dict[str, Any]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def has_model(self, name: str) -> bool:
        """Whether the server knows a model of this name."""
        status, _ = _request(self, "GET", f"/v1/models/{urllib.parse.quote(name)}")
        return status == 200


def server_address() -> tuple[str, int]:
    """Where `run` and `chat` look for a server: $LOCALMIX_HOST ("host:port", "host" or
    "http://host:port"), else the address `localmix serve` listens on by default."""
    text = os.environ.get(SERVER_ENV, "").strip()
    if not text:
        return SERVER_HOST, SERVER_PORT
    parsed = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    try:
        return parsed.hostname or SERVER_HOST, parsed.port or SERVER_PORT
    except ValueError:
        raise LocalmixError(f"${SERVER_ENV} must be host:port, not '{text}'") from None


def find_server() -> Server | None:
    """The localmix server at `server_address()`, or None when none answers there."""
    host, port = server_address()
    try:
        status, health = _request(Server(host, port, {}), "GET", "/health", PROBE_TIMEOUT_S)
    except (OSError, ValueError):  # nothing listens, or something that is not localmix
        return None
    if status != 200 or not isinstance(health, dict) or health.get("server") != "localmix":
        return None
    return Server(host, port, health)


class RemoteEngine:
    """An engine served by `localmix serve`: the server holds the model and its KV cache, so
    the next turn of a conversation prefills only its new tokens there too."""

    def __init__(self, server: Server, model: str | None, sampling: dict[str, Any]) -> None:
        self.server, self.sampling = server, sampling  # the command line's sampling options
        loaded = server.health.get("model")
        loaded = loaded if isinstance(loaded, dict) else {}
        here = bool(loaded) and model in (None, loaded.get("name"))
        context, kernels = loaded.get("context"), loaded.get("kernels")
        self.model = model  # None: the model the server holds or was started with
        self.name = model or str(loaded.get("name") or "the server's model")
        self.context = context if here and isinstance(context, int) else DEFAULT_CONTEXT
        self.plan = None  # the server's placement: its /health says it
        self._kernels = kernels if here and isinstance(kernels, str) else ""

    @property
    def defaults(self):
        """The sampling options every reply starts from (a `SamplingOptions`)."""
        from localmix.sampling import SamplingOptions

        return SamplingOptions().updated(**self.sampling)

    def kernels(self) -> str:
        return self._kernels

    def reset(self) -> None:
        """Nothing to forget here: the server reuses what its cache shares with each prompt."""

    def generate(
        self, prompt: str, *, progress: object = None, **sampling: Any
    ) -> Generator[Event, None, None]:
        """Continue `prompt` (the server's /v1/completions)."""
        return self._stream("/v1/completions", {"prompt": prompt}, sampling)

    def chat(
        self, messages: Sequence[dict[str, str]], *, progress: object = None, **sampling: Any
    ) -> Generator[Event, None, None]:
        """Reply to a conversation (the server's /v1/chat/completions)."""
        return self._stream("/v1/chat/completions", {"messages": list(messages)}, sampling)

    def _stream(
        self, path: str, body: dict[str, Any], sampling: dict[str, Any]
    ) -> Generator[Event, None, None]:
        payload = {"model": self.model, **body, **self.sampling, **sampling, "stream": True}
        payload["return_token_ids"] = True
        conn = _connection(self.server, None)
        try:
            conn.request("POST", path, json.dumps(payload), _headers())
            response = conn.getresponse()
            if response.status != 200:
                raise LocalmixError(self._refusal(response))
            yield from _events(response)
        except (OSError, http.client.HTTPException) as e:
            raise LocalmixError(f"the server at {self.server.url} stopped answering ({e})") from e
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise LocalmixError(
                f"the server at {self.server.url} answered what localmix cannot read ({e!r}); "
                "is it a localmix server of this version?"
            ) from e
        finally:
            conn.close()  # before the end (Ctrl+C): the server stops at the next token

    def _refusal(self, response: http.client.HTTPResponse) -> str:
        try:
            return str(json.load(response)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return f"the server at {self.server.url} answered HTTP {response.status}"


def _events(response: http.client.HTTPResponse) -> Generator[Event, None, None]:
    """Events from the server's stream: a TokenEvent per token, then the Summary. A malformed
    chunk raises ValueError, KeyError or TypeError (the caller's gate turns them into one)."""
    pieces: list[str] = []
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise LocalmixError(str(chunk["error"].get("message")))
        if not chunk.get("choices"):
            continue
        choice = chunk["choices"][0]
        text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if "localmix" in chunk:  # the closing chunk
            fields = {
                **chunk["localmix"],
                "text": "".join(pieces),
                "token_ids": choice["token_ids"],
            }
            yield Summary.from_dict(fields)
        elif choice.get("token_ids"):
            pieces.append(str(text))
            yield TokenEvent(int(choice["token_ids"][0]), str(text))


def _request(
    server: Server, method: str, path: str, timeout: float | None = PROBE_TIMEOUT_S
) -> tuple[int, Any]:
    conn = _connection(server, timeout)
    try:
        conn.request(method, path, headers=_headers())
        response = conn.getresponse()
        return response.status, json.load(response)
    finally:
        conn.close()


def _connection(server: Server, timeout: float | None) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(server.host, server.port, timeout=timeout)


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(API_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def connect(given: set[str], no_server: bool) -> Server | None:
    """The server `run` or `chat` answers through: the one at `server_address()`, unless
    `--no-server` says not to, or an option `given` on the command line is not one a request
    carries (`--context`, `--device`, ...: they say how to load the model, and the server's is
    loaded already, its own way)."""
    if no_server or given - PER_REQUEST:
        return None
    return find_server()


def given_options(ctx: Any) -> set[str]:
    """The parameters of a command (its click context) given on the command line."""
    return {
        name
        for name in ctx.params
        if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")
    }
