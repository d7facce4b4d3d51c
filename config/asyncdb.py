"""Database work from async code: one step, in a shared worker thread, connection returned.

Django's ORM and transactions are synchronous, so async code runs each database step (one
transaction, or a few reads) in a thread. By default `sync_to_async` uses a thread of the
request's own (Django starts one per request under ASGI): thousands of open streams would
mean thousands of threads. A step here runs instead in the event loop's shared pool of
worker threads, and gives its connection back to the pool when it ends, so neither a
thread nor a connection is kept while an upstream answers.
"""

from __future__ import annotations

from collections.abc import Callable
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
