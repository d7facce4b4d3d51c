"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse

logger = logging.getLogger(__name__)


async def healthz(request: HttpRequest) -> JsonResponse:
    """Alive: the process answers. Touches nothing else, so it stays cheap."""
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_cache() -> None:
    cache.set("readyz", "1", timeout=5)
    if cache.get("readyz") != "1":
        raise RuntimeError("cache did not return what was just written")


async def readyz(request: HttpRequest) -> JsonResponse:
    """Ready: the database and the cache answer. 503 with the failing part otherwise."""
    checks = {}
    for name, check in (("database", _check_database), ("cache", _check_cache)):
        try:
            await sync_to_async(check)()
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready; say which part failed
            logger.warning("readiness check %s failed: %s", name, exc)
            checks[name] = "unavailable"
    ready = all(state == "ok" for state in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", **checks}, status=200 if ready else 503
    )
