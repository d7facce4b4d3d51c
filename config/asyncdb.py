"""Database work from async code: one step, in a shared worker thread, connection returned;
and one lookup shared by the concurrent requests that need it (SingleFlight).

Django's ORM and transactions are synchronous, so async code runs each database step (one
transaction, or a few reads) in a thread. By default `sync_to_async` uses a thread of the
request's own (Django starts one per request under ASGI): thousands of open streams would
mean thousands of threads. A step here runs instead in the event loop's shared pool of
worker threads, and gives its connection back to the pool when it ends, so neither a
thread nor a connection is kept while an upstream answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import connection

P = ParamSpec("P")
T = TypeVar("T")


def _released(func: Callable[P, T]) -> Callable[P, T]:
    def step(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        finally:
            # Inside a test's transaction there is nothing to give back.
            if not connection.in_atomic_block:
                connection.close()

    return step


async def db_step(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `func(*args, **kwargs)` in a shared worker thread and return its result."""
    return await sync_to_async(_released(func), thread_sensitive=False)(*args, **kwargs)


class SingleFlight:
    """Concurrent callers asking for the same key share one lookup.

    A per-process memo that expires (a route, a key's grant) would otherwise be looked up
    by every request in flight at the moment it expires: hundreds of identical queries at
    once under load. The lookup runs as its own task, so a caller that is cancelled (its
    client left) does not cancel it for the others.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task] = {}

    async def run(self, key: str, lookup: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = self._tasks[key] = asyncio.ensure_future(lookup())
            task.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(task)

    def _done(self, key: str, task: asyncio.Task) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    def forget(self) -> None:
        self._tasks.clear()
