"""Throttles on the doors that can be brute-forced: log-in, sign-up and password reset.

Each attempt counts against the client's address and, where the form names one, the
account's email address, in the shared cache (Redis in production), so the limits hold
across every web process. A spent limit answers 429 with a page and `Retry-After`.

With the cache down the doors stay open (logged), as the API's limits do: refusing every
log-in while Redis restarts would lock out everyone to slow down a few.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django_ratelimit.core import get_usage

from apps.gateway.views import client_ip

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """How many attempts a door allows: per address, and per email address (or None)."""

    group: str
    per_ip: str
    per_email: str | None = None


LOGIN = Limits(group="auth.login", per_ip="10/m", per_email="5/m")
SIGNUP = Limits(group="auth.signup", per_ip="5/h")
PASSWORD_RESET = Limits(group="auth.reset", per_ip="5/h", per_email="3/h")


def attempt_wait(request: HttpRequest, *, limits: Limits, email: str = "") -> int | None:
    """Count this attempt; the seconds to wait if a limit is spent, else None.

    The email is lowered and stripped, so `Alice@x` and `alice@x ` share one count.
    """
    checks = [(f"{limits.group}.ip", client_ip(request), limits.per_ip)]
    email = email.strip().lower()
    if limits.per_email and email:
        checks.append((f"{limits.group}.email", email, limits.per_email))
    waits = []
    for group, value, rate in checks:
        try:
            usage = get_usage(
                request,
                group=group,
                key=lambda _group, _request, value=value: value,
                rate=rate,
                increment=True,
            )
        except Exception as error:  # the shared cache is down: let the attempt through
            logger.error("throttle %s not checked, cache unavailable: %s", group, error)
            continue
        if usage is not None and usage["should_limit"]:
            waits.append(max(usage["time_left"], 1))
    return max(waits) if waits else None


def too_many_attempts(request: HttpRequest, *, wait: int) -> HttpResponse:
    response = render(request, "dashboard/throttled.html", {"wait": wait}, status=429)
    response["Retry-After"] = str(wait)
    return response
