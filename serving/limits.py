"""What bounds the work one server takes on, enforced by the service itself rather than
by BentoML's `max_concurrency` (which releases its slot when a request times out while
the generation goes on computing, and counts task status and result lookups as load).

- `GenerationSlots`: `max_concurrency` slots, each held by a generation from before its
  sampler starts until after it has stopped. A request answered 504 (BentoML's timeout)
  or whose client went away is cancelled at its next denoising step (`CancelCheck`, the
  sampler's per-step callback) and holds its slot until then, so at most
  `max_concurrency` generations ever compute at once. A request that finds no free slot
  is answered 429; a task waits for one. A worker told to exit stops its generations the
  same way, so it does not wait out their timeouts.
- `Admission` (ASGI middleware): a body larger than `max_request_bytes` is refused with
  413 from its Content-Length before it is read, or cut once that much has streamed in;
  a task submit is refused with 429 while `max_queued` submitted tasks are waiting or
  running; task status and result lookups are never refused; a generating request that
  arrives while every slot is taken is answered 429 before its upload is read."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import error_response
from serving.metrics import GENERATIONS_CANCELLED, GENERATIONS_PEAK, GENERATIONS_RUNNING, TASKS_QUEUED

ARRIVED = "vdm.arrived"  # the ASGI scope key of a request's arrival (time.monotonic())
TOO_MANY = "Too many requests"


class Cancelled(Exception):
    """A generation stopped between two denoising steps: `reason` is `timeout`,
    `disconnect` or `shutdown`."""

    def __init__(self, reason: str):
        super().__init__(f"generation cancelled: {reason}")
        self.reason = reason


class GenerationSlots:
    """`size` slots for generations computing at once, with the Prometheus gauges of how
    many compute now and the most that ever did."""

    def __init__(self, size: int):
        self.size = size
        self._free = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0

    @property
    def full(self) -> bool:
        return self.running >= self.size

    def take(self, wait: bool) -> bool:
        """A slot, at once (wait=False: False when none is free) or once one is free."""
        if not self._free.acquire(blocking=wait):
            return False
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            GENERATIONS_RUNNING.set(self.running)
            GENERATIONS_PEAK.set(self.peak)
        return True

    def give_back(self) -> None:
        with self._lock:
            self.running -= 1
            GENERATIONS_RUNNING.set(self.running)
        self._free.release()


# Set when the worker is told to exit (SIGTERM): generations in flight stop at their next
# step rather than keeping the worker, and whoever stops it, waiting up to their timeout.
SHUTTING_DOWN = threading.Event()


def stop_generations_on_exit_signals() -> None:
    """Chain a handler that sets SHUTTING_DOWN before the current SIGTERM and SIGINT
    handlers (uvicorn's, which wait for requests in flight). Main thread only."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(number: int, frame, previous=previous) -> None:
            SHUTTING_DOWN.set()
            if callable(previous):
                previous(number, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
                signal.raise_signal(number)

        signal.signal(signum, handler)


@dataclass
class CancelCheck:
    """The sampler's per-step callback's check: raises `Cancelled` once `deadline`
    (time.monotonic()) has passed, `disconnected()` says the client went away, or the
    worker is shutting down."""

    deadline: float
    disconnected: Callable[[], bool] | None = None

    def __call__(self) -> None:
        if SHUTTING_DOWN.is_set():
            GENERATIONS_CANCELLED.labels("shutdown").inc()
            raise Cancelled("shutdown")
        if time.monotonic() > self.deadline:
            GENERATIONS_CANCELLED.labels("timeout").inc()
            raise Cancelled("timeout")
        if self.disconnected is not None and self.disconnected():
            GENERATIONS_CANCELLED.labels("disconnect").inc()
            raise Cancelled("disconnect")


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Routes:
    """The service's paths by the limits that apply to them."""

    generating: frozenset[str]  # sync generation APIs: 429 at once when every slot is taken
    submits: frozenset[str]  # task submits: the bounded queue


class Admission:
    """ASGI middleware: the request body limit (413), the task queue (429 on submit) and a
    fast 429 for generations when every slot is taken; stamps each request's arrival."""

    def __init__(self, app: ASGIApp, routes: Routes, slots: GenerationSlots, max_bytes: int, max_queued: int):
        self.app, self.routes, self.slots = app, routes, slots
        self.max_bytes, self.max_queued = max_bytes, max_queued
        self.queued = 0  # submitted tasks waiting or running; changed on the event loop only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVED] = time.monotonic()
        path = scope["path"]
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        if path in self.routes.generating and self.slots.full:
            await error_response(429, TOO_MANY)(scope, receive, send)
            return
        if path in self.routes.submits:
            if self.queued >= self.max_queued:
                message = f"the task queue is full ({self.max_queued} tasks waiting or running); retry later"
                await error_response(429, message)(scope, receive, send)
                return
            # BentoML runs the task after answering the submit, within this same call: the
            # task counts as queued until its generation has ended.
            self.queued += 1
            TASKS_QUEUED.set(self.queued)
            try:
                await self._limited(scope, receive, send)
            finally:
                self.queued -= 1
                TASKS_QUEUED.set(self.queued)
            return
        await self._limited(scope, receive, send)

    def _too_large(self):
        return error_response(413, f"the request body is larger than {self.max_bytes} bytes (max_request_bytes)")

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, its body counted as it streams in and cut with a 413 at the limit."""
        received = 0
        cut = False
        started = False

        async def counted() -> Message:
            nonlocal received, cut
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    cut = True
                    raise BodyTooLarge()
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if cut:  # whatever the app answers to the failed read, the caller gets the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted, guarded)
        if cut and not started:
            await self._too_large()(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
