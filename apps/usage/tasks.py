"""Jobs on usage and the books. Each calls one service and is safe to run twice at once."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.db import DatabaseError
from django.utils import timezone

from apps.billing.models import Hold
from apps.catalog.models import Price
from apps.usage.models import RollupPeriod
from apps.usage.services import CallOutcome, books_reconcile, call_settle, rollups_refresh

logger = logging.getLogger(__name__)


@shared_task(
    autoretry_for=(DatabaseError,),
    retry_backoff=1,
    retry_backoff_max=30,
    # About two hours of a database outage. Past the hold's life the stale-hold sweeper
    # releases it; the settlement, when it comes, charges the call all the same.
    max_retries=240,
    acks_late=True,
    time_limit=60,
    soft_time_limit=50,
)
def settle_call(hold_id: int, outcome: dict) -> str | None:
    """Finish the settlement of a call whose settlement failed in the request (a database
    blip). The hold was written before the upstream was called, so it is here; settling it
    twice changes nothing (see call_settle)."""
    hold = Hold.objects.get(pk=hold_id)
    price = Price.objects.get(pk=outcome["price_id"])
    # Queued by a web process of the release before cache writes were counted apart (a
    # worker upgraded first, during a deploy): its prompt_tokens include them, billed at
    # the input rate as that release held and billed them.
    outcome = {"cache_write_tokens": 0, **outcome}
    record = call_settle(hold=hold, outcome=CallOutcome(**outcome), rates=price)
    if record is None:
        logger.error("call %s could not be settled", outcome["request_id"])
        return None
    return record.request_id


@shared_task(time_limit=600, soft_time_limit=540)
def reconcile_books() -> int:
    return books_reconcile().pk


@shared_task(time_limit=300, soft_time_limit=240)
def rollup_usage(hours: int = 2) -> int:
    """Refresh the hourly buckets of the last `hours` hours and the daily bucket(s) they
    fall in."""
    since = timezone.now() - timedelta(hours=hours)
    return rollups_refresh(since=since, period=RollupPeriod.HOUR) + rollups_refresh(
        since=since, period=RollupPeriod.DAY
    )
