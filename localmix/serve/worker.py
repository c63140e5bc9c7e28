"""The one engine behind the server: which model is resident, and the thread that serves the
requests on it one at a time, in the order they came, from a bounded queue.

Residency is Ollama's: a model loads on first use (or at start), stays loaded while requests
come and for `keep_alive` seconds after the last one, and a request for another model swaps it.
The engine is used only from the worker thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Generator
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import Engine
from ..errors import LocalmixError, OptionError
from ..events import Event
from .protocol import APIError, Request, context_too_long, internal_error, overloaded

log = logging.getLogger("localmix.serve")

DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
END = object()  # the last item a job's stream carries


def parse_keep_alive(text: str) -> float | None:
    """How long an idle model stays loaded, in seconds, from Ollama's notation: `5m`, `30s`,
    `1h`, a number of seconds, `0` (unload after each request) or `-1` (never unload: None)."""
    text = text.strip()
    if text in ("-1", "forever"):
        return None
    match = DURATION.match(text)
    if match is None:
        raise OptionError(
            f"--keep-alive must be a duration such as 5m, 30s, 1h, 0 or -1 (forever), not '{text}'"
        )
    return float(match.group(1)) * UNITS[match.group(2)]


@dataclass
class Job:
    """A request on its way through the queue: the worker thread pushes its events (and errors)
    onto `stream` in the server's event loop; `cancel()` stops it at the next token."""

    request: Request
    model: str  # the resolved model name
    path: Path  # the model's directory: what identifies it
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, item: object) -> None:
        with suppress(RuntimeError):  # the event loop has closed: the server is stopping
            self.loop.call_soon_threadsafe(self.stream.put_nowait, item)


class Residency:
    """The resident model: `engine_for(name, path)` loads it if needed, unloading the one held."""

    def __init__(self, load: Callable[[str], Engine], keep_alive: float | None) -> None:
        self.load, self.keep_alive = load, keep_alive
        self.engine: Engine | None = None
        self.path: Path | None = None
        self.last_used = time.monotonic()

    def engine_for(self, name: str, path: Path) -> Engine:
        if self.engine is None or self.path != path:
            self.unload()
            log.info("loading %s", name)
            self.engine = self.load(name)
            self.path = path
        return self.engine

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def idle_left(self) -> float | None:
        """Seconds before the resident model is unloaded; None when it never is (or none is)."""
        if self.engine is None or self.keep_alive is None:
            return None
        return max(0.0, self.last_used + self.keep_alive - time.monotonic())

    def unload(self) -> None:
        if self.engine is None:
            return
        log.info("unloading %s", self.engine.name)
        device = self.engine.device
        self.engine, self.path = None, None
        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


class Worker:
    """Serves jobs one at a time on the resident engine. At most `max_queue` wait; past that a
    request is answered "overloaded" at once. An error inside one request is that request's
    answer: the thread goes on with the next."""

    def __init__(self, residency: Residency, max_queue: int) -> None:
        self.residency = residency
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.busy = False
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "overloaded": 0}
        self.thread = threading.Thread(target=self._run, name="localmix-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Cancel what waits and stop after the current token."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.put(END)
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.counts["overloaded"] += 1
            raise overloaded(self.max_queue) from None

    def status(self) -> dict[str, Any]:
        return {
            "waiting": self.jobs.qsize(),
            "max_queue": self.max_queue,
            "busy": self.busy,
            **self.counts,
        }

    def _run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=self.residency.idle_left())
            except queue.Empty:  # idle for keep_alive
                self.residency.unload()
                continue
            if job is None:
                return
            self.busy = True
            try:
                self._serve(job)
            finally:
                self.busy = False
                self.residency.touch()
                job.put(END)
            if self.residency.idle_left() == 0.0 and self.jobs.empty():
                self.residency.unload()

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            return
        try:
            engine = self.residency.engine_for(job.model, job.path)
            with closing(self._events(engine, job.request)) as events:
                for event in events:
                    if job.cancelled.is_set():
                        self.counts["cancelled"] += 1
                        return
                    job.put(event)
            self.counts["served"] += 1
        except APIError as e:
            job.put(e)
        except LocalmixError as e:  # a model that cannot load, a corrupt checkpoint
            self.counts["failed"] += 1
            job.put(internal_error(str(e)))
        except Exception as e:  # a bug: this request's answer, not the server's end
            self.counts["failed"] += 1
            log.exception("request failed")
            job.put(internal_error(f"localmix failed on this request: {type(e).__name__}: {e}"))

    def _events(self, engine: Engine, request: Request) -> Generator[Event, None, None]:
        """The engine's events for `request`, after its prompt is checked against the window.
        The generator is closed (at the token it stopped on) when the caller stops."""
        if request.kind == "chat":
            ids = engine.chat_ids(request.messages)
        else:
            ids = engine.prompt_ids(request.prompt)
        if len(ids) > engine.context:
            param = "messages" if request.kind == "chat" else "prompt"
            raise context_too_long(engine.name, len(ids), engine.context, param)
        if request.kind == "chat":
            events = engine.chat(request.messages, **request.sampling)
        else:
            events = engine.generate(ids, **request.sampling)
        with closing(events):
            yield from events
