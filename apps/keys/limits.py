"""Requests and tokens per minute, counted in Redis so that every process of every
server sees the same counts.

Each limit is a fixed window of one clock minute: a counter per key (or organization) and
minute. Requests per minute count every request; tokens per minute are reserved by a call
(its prompt and the output it may produce) only if they fit, and settlement corrects the
reservation to what the call really used. Every check is one Lua script, so admitting a
call (its request and its tokens) is one round trip on the event loop and atomic however
many processes race.

A counter far from its limit is not asked about every call: each process reserves a share
of it ahead (an *allowance*: by default a twentieth of the limit, while the counter is
below half the limit) and admits calls from that share in memory, with no round trip
(`_Allowances`). A reservation is itself a count in Redis, so the processes together
never pass a limit; what a quiet process keeps unspent of its share, another may be
refused early: at most a twentieth of the limit per process, in a window past half its
limit.

Without Redis (the embedded default: one process) the same counters live in the process.
If Redis is down, limits fail open: the API keeps serving, each failure is logged and
counted in /metrics, and billing still holds, because holds live in the database.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings
from prometheus_client import Counter

from apps.keys.selectors import KeyGrant
from config.asyncdb import GroupCommit

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
LIMITER_FAILURES = Counter(
    "real200_rate_limiter_failures_total",
    "Rate-limit checks that failed open because the shared cache did not answer",
)


@dataclass(frozen=True, slots=True)
class Window:
    """One limit as the x-ratelimit-* headers describe it."""

    limit: int
    remaining: int
    reset_seconds: float

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset_seconds))


@dataclass(frozen=True, slots=True)
class Admission:
    requests: Window | None
    tokens: Window | None
    tokens_key: str | None = None  # the counter the call reserved from
    reserved_tokens: int = 0

    def headers(self) -> dict[str, str]:
        headers = {}
        for name, window in (("requests", self.requests), ("tokens", self.tokens)):
            if window is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(window.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(window.remaining, 0))
                headers[f"x-ratelimit-reset-{name}"] = openai_duration(window.reset_seconds)
        return headers


class LimitExceeded(Exception):
    def __init__(self, message: str, admission: Admission, retry_after: int) -> None:
        super().__init__(message)
        self.admission = admission
        self.retry_after = retry_after


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `6s`, `1m30s`."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def _fail_open(what: str, error: Exception) -> None:
    LIMITER_FAILURES.inc()
    logger.error("rate limiter unavailable (%s), failing open: %s", what, error)


# Adds each amount to its counter and answers the counts, in one atomic step.
# KEYS: the counters. ARGV[1]: the seconds a new counter lives; then, per counter, the
# amount and the limit. With a limit (>= 0), an amount that would pass it is not added;
# -1 counts whatever the limit. An amount of 0 or less only changes a counter that
# exists: a read, or a correction of a window that has not ended.
# Answers, per counter, the count after and 1 if the amount was added (else 0).
_COUNT_SCRIPT = """
local answer = {}
for i, key in ipairs(KEYS) do
    local amount = tonumber(ARGV[2 * i])
    local limit = tonumber(ARGV[2 * i + 1])
    local count = tonumber(redis.call('GET', key) or '0')
    local added = 0
    if amount > 0 and (limit < 0 or count + amount <= limit) then
        count = redis.call('INCRBY', key, amount)
        if count == amount then redis.call('EXPIRE', key, ARGV[1]) end
        added = 1
    elseif amount < 0 and redis.call('EXISTS', key) == 1 then
        count = redis.call('INCRBY', key, amount)
        added = 1
    end
    answer[#answer + 1] = count
    answer[#answer + 1] = added
end
return answer
"""

# A counter lives a little past its minute, so a late correction still finds it.
_COUNTER_SECONDS = WINDOW_SECONDS + 5
ALWAYS = -1  # the limit of a counter that counts past its limit
# How long a run of the script may take before the call goes on without its counts.
_REDIS_SECONDS = 1.0


class _RedisCounters:
    """The counters in Redis: one client (and connection pool) per event loop.

    The changes of concurrent calls go to Redis together, in one run of the script
    (`GroupCommit`): it applies them in the order the calls came, each counter as if the
    calls had been sent one by one."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}
        # A failure of Redis is every call's, not one call's: none is retried alone.
        self._runs = GroupCommit("counters", one=self._run, many=self._run_many, alone=False)

    def _client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for stale in [old for old in self._clients if old.is_closed()]:
                del self._clients[stale]
            # No socket timeout (redis-py's default is 5 s): with one, redis-py sends
            # every command through `asyncio.wait_for`, a task of its own on Python 3.11,
            # so the command left one turn of the event loop late (a millisecond of each
            # call's admission under load). `_run` bounds the whole command instead.
            client = self._clients[loop] = aioredis.Redis.from_url(
                self._url,
                socket_timeout=None,
                socket_connect_timeout=_REDIS_SECONDS,
                max_connections=settings.REDIS_MAX_CONNECTIONS,
            )
            client.count = client.register_script(_COUNT_SCRIPT)
        return client

    async def close(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def add(self, changes: list[tuple[str, int, int]]) -> list[tuple[int, bool]]:
        return await self.enqueue(changes)

    def enqueue(self, changes: list[tuple[str, int, int]]) -> asyncio.Future:
        """`add`, sent with the next run of the script; the counts' future."""
        return self._runs.enqueue(changes)

    async def _run(self, changes: list[tuple[str, int, int]]) -> list[tuple[int, bool]]:
        args: list[int] = [_COUNTER_SECONDS]
        for _key, amount, limit in changes:
            args += [amount, limit]
        async with asyncio.timeout(_REDIS_SECONDS):
            flat = await self._client().count(keys=[key for key, _a, _l in changes], args=args)
        return [(int(flat[i]), bool(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def _run_many(
        self, calls: list[list[tuple[str, int, int]]]
    ) -> list[list[tuple[int, bool]]]:
        answers = await self._run([change for changes in calls for change in changes])
        each, start = [], 0
        for changes in calls:
            each.append(answers[start : start + len(changes)])
            start += len(changes)
        return each


class _LocalCounters:
    """The same counters in this process, for the embedded default (one process, no Redis)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, float]] = {}  # key -> (count, expires)

    async def add(self, changes: list[tuple[str, int, int]]) -> list[tuple[int, bool]]:
        return self._add(changes)

    def enqueue(self, changes: list[tuple[str, int, int]]) -> asyncio.Future:
        """`add`, as a future that is already done: the counts are in this process."""
        counted = asyncio.get_running_loop().create_future()
        counted.set_result(self._add(changes))
        return counted

    def _add(self, changes: list[tuple[str, int, int]]) -> list[tuple[int, bool]]:
        now = time.monotonic()
        if len(self._counts) > 10_000:
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        answer = []
        for key, amount, limit in changes:
            count, expires = self._counts.get(key, (0, 0.0))
            exists = expires > now
            count = count if exists else 0
            added = False
            if amount > 0 and (limit < 0 or count + amount <= limit):
                expires = expires if exists else now + _COUNTER_SECONDS
                count, added = count + amount, True
            elif amount < 0 and exists:
                count, added = count + amount, True
            if added:
                self._counts[key] = (count, expires)
            answer.append((count, added))
        return answer


_counters: _RedisCounters | _LocalCounters | None = None


def counters() -> _RedisCounters | _LocalCounters:
    global _counters
    if _counters is None:
        _counters = _RedisCounters(settings.REDIS_URL) if settings.REDIS_URL else _LocalCounters()
    return _counters


async def counters_close() -> None:
    """Close this event loop's connections to Redis (at the server's shutdown)."""
    if isinstance(_counters, _RedisCounters):
        await _counters.close()


def counters_forget() -> None:
    """Start from fresh counters (tests: settings change, and each test its own counts)."""
    global _counters
    _counters = None
    _allowances.forget()
    _refused.clear()
    _guessing.clear()


def _window(now: float) -> tuple[int, float]:
    """The current minute's number and the seconds left in it."""
    window = int(now // WINDOW_SECONDS)
    return window, (window + 1) * WINDOW_SECONDS - now


def _counter(kind: str, owner: int | str, window: int) -> str:
    return f"{settings.CACHE_KEY_PREFIX}:{kind}:{owner}:{window}"


def _tpm(grant: KeyGrant) -> int:
    return grant.tpm or settings.KEY_DEFAULT_TPM


async def call_admit(grant: KeyGrant, tokens: int) -> Admission:
    """Count one request (per key and per organization) and reserve `tokens` from the
    key's tokens per minute, in one round trip. Raises LimitExceeded (429) when a
    requests limit is reached or the tokens do not fit. The check and the reservation
    are one step, so two calls racing for the last tokens cannot both be admitted."""
    return await call_admit_start(grant, tokens).admission()


def call_admit_start(grant: KeyGrant, tokens: int) -> PendingAdmission:
    """`call_admit` in two parts: this one sends the counts (with the next run of the
    script) and returns at once; `PendingAdmission.admission` waits for them. A caller
    with other work to start meanwhile (the call's hold) starts it with no task around
    either."""
    window, reset = _window(time.time())
    limits = [
        (rpm, _counter(kind, owner, window))
        for kind, owner, rpm in (
            ("rpm-key", grant.id, grant.rpm),
            ("rpm-org", grant.organization_id, grant.org_rpm),
        )
        if rpm
    ]
    tokens_key, tokens_limit = _counter("tpm", grant.id, window), _tpm(grant)
    changes = [(key, 1, ALWAYS) for _rpm, key in limits]
    changes.append((tokens_key, tokens, tokens_limit))
    limited = [(key, 1, rpm) for rpm, key in limits] + [(tokens_key, tokens, tokens_limit)]
    spent = _allowances.spend(limited, window)
    return PendingAdmission(
        grant=grant,
        tokens=tokens,
        window=window,
        reset=reset,
        limits=limits,
        tokens_key=tokens_key,
        tokens_limit=tokens_limit,
        counted=counters().enqueue(changes) if spent is None else spent,
    )


@dataclass(slots=True)
class PendingAdmission:
    """A call's counts, sent; what they decide, once they are in (`admission`)."""

    grant: KeyGrant
    tokens: int
    window: int
    reset: float
    limits: list[tuple[int, str]]  # (requests per minute, counter) for each such limit
    tokens_key: str
    tokens_limit: int
    counted: asyncio.Future  # the counts after the changes, as the script answers them
    given_back: bool = False  # the reserved tokens went back (the call was refused)

    async def admission(self) -> Admission:
        """The call's Admission once its counts are in; LimitExceeded if a limit refuses it
        (the tokens it reserved are given back first)."""
        counted = await self._counts()
        if isinstance(counted, Exception):  # Redis is down: serve anyway
            _fail_open("requests", counted)
        admission, refusal = self._decision(counted)
        if refusal is not None:
            _note_refused(self.grant, self.window)
            self.given_back = True
            await tokens_correct(admission, 0)  # the call does not run: its tokens go back
            raise refusal
        return admission

    async def reserved(self) -> Admission | None:
        """Once the counts are in, what the call holds of its limits, to give back when it
        does not run: None if they failed or went back already."""
        admission, _refusal = self._decision(await self._counts())
        return None if self.given_back else admission

    async def _counts(self) -> list[tuple[int, bool]] | Exception:
        try:
            return await self.counted
        except Exception as error:  # Redis did not answer
            return error

    def _decision(
        self, counted: list[tuple[int, bool]] | Exception
    ) -> tuple[Admission, LimitExceeded | None]:
        if isinstance(counted, Exception):
            return Admission(requests=None, tokens=None), None
        *requests, (tokens_used, reserved) = counted
        tightest: Window | None = None
        exceeded: Window | None = None
        for (rpm, _key), (count, _added) in zip(self.limits, requests, strict=True):
            window_left = Window(limit=rpm, remaining=rpm - count, reset_seconds=self.reset)
            if count > rpm and exceeded is None:
                exceeded = window_left
            if tightest is None or window_left.remaining < tightest.remaining:
                tightest = window_left
        tokens_left = Window(
            limit=self.tokens_limit,
            remaining=self.tokens_limit - tokens_used,
            reset_seconds=self.reset,
        )
        admission = Admission(
            requests=tightest,
            tokens=tokens_left,
            tokens_key=self.tokens_key if reserved else None,
            reserved_tokens=self.tokens if reserved else 0,
        )
        if exceeded is not None:
            return admission, LimitExceeded(
                f"Rate limit reached: {exceeded.limit} requests per minute.",
                Admission(requests=exceeded, tokens=None),
                exceeded.retry_after,
            )
        if not reserved and self.tokens > 0:
            return admission, LimitExceeded(
                f"Rate limit reached: {self.tokens_limit} tokens per minute; this call needs "
                f"up to {self.tokens}. Lower max_tokens or retry later.",
                Admission(requests=tightest, tokens=tokens_left),
                tokens_left.retry_after,
            )
        return admission, None


# --- Allowances -----------------------------------------------------------------------------
# Under load, a call's admission waited for Redis longer than for anything else before
# the upstream was called: the round trip itself is short, but on a busy machine each
# process that takes part in it waits for a core. A counter far from its limit need not
# be asked each time whether one more call fits.

# An allowance is 1/settings.RATE_LIMIT_SHARES of its counter's limit (0: no allowances),
# and only for a counter whose allowance covers at least this many calls like the one
# asking (a key at 60 requests a minute, or a call that may use more than an eightieth of
# its key's tokens per minute, is counted call by call).
ALLOWANCE_CALLS = 4
# After a reservation failed, the next is asked for no sooner than this.
_ALLOWANCE_RETRY_SECONDS = 1.0


@dataclass(slots=True)
class _Allowance:
    """This process's reserved share of one counter in one window."""

    limit: int  # the limit it was sized for
    size: int  # what each reservation asks for
    left: int = 0  # reserved in Redis, not yet spent by a call of this process
    counted: int = 0  # the counter's value in Redis after the last reservation
    refilling: asyncio.Future | None = None
    retry_at: float = 0.0  # after a reservation failed, the next waits until then
    closed: bool = False  # the counter is past half its limit: counted exactly from now


class _Allowances:
    """The allowances of one process: calls spend them in memory, and the next
    reservation goes to Redis in the background when one is half spent.

    A reservation is a count like a call's, made only if the counter stays within half
    its limit: the processes together never count past a limit, and in the second half
    of a window every call is counted in Redis, exactly, as it comes. A process whose
    reservation is refused gives back what it has left, for the others' exact counts."""

    def __init__(self) -> None:
        self._window: int | None = None
        self._by_counter: dict[str, _Allowance] = {}
        self._tasks: set[asyncio.Task] = set()

    def forget(self) -> None:
        self._window = None
        self._by_counter.clear()

    def spend(self, limited: list[tuple[str, int, int]], window: int) -> asyncio.Future | None:
        """Take each (counter, amount, limit) from this process's allowances, all or
        none: the counts to decide on (as the script would answer them), already in, or
        None when the call must be counted in Redis."""
        if not settings.RATE_LIMIT_SHARES or not isinstance(counters(), _RedisCounters):
            return None  # off, or the in-process counters, which answer at once
        if window != self._window:
            self.forget()  # the last window's allowances ended with their counters
            self._window = window
        allowances = [self._ready(key, amount, limit) for key, amount, limit in limited]
        short = False
        for allowance, (key, amount, _limit) in zip(allowances, limited, strict=True):
            if allowance is None or allowance.left < amount:
                short = True
                if allowance is not None and allowance.left < allowance.size // 2:
                    self._refill(key, allowance)  # its last reservation failed, or is late
        if short:
            return None
        counts = []
        for allowance, (key, amount, _limit) in zip(allowances, limited, strict=True):
            allowance.left -= amount
            counts.append((allowance.counted - allowance.left, True))
            if allowance.left < allowance.size // 2:
                self._refill(key, allowance)
        spent = asyncio.get_running_loop().create_future()
        spent.set_result(counts)
        return spent

    def correct(self, key: str, delta: int) -> bool:
        """Apply a settled call's correction (`delta` tokens more than it reserved, or
        fewer) to this process's allowance of `key`, if it has one open: True if done."""
        allowance = self._by_counter.get(key)
        if allowance is None or allowance.closed or not allowance.counted:
            return False  # no allowance reserved (yet), or no more
        if allowance.left < delta:
            return False
        allowance.left -= delta
        return True

    def _ready(self, key: str, amount: int, limit: int) -> _Allowance | None:
        """The counter's allowance; None if it has none (asking for one if it may)."""
        allowance = self._by_counter.get(key)
        if allowance is not None and allowance.limit != limit and not allowance.closed:
            # The key's (or organization's) limit changed: a share sized for the old one
            # must not outlast it. Counted in Redis for the rest of the window.
            self._close(key, allowance)
        if allowance is None:
            size = limit // settings.RATE_LIMIT_SHARES
            if size < ALLOWANCE_CALLS * max(amount, 1):
                return None
            allowance = self._by_counter[key] = _Allowance(limit=limit, size=size)
            self._refill(key, allowance)
        return None if allowance.closed else allowance

    def _refill(self, key: str, allowance: _Allowance) -> None:
        if allowance.refilling is not None and not allowance.refilling.done():
            return
        if time.monotonic() < allowance.retry_at:
            return
        allowance.refilling = self._in_background(self._reserve(key, allowance))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        return task

    async def _reserve(self, key: str, allowance: _Allowance) -> None:
        try:
            [(count, added)] = await counters().add([(key, allowance.size, allowance.limit // 2)])
        except Exception as error:  # calls are counted in Redis meanwhile (and fail open)
            _fail_open("allowance", error)
            allowance.retry_at = time.monotonic() + _ALLOWANCE_RETRY_SECONDS
            return
        if allowance.closed:  # closed while this reservation was out: it goes back too
            if added:
                await self._given_back(counters().enqueue([(key, -allowance.size, ALWAYS)]))
        elif added:
            allowance.left += allowance.size
            allowance.counted = count
        else:
            self._close(key, allowance)

    def _close(self, key: str, allowance: _Allowance) -> None:
        """No more shares of this counter in this window; what is unspent goes back,
        ahead of the counts of any call that comes after (the script applies them in
        the order they were sent)."""
        allowance.closed = True
        unspent, allowance.left = allowance.left, 0
        if unspent:
            self._in_background(self._given_back(counters().enqueue([(key, -unspent, ALWAYS)])))

    async def _given_back(self, counted: asyncio.Future) -> None:
        try:
            await counted
        except Exception as error:
            _fail_open("allowance given back", error)


_allowances = _Allowances()


# The window in which each key was last refused, in this process (see `refused_lately`).
_refused: dict[int, int] = {}


def _note_refused(grant: KeyGrant, window: int) -> None:
    if len(_refused) > 10_000:  # bound the memo: keys refused long ago are forgotten
        _refused.clear()
    _refused[grant.id] = window


def refused_lately(grant: KeyGrant) -> bool:
    """Whether this process refused the key for its limits in the current window: a
    client that is being refused tends to keep sending, so the caller checks the limits
    first for such a key instead of at once with its other work."""
    window = _refused.get(grant.id)
    if window is None:
        return False
    if window == _window(time.time())[0]:
        return True
    del _refused[grant.id]
    return False


async def tokens_correct(admission: Admission, used_tokens: int) -> None:
    """After the call: give back what was reserved and not used (or add what was), in
    the window the call reserved from, if it has not ended."""
    if admission.tokens_key is None:
        return
    delta = used_tokens - admission.reserved_tokens
    if not delta or _allowances.correct(admission.tokens_key, delta):
        return
    try:
        await counters().add([(admission.tokens_key, delta, ALWAYS)])
    except Exception as error:
        _fail_open("tokens correction", error)


# --- Unknown keys ---------------------------------------------------------------------------
# A key that is in no cache costs a database lookup, and keys are random: an address that
# sends one made-up key after another would cost a query each. Unknown keys are counted
# per address across processes (the shared counters); past the limit in a minute, each
# process that sees the address again refuses its lookups until the minute ends. Keys
# already in a cache still pass: a shared office address is not locked out of its keys.

# The end of the minute until which each address may not look keys up, in this process.
_guessing: dict[str, float] = {}


def unknown_keys_wait(client_ip: str) -> int | None:
    """Seconds until this address may have keys looked up again, or None if it may now."""
    until = _guessing.get(client_ip)
    if until is None:
        return None
    left = until - time.time()
    if left > 0:
        return max(math.ceil(left), 1)
    del _guessing[client_ip]
    return None


async def unknown_key_note(client_ip: str) -> None:
    """Count an unknown key sent from this address."""
    window, _reset = _window(time.time())
    try:
        [(count, _added)] = await counters().add(
            [(_counter("unknown-keys", client_ip, window), 1, ALWAYS)]
        )
    except Exception as error:
        _fail_open("unknown keys", error)
        return
    if count >= settings.GATEWAY_UNKNOWN_KEYS_PER_MINUTE:
        if len(_guessing) > 10_000:  # bound the memo: a botnet's addresses are forgotten
            _guessing.clear()
        _guessing[client_ip] = (window + 1) * WINDOW_SECONDS
