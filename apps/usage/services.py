"""Settling a call: the usage record, the ledger charge and the hold's release, together."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.core.mail import mail_admins
from django.db import connection, transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDay, TruncHour
from django.utils import timezone

from apps.billing.models import AccountKind, Hold, HoldStatus, ReconciliationReport, TransferKind
from apps.billing.money import Nano, Rates, call_cost_nano
from apps.billing.selectors import books_check
from apps.billing.services import (
    hold_settle,
    remembered_system_account_id,
    revenue_account,
    revenue_shard,
)
from apps.keys.models import ApiKey
from apps.usage.models import RollupPeriod, UsageRecord, UsageRollup
from apps.usage.selectors import usage_ledger_problems
from config.asyncdb import (
    GroupCommit,
    as_columns,
    db_step,
    fetch_all,
    fetch_one,
    fetch_one_available,
)

logger = logging.getLogger(__name__)

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
    cache_write_tokens: int
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
    past that. A call whose hold was released before its settlement came (given up for
    dead during a long database outage) is charged all the same (see `hold_settle`).
    """
    cost = _call_cost(outcome, rates)
    record = None
    if cost <= hold.amount_nano and connection.vendor == "postgresql":
        record = _settle_in_one_statement(hold=hold, outcome=outcome, cost_nano=cost)
        if record is None and (earlier := _record_of(outcome)) is not None:
            return earlier  # settled before: a retry
    if record is None:  # the careful path: any cost, any database, a hold released meanwhile
        record = _settle_in_transaction(hold=hold, outcome=outcome, cost_nano=cost)
        if record is None:  # settled before: a retry
            return _record_of(outcome)
    if _key_use_due(outcome.api_key_id):
        _key_use_write(outcome.api_key_id)
    return record


async def call_settle_async(
    *, hold: Hold, outcome: CallOutcome, rates: Rates
) -> UsageRecord | None:
    """`call_settle` from async code: a call that cost no more than its hold (nearly
    every call) is settled by one statement on the event loop's own connection; anything
    else runs `call_settle` in a worker thread."""
    cost = _call_cost(outcome, rates)
    if cost > hold.amount_nano or not fetch_one_available():
        return await db_step(call_settle, hold=hold, outcome=outcome, rates=rates)
    shard = revenue_shard(outcome.organization_id)
    revenue_id = remembered_system_account_id(AccountKind.REVENUE, shard)
    if revenue_id is None:
        revenue_id = (await db_step(revenue_account, outcome.organization_id)).pk
    fields = _record_fields(outcome, cost, cost)
    now = timezone.now()
    row = await _settle_statements.submit(_settle_params(hold, outcome, fields, now, revenue_id))
    if row is None:  # settled before (a retry), or released
        return await db_step(call_settle, hold=hold, outcome=outcome, rates=rates)
    if _key_use_due(outcome.api_key_id):
        await db_step(_key_use_write, outcome.api_key_id)
    return _settled_record(row, fields, now)


def _call_cost(outcome: CallOutcome, rates: Rates) -> Nano:
    return call_cost_nano(
        prompt_tokens=outcome.prompt_tokens,
        cached_tokens=outcome.cached_tokens,
        cache_write_tokens=outcome.cache_write_tokens,
        completion_tokens=outcome.completion_tokens,
        rates=rates,
    )


def _record_of(outcome: CallOutcome) -> UsageRecord | None:
    return UsageRecord.objects.filter(request_id=outcome.request_id).first()


def _record_fields(outcome: CallOutcome, cost_nano: Nano, charged_nano: Nano) -> dict:
    return {
        "request_id": outcome.request_id,
        "organization_id": outcome.organization_id,
        "api_key_id": outcome.api_key_id,
        "model": outcome.model,
        "price_id": outcome.price_id,
        "channel_id": outcome.channel_id,
        "prompt_tokens": outcome.prompt_tokens,
        "cached_tokens": outcome.cached_tokens,
        "cache_write_tokens": outcome.cache_write_tokens,
        "completion_tokens": outcome.completion_tokens,
        "cost_nano": cost_nano,
        "charged_nano": charged_nano,
        "usage_source": outcome.usage_source,
        "end_reason": outcome.end_reason,
        "status_code": outcome.status_code,
        "is_stream": outcome.is_stream,
        "latency_ms": outcome.latency_ms,
        "ttft_ms": outcome.ttft_ms,
    }


def _settle_in_transaction(
    *, hold: Hold, outcome: CallOutcome, cost_nano: Nano
) -> UsageRecord | None:
    """Settlement through the ledger's services: any database, any cost (a cost beyond
    the hold is capped at what the balance can pay, see `hold_settle`)."""
    with transaction.atomic():
        settled, transfer, charged = hold_settle(
            hold=hold, cost_nano=cost_nano, memo=_memo(outcome)
        )
        if not settled:
            return None
        return UsageRecord.objects.create(
            transfer=transfer, **_record_fields(outcome, cost_nano, charged)
        )


def _memo(outcome: CallOutcome) -> str:
    return f"{outcome.model} {outcome.request_id}"


def _settle_in_one_statement(
    *, hold: Hold, outcome: CallOutcome, cost_nano: Nano
) -> UsageRecord | None:
    """Settlement of a call that cost no more than its hold, on PostgreSQL, as one
    statement (`_SETTLE`): claim the hold, debit the customer and release the hold, credit
    revenue, insert the transfer and the usage record. None if the hold was no longer open.

    The same writes as `_settle_in_transaction`; what makes one statement possible is that
    a cost within the hold is always payable (the hold is part of the balance), so nothing
    needs reading first. One statement holds the customer's row and its revenue row, which
    many calls touch, only while PostgreSQL runs it: no lock waits on this process
    sending the next statement and the commit.
    """
    revenue_id = revenue_account(outcome.organization_id).pk
    fields = _record_fields(outcome, cost_nano, cost_nano)
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_SETTLE, _settle_params(hold, outcome, fields, now, revenue_id))
        row = cursor.fetchone()
    if row is None or row[0] is None:
        return None
    return _settled_record(row, fields, now)


def _settle_params(
    hold: Hold, outcome: CallOutcome, fields: dict, now: datetime, revenue_id: int
) -> dict:
    return {
        **fields,
        "hold": hold.pk,
        "open": HoldStatus.OPEN.value,
        "settled": HoldStatus.SETTLED.value,
        "revenue": revenue_id,
        "charge_kind": TransferKind.CHARGE.value,
        "memo": _memo(outcome)[:500],
        "now": now,
    }


def _settled_record(row: tuple, fields: dict, now: datetime) -> UsageRecord:
    """The UsageRecord that `_SETTLE` inserted, from the ids it returned."""
    record = UsageRecord(id=row[0], transfer_id=row[1], created_at=now, **fields)
    record._state.adding = False  # it is in the database: saving it would update it
    return record


# Locks in the ledger's order (see apps.billing.services): the hold, the customer's
# account, then the revenue account, whose update waits on `debited` through EXISTS.
_SETTLE = """
WITH claimed AS (
    UPDATE billing_hold SET status = %(settled)s, closed_at = %(now)s
    WHERE id = %(hold)s AND status = %(open)s
    RETURNING account_id, api_key_id, amount_nano
), debited AS (
    UPDATE billing_account AS a
    SET held_nano = a.held_nano - c.amount_nano, balance_nano = a.balance_nano - %(cost_nano)s
    FROM claimed AS c WHERE a.id = c.account_id
    RETURNING a.id, c.api_key_id
), credited AS (
    UPDATE billing_account SET balance_nano = balance_nano + %(cost_nano)s
    WHERE id = %(revenue)s AND %(cost_nano)s > 0 AND EXISTS (SELECT 1 FROM debited)
    RETURNING id
), transfer AS (
    INSERT INTO billing_transfer
        (from_account_id, to_account_id, amount_nano, kind, memo, api_key_id, created_at)
    SELECT d.id, r.id, %(cost_nano)s, %(charge_kind)s, %(memo)s, d.api_key_id, %(now)s
    FROM debited AS d, credited AS r
    RETURNING id
), record AS (
    INSERT INTO usage_usagerecord
        (request_id, organization_id, api_key_id, model, price_id, channel_id, transfer_id,
         prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, cost_nano,
         charged_nano, usage_source, end_reason, status_code, is_stream, latency_ms, ttft_ms,
         created_at)
    SELECT %(request_id)s, %(organization_id)s, %(api_key_id)s, %(model)s, %(price_id)s,
        %(channel_id)s, (SELECT id FROM transfer), %(prompt_tokens)s, %(cached_tokens)s,
        %(cache_write_tokens)s, %(completion_tokens)s, %(cost_nano)s, %(charged_nano)s,
        %(usage_source)s, %(end_reason)s, %(status_code)s, %(is_stream)s, %(latency_ms)s,
        %(ttft_ms)s, %(now)s
    FROM debited
    RETURNING id
)
SELECT (SELECT id FROM record), (SELECT id FROM transfer)
"""


async def _settle_one(params: dict) -> tuple | None:
    """Settle one call by `_SETTLE`: the ids of its usage record and transfer, or None if
    its hold was no longer open."""
    row = await fetch_one(_SETTLE, params)
    return row if row is not None and row[0] is not None else None


async def _settle_many(rows: list[dict]) -> list[tuple | None]:
    """`_settle_one` for many calls, in one statement (`_SETTLE_MANY`)."""
    settled = await fetch_all(
        _SETTLE_MANY, as_columns(rows, scalars=("open", "settled", "charge_kind"))
    )
    ids = {request_id: (record_id, transfer_id) for record_id, request_id, transfer_id in settled}
    return [ids.get(row["request_id"]) for row in rows]


# Both statements stay: for a single call, `_SETTLE_MANY` took 1.8 ms against 0.8 for
# `_SETTLE` (and the grouped hold 0.8 ms against 0.5; median of 1,000 each on an idle
# database, 2026-11-26), so a process that is not busy sends each call alone.
_settle_statements = GroupCommit("settle", one=_settle_one, many=_settle_many)

# `_SETTLE` for many calls, on any accounts. The ledger's locking rule holds for the
# whole set: the claimed holds, then the customers' accounts in primary-key order
# (`customers`), then the revenue accounts in that order (`revenues`, which waits on
# every debit through the count), each locked before it is changed. Transfer ids are
# drawn first, so that each usage record names its own.
_SETTLE_MANY = """
WITH wanted AS MATERIALIZED (
    SELECT * FROM unnest(
        %(hold)s::bigint[], %(revenue)s::bigint[], %(memo)s::text[], %(now)s::timestamptz[],
        %(request_id)s::text[], %(organization_id)s::bigint[], %(api_key_id)s::bigint[],
        %(model)s::text[], %(price_id)s::bigint[], %(channel_id)s::bigint[],
        %(prompt_tokens)s::bigint[], %(cached_tokens)s::bigint[],
        %(cache_write_tokens)s::bigint[], %(completion_tokens)s::bigint[],
        %(cost_nano)s::bigint[], %(charged_nano)s::bigint[], %(usage_source)s::text[],
        %(end_reason)s::text[], %(status_code)s::integer[], %(is_stream)s::boolean[],
        %(latency_ms)s::bigint[], %(ttft_ms)s::bigint[]
    ) AS w(hold_id, revenue_id, memo, created_at, request_id, organization_id, api_key_id,
           model, price_id, channel_id, prompt_tokens, cached_tokens, cache_write_tokens,
           completion_tokens, cost_nano, charged_nano, usage_source, end_reason, status_code,
           is_stream, latency_ms, ttft_ms)
), claimed AS (
    UPDATE billing_hold AS h SET status = %(settled)s, closed_at = w.created_at
    FROM wanted AS w WHERE h.id = w.hold_id AND h.status = %(open)s
    RETURNING h.id, h.account_id, h.api_key_id AS hold_key_id, h.amount_nano AS held_nano
), settling AS MATERIALIZED (
    SELECT w.*, c.account_id, c.hold_key_id, c.held_nano,
        CASE WHEN w.cost_nano > 0
            THEN nextval(pg_get_serial_sequence('billing_transfer', 'id')) END AS transfer_id
    FROM wanted AS w JOIN claimed AS c ON c.id = w.hold_id
), customers AS MATERIALIZED (
    SELECT id FROM billing_account WHERE id IN (SELECT account_id FROM settling)
    ORDER BY id FOR NO KEY UPDATE
), debited AS (
    UPDATE billing_account AS a
    SET held_nano = a.held_nano - s.held, balance_nano = a.balance_nano - s.cost
    FROM (
        SELECT account_id, sum(held_nano) AS held, sum(cost_nano) AS cost
        FROM settling GROUP BY account_id
    ) AS s
    WHERE a.id = s.account_id AND a.id IN (SELECT id FROM customers)
    RETURNING a.id
), revenues AS MATERIALIZED (
    SELECT id FROM billing_account
    WHERE id IN (SELECT revenue_id FROM settling WHERE cost_nano > 0)
        AND (SELECT count(*) FROM debited) >= 0
    ORDER BY id FOR NO KEY UPDATE
), credited AS (
    UPDATE billing_account AS a SET balance_nano = a.balance_nano + s.cost
    FROM (
        SELECT revenue_id, sum(cost_nano) AS cost
        FROM settling WHERE cost_nano > 0 GROUP BY revenue_id
    ) AS s
    WHERE a.id = s.revenue_id AND a.id IN (SELECT id FROM revenues)
), transfers AS (
    INSERT INTO billing_transfer
        (id, from_account_id, to_account_id, amount_nano, kind, memo, api_key_id, created_at)
    SELECT transfer_id, account_id, revenue_id, cost_nano, %(charge_kind)s, memo, hold_key_id,
        created_at
    FROM settling WHERE transfer_id IS NOT NULL
)
INSERT INTO usage_usagerecord
    (request_id, organization_id, api_key_id, model, price_id, channel_id, transfer_id,
     prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, cost_nano,
     charged_nano, usage_source, end_reason, status_code, is_stream, latency_ms, ttft_ms,
     created_at)
SELECT request_id, organization_id, api_key_id, model, price_id, channel_id, transfer_id,
    prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, cost_nano,
    charged_nano, usage_source, end_reason, status_code, is_stream, latency_ms, ttft_ms,
    created_at
FROM settling
RETURNING id, request_id, transfer_id
"""

# last_used_at is for people ("used 3 minutes ago"); writing it on every call would add a
# statement to each and make each key row a hot spot, so each process writes it at most
# once a minute per key.
_key_used_written: dict[int, float] = {}


def _key_use_due(api_key_id: int | None) -> bool:
    """Whether this process should write the key's last_used_at now; notes that it will."""
    if api_key_id is None:
        return False
    now = time.monotonic()
    if now - _key_used_written.get(api_key_id, -math.inf) < LAST_USED_RESOLUTION.total_seconds():
        return False
    _key_used_written[api_key_id] = now
    return True


def _key_use_write(api_key_id: int) -> None:
    moment = timezone.now()
    ApiKey.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=moment - LAST_USED_RESOLUTION),
        pk=api_key_id,
    ).update(last_used_at=moment)


def key_use_forget() -> None:
    """Drop this process's memo of last_used_at writes (tests)."""
    _key_used_written.clear()


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
            cache_write=Sum("cache_write_tokens"),
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
            cache_write_tokens=group["cache_write"],
            completion_tokens=group["completion"],
            cost_nano=group["cost"],
        )
        for group in groups
    ]
    with transaction.atomic():
        UsageRollup.objects.filter(period=period, period_start__gte=start).delete()
        UsageRollup.objects.bulk_create(rows)
    return len(rows)
