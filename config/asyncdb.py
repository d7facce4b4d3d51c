"""Database work from async code: one step, in a shared worker thread, connection returned;
one statement on the event loop's own connection (PostgreSQL); the same statement of
concurrent calls, sent together (GroupCommit); and one lookup shared by the concurrent
requests that need it (SingleFlight).

Django's ORM and transactions are synchronous, so async code runs each database step (one
transaction, or a few reads) in a thread. By default `sync_to_async` uses a thread of the
request's own (Django starts one per request under ASGI): thousands of open streams would
mean thousands of threads. A step here runs instead in the event loop's shared pool of
worker threads, and gives its connection back to the pool when it ends, so neither a
thread nor a connection is kept while an upstream answers.

The two statements every call runs (its hold, its settlement) are single statements on
PostgreSQL, with no transaction around them. Those run on the event loop itself, on a
psycopg async connection (`fetch_one`): no thread hop, no wait for a free worker thread,
no contention for the GIL with the loop, no health-check query per step. Under a few
hundred concurrent streams those waits, not PostgreSQL, were most of the time to the
first token (bench/README.md). Under more, the statements themselves were: each call's
two, each a transaction, queueing on the customer's account row. So concurrent calls'
holds go in one statement, and their settlements in another (`GroupCommit`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar

import psycopg
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, connections
from django.db import utils as django_db_errors
from prometheus_client import Histogram
from psycopg_pool import AsyncConnectionPool

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
RowT = TypeVar("RowT")
ResultT = TypeVar("ResultT")


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


@functools.cache
def fetch_one_available() -> bool:
    """Whether `fetch_one` may be used: only PostgreSQL has an async driver here.

    Read from the settings, once: in async code `connection` is a new DatabaseWrapper for
    every task (Django keeps connections per task there), a tenth of a call's CPU."""
    return settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


async def fetch_one(sql: str, params: Mapping[str, Any]) -> tuple | None:
    """`fetch_all`, returning the first row (or None)."""
    rows = await fetch_all(sql, params)
    return rows[0] if rows else None


async def fetch_all(sql: str, params: Mapping[str, Any]) -> list[tuple]:
    """Run one statement on this event loop's async connection pool, as its own
    transaction (autocommit, as Django runs a statement outside `atomic`), and return its
    rows. Errors are raised as Django's database errors, so callers handle them as they
    would the ORM's.

    A connection stays in use until the loop gets round to its answer, which takes a busy
    loop several passes: under a burst of new calls (1,000 streams opened within a second)
    every connection can be in use. The statement then runs in a worker thread on Django's
    pool instead of queueing for one (where it would wait for the loop's passes again).
    """
    try:
        pool = await _loop_pool()
        if _in_use(pool):
            return await db_step(_fetch_in_thread, sql, params)
        async with pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            rows = await cursor.fetchall()
            _answered_at[conn] = time.monotonic()
            return rows
    except psycopg.Error as error:  # PoolTimeout included
        raise _as_django_error(error) from error


def _in_use(pool: AsyncConnectionPool) -> bool:
    """Whether no connection is free and none can be had without queueing: the pool is
    at its size limit, or others already wait for the connections it is opening."""
    stats = pool.get_stats()
    if stats["pool_available"]:
        return False
    return stats["pool_size"] >= stats["pool_max"] or stats.get("requests_waiting", 0) > 0


def _fetch_in_thread(sql: str, params: Mapping[str, Any]) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


async def fetch_pools_close() -> None:
    """Close this event loop's pool (at the server's shutdown)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()


_pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool] = {}
# A connection idle longer than this is checked before use: it may have died with the
# server meanwhile. A busy pool's connections are never idle that long, so under load no
# call pays the extra round trip that Django's CONN_HEALTH_CHECKS costs each step.
_CHECK_AFTER_IDLE_SECONDS = 5.0


async def _loop_pool() -> AsyncConnectionPool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        for stale in [old for old in _pools if old.is_closed()]:
            del _pools[stale]
        database = connections["default"]
        params = database.get_connection_params()
        params.pop("cursor_factory", None)  # Django's is a sync cursor
        # Django turns prepared statements off unless OPTIONS sets `prepare_threshold`
        # (poolers such as PgBouncer < 1.21 cannot keep them). The two statements run on
        # every call are the ones worth preparing: a quarter less of PostgreSQL's CPU per
        # call. Unless told otherwise, psycopg prepares a statement on its fifth run.
        if "prepare_threshold" not in database.settings_dict["OPTIONS"]:
            params.pop("prepare_threshold", None)
        params.setdefault("application_name", "real200 async")
        pool = _pools[loop] = AsyncConnectionPool(
            kwargs={**params, "autocommit": True},
            min_size=settings.DB_ASYNC_POOL_MIN,
            max_size=settings.DB_ASYNC_POOL_MAX,
            timeout=settings.DB_ASYNC_POOL_TIMEOUT,
            check=_check_if_idle,
            open=False,
            name="real200-async",
        )
    if pool.closed:  # new, or being opened by the first caller: opening twice is harmless
        await pool.open()
    return pool


# When each connection last answered a statement. Noted by `fetch_all` itself, not by a
# `reset` callback of the pool: with one, the pool hands every returned connection to its
# worker task (a queue and a turn of the loop per statement) before it can be used again.
_answered_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = (
    weakref.WeakKeyDictionary()
)


async def _check_if_idle(conn: psycopg.AsyncConnection) -> None:
    answered_at = _answered_at.get(conn)
    if answered_at is None or time.monotonic() - answered_at > _CHECK_AFTER_IDLE_SECONDS:
        await AsyncConnectionPool.check_connection(conn)


def _as_django_error(error: psycopg.Error) -> django_db_errors.DatabaseError:
    # Django's classes bear the DB-API names that psycopg's do: take the nearest one.
    for cls in type(error).__mro__:
        django_class = getattr(django_db_errors, cls.__name__, None)
        if isinstance(django_class, type) and issubclass(
            django_class, django_db_errors.DatabaseError
        ):
            return django_class(*error.args)
    return django_db_errors.DatabaseError(*error.args)


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


class GroupCommit(Generic[RowT, ResultT]):
    """Concurrent calls' rows for one statement, sent together.

    Every call runs the same few statements: its hold and its settlement (PostgreSQL),
    its rate-limit counts and their correction (Redis). Under load most of their cost was
    what each statement costs whatever its size: the round trip, the driver's work, and
    on PostgreSQL the snapshot and the commit, with calls queueing on one account's row.
    So while `flights` statements are in flight, the rows of the calls that arrive
    meanwhile wait, and go together when one lands. An idle process sends each row at
    once, alone (`one`); a busy one sends fewer, larger statements (`many`, which returns
    one result per row, in order).

    If `many` fails, each of its rows is tried alone (at once), so that a row that breaks
    the statement (a constraint, a deadlock) fails its own call only; with `alone=False`
    (a failure that cannot be one row's, e.g. the server is down) every row fails with
    it. A row that was sent is applied whether or not its caller still waits: its
    result is a `Landing`, which a caller's cancellation does not cancel.
    """

    def __init__(
        self,
        name: str,
        *,
        one: Callable[[RowT], Awaitable[ResultT]],
        many: Callable[[list[RowT]], Awaitable[list[ResultT]]],
        alone: bool = True,
        flights: int = 2,
        most_rows: int = 100,
    ) -> None:
        self.name = name
        self._one = one
        self._many = many
        self._alone = alone
        self._flights = flights
        self._most_rows = most_rows
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waiting] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, row: RowT) -> ResultT:
        return await self.enqueue(row)

    def enqueue(self, row: RowT) -> Landing[ResultT]:
        """Put `row` in the next statement, and return its result's future without
        waiting for it: a call with other work to start (its hold beside its rate limits)
        waits for both at once, with no task of its own around either."""
        loop = asyncio.get_running_loop()
        waiting = self._loops.get(loop)
        if waiting is None:
            waiting = self._loops[loop] = _Waiting()
        result = Landing(loop=loop)
        waiting.rows.append((row, result))
        if waiting.flying < self._flights:
            waiting.flying += 1
            flight = loop.create_task(self._fly(waiting))
            waiting.flights.add(flight)  # the loop keeps only weak references to tasks
            flight.add_done_callback(waiting.flights.discard)
        return result

    async def _fly(self, waiting: _Waiting) -> None:
        # A task starts at the loop's next pass: the rows of every call that reached this
        # statement in the current pass go in its first statement.
        batch: list = []
        try:
            while waiting.rows:
                batch = waiting.rows[: self._most_rows]
                del waiting.rows[: self._most_rows]
                STATEMENT_ROWS.labels(statement=self.name).observe(len(batch))
                results = await self._results([row for row, _ in batch])
                for (_row, future), result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        finally:
            waiting.flying -= 1
            for _row, future in batch:  # cancelled mid-statement (the loop is closing)
                asyncio.Future.cancel(future)

    async def _results(self, rows: list[RowT]) -> list[ResultT | BaseException]:
        if len(rows) == 1:
            try:
                return [await self._one(rows[0])]
            except Exception as error:
                return [error]
        try:
            return list(await self._many(rows))
        except Exception as error:
            if not self._alone:
                return [error] * len(rows)
            logger.warning(
                "%s: a statement for %d calls failed; trying each alone",
                self.name,
                len(rows),
                exc_info=True,
            )
        return list(await asyncio.gather(*map(self._one, rows), return_exceptions=True))


class Landing(asyncio.Future, Generic[T]):
    """The future of a row's result, which whoever awaits it cannot cancel.

    A task cancelled while it awaits a Landing (its client left) goes on waiting, and
    the CancelledError reaches it when the result lands: the row was sent and is applied
    anyway, and its result (a hold to give back) can then still be read. An ordinary
    future would be cancelled with its waiter and its result lost; `asyncio.shield` keeps
    it, at the cost of a turn of the event loop on every call."""

    def cancel(self, msg: object = None) -> bool:
        return False


@dataclass
class _Waiting:
    rows: list = field(default_factory=list)
    flying: int = 0
    flights: set[asyncio.Task] = field(default_factory=set)


def as_columns(rows: list[Mapping[str, Any]], *, scalars: tuple[str, ...] = ()) -> dict:
    """The parameters of a statement over many rows (`unnest(%(name)s::type[], ...)`):
    each parameter becomes the list of its values, row by row, but for the `scalars`,
    which are the same for every row."""
    first = rows[0]
    return {name: first[name] if name in scalars else [row[name] for row in rows] for name in first}


STATEMENT_ROWS = Histogram(
    "real200_db_statement_rows",
    "Calls served by one statement of group commit (hold, settle, counters)",
    ["statement"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 100),
)
