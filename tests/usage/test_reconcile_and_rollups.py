"""Reconciliation of usage against the ledger, and the rollups behind the charts."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from apps.billing.models import Account, Hold, HoldStatus, ReconciliationReport
from apps.billing.money import parse_usd
from apps.billing.selectors import books_check
from apps.billing.services import account_for_organization, holds_release_stale
from apps.usage.models import EndReason, RollupPeriod, UsageRecord, UsageRollup, UsageSource
from apps.usage.selectors import usage_ledger_problems
from apps.usage.services import CallOutcome, books_reconcile, call_settle
from apps.usage.tasks import reconcile_books, rollup_usage, settle_call
from tests.billing.holds import hold_of


def call_outcome(
    org, api_key, price, request_id: str, completion_tokens: int = 100, cache_write_tokens: int = 0
) -> CallOutcome:
    """A finished call of 50 prompt tokens (10 cached, `cache_write_tokens` written to the
    cache) on gpt-4o."""
    return CallOutcome(
        request_id=request_id,
        organization_id=org.pk,
        api_key_id=api_key.pk,
        model="gpt-4o",
        price_id=price.pk,
        channel_id=None,
        prompt_tokens=50,
        cached_tokens=10,
        cache_write_tokens=cache_write_tokens,
        completion_tokens=completion_tokens,
        usage_source=UsageSource.UPSTREAM,
        end_reason=EndReason.DONE,
        status_code=200,
        is_stream=False,
        latency_ms=12,
        ttft_ms=5,
    )


def _settled_call(
    org, api_key, price, request_id: str, completion_tokens: int = 100, cache_write_tokens: int = 0
) -> UsageRecord:
    account = account_for_organization(organization=org)
    hold = hold_of(account, 10**7, request_id)
    outcome = call_outcome(org, api_key, price, request_id, completion_tokens, cache_write_tokens)
    return call_settle(hold=hold, outcome=outcome, rates=price)


def test_settling_a_call_twice_charges_once(funded_org, api_key, price):
    record = _settled_call(funded_org, api_key, price, "chatcmpl-1")
    assert record.cost_nano == record.charged_nano == 40 * 2_500 + 10 * 1_250 + 100 * 10_000
    hold = record and account_for_organization(organization=funded_org).holds.get()
    again = call_settle(
        hold=hold,
        outcome=CallOutcome(**{**_outcome_fields(record), "completion_tokens": 999}),
        rates=price,
    )
    assert again.pk == record.pk
    assert UsageRecord.objects.count() == 1
    account = Account.objects.get(organization=funded_org)
    assert account.balance_nano == 10 * 10**9 - record.cost_nano


def _outcome_fields(record: UsageRecord) -> dict:
    return {
        "request_id": record.request_id,
        "organization_id": record.organization_id,
        "api_key_id": record.api_key_id,
        "model": record.model,
        "price_id": record.price_id,
        "channel_id": None,
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "cache_write_tokens": record.cache_write_tokens,
        "completion_tokens": record.completion_tokens,
        "usage_source": record.usage_source,
        "end_reason": record.end_reason,
        "status_code": 200,
        "is_stream": False,
        "latency_ms": 1,
        "ttft_ms": None,
    }


def test_a_settlement_queued_before_cache_writes_were_counted_apart_still_settles(
    funded_org, api_key, price
):
    """During a deploy, a web process of the release before may queue a settlement for an
    upgraded worker: its outcome has no cache_write_tokens."""
    hold = hold_of(account_for_organization(organization=funded_org), 10**7, "chatcmpl-old")
    queued = asdict(call_outcome(funded_org, api_key, price, "chatcmpl-old"))
    del queued["cache_write_tokens"]
    assert settle_call(hold.pk, queued) == "chatcmpl-old"
    record = UsageRecord.objects.get(request_id="chatcmpl-old")
    assert record.cache_write_tokens == 0
    assert record.charged_nano == 40 * 2_500 + 10 * 1_250 + 100 * 10_000


def test_a_settlement_that_outlived_its_hold_still_charges_the_call_once(
    funded_org, api_key, price
):
    """A database outage longer than a hold's life: the call's settlement waits in the
    queue, the stale-hold sweeper releases the hold (the money goes back to the balance),
    then the settlement comes. The call was metered and the upstream bills it: it is
    charged, once, and the books stay clean."""
    account = account_for_organization(organization=funded_org)
    expired = timezone.now() - timedelta(minutes=1)
    hold = hold_of(account, 10**7, "chatcmpl-late", expires_at=expired)
    assert holds_release_stale() == 1
    queued = asdict(call_outcome(funded_org, api_key, price, "chatcmpl-late"))
    assert settle_call(hold.pk, queued) == "chatcmpl-late"
    assert settle_call(hold.pk, queued) == "chatcmpl-late"  # the queue delivered it twice
    record = UsageRecord.objects.get(request_id="chatcmpl-late")
    cost = 40 * 2_500 + 10 * 1_250 + 100 * 10_000
    assert record.charged_nano == record.cost_nano == cost
    assert Hold.objects.get(pk=hold.pk).status == HoldStatus.SETTLED
    account.refresh_from_db()
    assert (account.balance_nano, account.held_nano) == (parse_usd("10") - cost, 0)
    report = books_check()
    assert report.is_clean, report.problems
    assert usage_ledger_problems()[1] == []


def test_reconcile_stores_a_clean_report(funded_org, api_key, price):
    _settled_call(funded_org, api_key, price, "chatcmpl-1")
    report = ReconciliationReport.objects.get(pk=reconcile_books())
    assert report.is_clean, report.problems
    assert (report.usage_records, report.total_nano) == (1, 0)


def test_reconcile_reports_a_usage_record_that_disagrees_with_its_transfer(
    funded_org, api_key, price, caplog
):
    record = _settled_call(funded_org, api_key, price, "chatcmpl-1")
    UsageRecord.objects.filter(pk=record.pk).update(charged_nano=record.charged_nano - 1)
    report = books_reconcile()
    assert not report.is_clean
    assert any("chatcmpl-1" in problem for problem in report.problems)
    assert "reconciliation" in caplog.text
    assert "problem" in caplog.text


def test_reconcile_reports_a_charge_without_usage(funded_org, api_key, price):
    record = _settled_call(funded_org, api_key, price, "chatcmpl-1")
    UsageRecord.objects.filter(pk=record.pk).delete()
    report = books_reconcile()
    assert any("has no usage record" in problem for problem in report.problems)


@pytest.mark.parametrize("runs", [1, 2])
def test_rollups_sum_usage_per_hour_and_day_and_a_rerun_changes_nothing(
    funded_org, api_key, price, runs
):
    with time_machine.travel("2026-11-20 10:15:00+00:00", tick=False):
        first = _settled_call(funded_org, api_key, price, "chatcmpl-a", completion_tokens=100)
        _settled_call(
            funded_org, api_key, price, "chatcmpl-b", completion_tokens=200, cache_write_tokens=30
        )
    with time_machine.travel("2026-11-20 11:05:00+00:00", tick=False):
        _settled_call(funded_org, api_key, price, "chatcmpl-c", completion_tokens=300)
        for _ in range(runs):
            rollup_usage(hours=3)
    hours = UsageRollup.objects.filter(period=RollupPeriod.HOUR).order_by("period_start")
    assert [
        (r.period_start.hour, r.requests, r.completion_tokens, r.cache_write_tokens) for r in hours
    ] == [
        (10, 2, 300, 30),
        (11, 1, 300, 0),
    ]
    (day,) = UsageRollup.objects.filter(period=RollupPeriod.DAY)
    assert (day.requests, day.prompt_tokens, day.cached_tokens) == (3, 150, 30)
    assert day.cache_write_tokens == 30
    assert day.cost_nano == sum(UsageRecord.objects.values_list("charged_nano", flat=True))
    assert day.api_key_id == api_key.pk
    assert day.model == "gpt-4o"
    assert first.organization_id == day.organization_id
