"""Settling a call: the usage record, the ledger charge and the hold's release, together."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.core.mail import mail_admins
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDay, TruncHour
from django.utils import timezone

from apps.billing.models import Hold, ReconciliationReport
from apps.billing.money import Rates, call_cost_nano
from apps.billing.selectors import books_check
from apps.billing.services import hold_settle
from apps.keys.models import ApiKey
from apps.usage.models import RollupPeriod, UsageRecord, UsageRollup
from apps.usage.selectors import usage_ledger_problems

logger = logging.getLogger(__name__)

# last_used_at is for people ("used 3 minutes ago"); writing it on every call would make
# each key row a hot spot, so it moves at most once a minute.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """Everything settlement needs to know about one finished call (plain values, so a
    retry task can carry it)."""

    request_id: str
    organization_id: int
    api_key_id: int | None
    model: str
    price_id: int
    channel_id: int | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    usage_source: str
    end_reason: str
    status_code: int
    is_stream: bool
    latency_ms: int
    ttft_ms: int | None


def call_settle(*, hold: Hold, outcome: CallOutcome, rates: Rates) -> UsageRecord | None:
    """Charge a finished call and close its hold, exactly once, in one transaction.

    The hold is claimed by a conditional update (see `hold_settle`): a second settlement
    of the same call finds it closed and returns the first record, changing nothing; the
    unique `request_id` and one-to-one transfer make a double charge impossible even
    past that. Returns None if the hold had been released instead (the call was given up
    for dead): nothing is charged then.
    """
    cost = call_cost_nano(
        prompt_tokens=outcome.prompt_tokens,
        cached_tokens=outcome.cached_tokens,
        completion_tokens=outcome.completion_tokens,
        rates=rates,
    )
    with transaction.atomic():
        settled, transfer, charged = hold_settle(
            hold=hold, cost_nano=cost, memo=f"{outcome.model} {outcome.request_id}"
        )
        if not settled:
            return UsageRecord.objects.filter(request_id=outcome.request_id).first()
        record = UsageRecord.objects.create(
            request_id=outcome.request_id,
            organization_id=outcome.organization_id,
            api_key_id=outcome.api_key_id,
            model=outcome.model,
            price_id=outcome.price_id,
            channel_id=outcome.channel_id,
            transfer=transfer,
            prompt_tokens=outcome.prompt_tokens,
            cached_tokens=outcome.cached_tokens,
            completion_tokens=outcome.completion_tokens,
            cost_nano=cost,
            charged_nano=charged,
            usage_source=outcome.usage_source,
            end_reason=outcome.end_reason,
            status_code=outcome.status_code,
            is_stream=outcome.is_stream,
            latency_ms=outcome.latency_ms,
            ttft_ms=outcome.ttft_ms,
        )
        if outcome.api_key_id is not None:
            now = timezone.now()
            ApiKey.objects.filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION),
                pk=outcome.api_key_id,
            ).update(last_used_at=now)
    return record


def books_reconcile() -> ReconciliationReport:
    """Recompute the books and compare them with the usage; store the report and, on any
    difference, log it at error level and email the operators. Never corrects anything:
    a difference is for a person to explain. Safe to run at any time, twice at once."""
    started_at = timezone.now()
    books = books_check()
    usage_records, usage_problems = usage_ledger_problems()
    report = ReconciliationReport.objects.create(
        started_at=started_at,
        finished_at=timezone.now(),
        is_clean=books.is_clean and not usage_problems,
        accounts=books.accounts,
        transfers=books.transfers,
        usage_records=usage_records,
        total_nano=books.total_nano,
        problems=books.problems + usage_problems,
    )
    if not report.is_clean:
        summary = f"reconciliation #{report.pk} found {len(report.problems)} problem(s)"
        logger.error("%s: %s", summary, "; ".join(report.problems[:20]))
        mail_admins(f"[real200] {summary}", "\n".join(report.problems), fail_silently=True)
    return report


_BUCKETS = {RollupPeriod.HOUR: TruncHour, RollupPeriod.DAY: TruncDay}


def rollups_refresh(*, since: datetime, period: RollupPeriod) -> int:
    """Recompute every `period` bucket that starts at or after the bucket holding `since`,
    from the usage records, replacing what was there. Derived data, so a rerun (or a
    concurrent run, which fails on the unique constraint and is retried) changes nothing."""
    trunc = _BUCKETS[period]
    start = since.replace(minute=0, second=0, microsecond=0)
    if period == RollupPeriod.DAY:
        start = start.replace(hour=0)
    groups = (
        UsageRecord.objects.filter(created_at__gte=start)
        .annotate(bucket=trunc("created_at"))
        .values("organization_id", "api_key_id", "model", "bucket")
        .annotate(
            requests=Count("pk"),
            prompt=Sum("prompt_tokens"),
            cached=Sum("cached_tokens"),
            completion=Sum("completion_tokens"),
            cost=Sum("charged_nano"),
        )
        .order_by()
    )
    rows = [
        UsageRollup(
            organization_id=group["organization_id"],
            api_key_id=group["api_key_id"],
            model=group["model"],
            period=period,
            period_start=group["bucket"],
            requests=group["requests"],
            prompt_tokens=group["prompt"],
            cached_tokens=group["cached"],
            completion_tokens=group["completion"],
            cost_nano=group["cost"],
        )
        for group in groups
    ]
    with transaction.atomic():
        UsageRollup.objects.filter(period=period, period_start__gte=start).delete()
        UsageRollup.objects.bulk_create(rows)
    return len(rows)
