"""Requests and tokens per minute, counted in the shared cache so that every process of
every server sees the same counts.

Requests per minute (per key, and per organization) are django-ratelimit's fixed windows.
Tokens per minute are a counter per key and minute that a call reserves from (its prompt
and the output it may produce) and that settlement corrects to what it really used.

If the cache (Redis) is down, limits fail open: the API keeps serving, each failure is
logged and counted in /metrics, and billing still holds, because holds live in the
database.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django_ratelimit.core import get_usage
from prometheus_client import Counter

from apps.keys.selectors import KeyGrant

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


def _tpm(grant: KeyGrant) -> int:
    return grant.tpm or settings.KEY_DEFAULT_TPM


def _tokens_key(grant: KeyGrant, now: float) -> tuple[str, float]:
    window = int(now // WINDOW_SECONDS)
    return f"tpm:{grant.id}:{window}", (window + 1) * WINDOW_SECONDS - now


def _requests_window(request, grant: KeyGrant) -> Window | None:
    """Count this request against the key's and the organization's limit; the tighter
    one is what the headers show."""
    limits = [("key", str(grant.id), grant.rpm), ("org", str(grant.organization_id), grant.org_rpm)]
    tightest: Window | None = None
    exceeded: Window | None = None
    for group, value, rpm in limits:
        if not rpm:
            continue
        usage = get_usage(
            request,
            group=f"rpm-{group}",
            key=lambda _group, _request, value=value: value,
            rate=f"{rpm}/m",
            increment=True,
        )
        if usage is None:
            continue
        window = Window(
            limit=usage["limit"],
            remaining=usage["limit"] - usage["count"],
            reset_seconds=max(usage["time_left"], 0),
        )
        if usage["should_limit"] and exceeded is None:
            exceeded = window
        if tightest is None or window.remaining < tightest.remaining:
            tightest = window
    if exceeded is not None:
        raise LimitExceeded(
            f"Rate limit reached: {exceeded.limit} requests per minute.",
            Admission(requests=exceeded, tokens=None),
            exceeded.retry_after,
        )
    return tightest


def _tokens_window(grant: KeyGrant, used: int, now: float) -> Window:
    _key, reset = _tokens_key(grant, now)
    limit = _tpm(grant)
    return Window(limit=limit, remaining=limit - used, reset_seconds=reset)


def requests_admit(request, grant: KeyGrant) -> Admission:
    """Count one request (per key and per organization) and read the key's token count.
    Raises LimitExceeded (429) when a requests limit is reached."""
    now = time.time()
    try:
        requests = _requests_window(request, grant)
        used = cache.get(_tokens_key(grant, now)[0], 0)
    except LimitExceeded:
        raise
    except Exception as error:  # the cache is down: serve anyway
        _fail_open("requests", error)
        return Admission(requests=None, tokens=None)
    return Admission(requests=requests, tokens=_tokens_window(grant, used, now))


def tokens_reserve(grant: KeyGrant, admission: Admission, tokens: int) -> Admission:
    """Reserve `tokens` from the key's tokens per minute, or raise LimitExceeded.

    Incremented first and taken back if over, so two calls racing for the last tokens can
    both be refused but never both admitted.
    """
    now = time.time()
    key, _reset = _tokens_key(grant, now)
    limit = _tpm(grant)
    try:
        cache.add(key, 0, WINDOW_SECONDS + 5)
        used = cache.incr(key, tokens)
        if used > limit:
            cache.decr(key, tokens)
            window = _tokens_window(grant, used - tokens, now)
            refused = Admission(requests=admission.requests, tokens=window)
            raise LimitExceeded(
                f"Rate limit reached: {limit} tokens per minute; this call needs up to "
                f"{tokens}. Lower max_tokens or retry later.",
                refused,
                window.retry_after,
            )
    except LimitExceeded:
        raise
    except Exception as error:
        _fail_open("tokens", error)
        return admission
    return Admission(
        requests=admission.requests,
        tokens=_tokens_window(grant, used, now),
        tokens_key=key,
        reserved_tokens=tokens,
    )


def tokens_correct(admission: Admission, used_tokens: int) -> None:
    """After the call: give back what was reserved and not used (or add what was)."""
    if admission.tokens_key is None:
        return
    delta = used_tokens - admission.reserved_tokens
    if not delta:
        return
    try:
        if delta > 0:
            cache.incr(admission.tokens_key, delta)
        else:
            cache.decr(admission.tokens_key, -delta)
    except ValueError:
        pass  # the window has expired meanwhile: nothing left to correct
    except Exception as error:
        _fail_open("tokens correction", error)
