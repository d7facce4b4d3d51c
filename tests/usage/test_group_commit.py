"""Group commit: the holds and settlements of concurrent calls, in one statement.

While a process's statements are in flight, the calls that reach the same statement
meanwhile go together in the next (config/asyncdb.py, GroupCommit). Here every call of a
test is started in one pass of one event loop, so each group below is one statement; the
books must come out exactly as if each call had run alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace

import psycopg
import pytest
from django.db import IntegrityError, connection
from prometheus_client import REGISTRY

from apps.billing.models import Account, Hold, HoldStatus, Transfer, TransferKind
from apps.billing.money import parse_usd
from apps.billing.selectors import books_check
from apps.billing.services import (
    CallNotAffordable,
    credit_grant,
    hold_release,
    revenue_account,
)
from apps.keys.services import key_create
from apps.tenancy.models import User
from apps.tenancy.services import organization_create
from apps.usage.models import UsageRecord
from apps.usage.services import call_settle_async
from tests.usage.test_async_statements import _customer, _hold, _unbudgeted, run
from tests.usage.test_reconcile_and_rollups import call_outcome

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

WORST = 50 * 2_500 + 200 * 10_000  # a call of 50 prompt tokens and up to 200 output tokens


def _statements(name: str) -> tuple[float, float]:
    """How many statements of group commit ran for `name`, and for how many calls."""
    labels = {"statement": name}
    count = REGISTRY.get_sample_value("real200_db_statement_rows_count", labels) or 0.0
    rows = REGISTRY.get_sample_value("real200_db_statement_rows_sum", labels) or 0.0
    return count, rows


def _orgs(count: int) -> list:
    owner = User.objects.create_user(email="group@example.com", password="x-long-password")
    orgs = []
    for n in range(count):
        org = organization_create(slug=f"group{n}", name=f"G{n}", owner=owner)
        credit_grant(organization=org, amount_nano=parse_usd("10"))
        org.api_key, _clear = key_create(organization=org, name="k")
        revenue_account(org.pk)  # known to the process, as after its first call
        orgs.append(org)
    return orgs


async def _together(*steps):
    """Start every step in this pass of the loop; their results (or exceptions) in order."""
    return await asyncio.gather(*steps, return_exceptions=True)


def test_calls_held_together_take_the_balance_in_the_order_they_came(funded_org, api_key, price):
    account = _customer(funded_org)
    # Room for exactly five worst cases (the first hold below learns the account's id).
    Account.objects.filter(pk=account.pk).update(held_nano=account.balance_nano - 6 * WORST)
    key = _unbudgeted(api_key)
    run(_hold(funded_org, key, price, "chatcmpl-first"))
    before = _statements("hold")

    results = run(_together(*(_hold(funded_org, key, price, f"chatcmpl-{n}") for n in range(8))))

    assert _statements("hold") == (before[0] + 1, before[1] + 8)  # one statement for all
    placed = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert [hold.request_id for hold, _max in placed] == [f"chatcmpl-{n}" for n in range(5)]
    assert all(isinstance(error, CallNotAffordable) for error in refused)
    assert len(refused) == 3
    for hold, max_tokens in placed:
        stored = Hold.objects.get(pk=hold.pk)
        assert (stored.request_id, stored.amount_nano, max_tokens) == (hold.request_id, WORST, 200)
        assert stored.status == HoldStatus.OPEN
        assert stored.api_key_id == api_key.pk
    assert _customer(funded_org).available_nano == 0
    assert Hold.objects.filter(status=HoldStatus.OPEN).count() == 6


def test_a_call_the_group_could_not_cover_is_held_for_what_the_balance_affords(
    funded_org, api_key, price
):
    """The third call does not fit after the first two; the fourth, without max_tokens,
    still gets what is left, by the careful path."""
    account = _customer(funded_org)
    left = WORST // 2  # after the first hold and the two that fit
    Account.objects.filter(pk=account.pk).update(held_nano=account.balance_nano - 3 * WORST - left)
    key = _unbudgeted(api_key)
    run(_hold(funded_org, key, price, "chatcmpl-first"))
    calls = [_hold(funded_org, key, price, f"chatcmpl-{n}") for n in range(3)]
    calls.append(_hold(funded_org, key, price, "chatcmpl-capped", max_tokens=None))

    *fixed, capped = run(_together(*calls))

    assert [isinstance(r, BaseException) for r in fixed] == [False, False, True]
    hold, max_tokens = capped
    assert hold.amount_nano == 50 * 2_500 + max_tokens * 10_000
    assert max_tokens == (left - 50 * 2_500) // 10_000  # what was left, to the token
    assert _customer(funded_org).available_nano == left - hold.amount_nano


def test_calls_of_many_organizations_settle_together_into_exact_books(price):
    orgs = _orgs(3)
    calls = [(org, n) for org in orgs for n in range(4)]

    async def hold_all():
        return await _together(
            *(
                _hold(org, _unbudgeted(org.api_key), price, f"chatcmpl-{org.slug}-{n}")
                for org, n in calls
            )
        )

    holds = [hold for hold, _max in run(hold_all())]
    released = holds[1]  # given up for dead before it settles: charged all the same
    hold_release(hold=released)

    def outcome(org, n):
        done = call_outcome(org, org.api_key, price, f"chatcmpl-{org.slug}-{n}", n * 10)
        if n == 2:  # a call that cost nothing: a usage record without a transfer
            done = replace(done, prompt_tokens=0, cached_tokens=0, completion_tokens=0)
        return done

    before = _statements("settle")
    records = run(
        _together(
            *(
                call_settle_async(hold=hold, outcome=outcome(org, n), rates=price)
                for hold, (org, n) in zip(holds, calls, strict=True)
            )
        )
    )

    assert _statements("settle") == (before[0] + 1, before[1] + len(calls))
    assert Hold.objects.get(pk=released.pk).status == HoldStatus.SETTLED  # late, by the ledger
    for record, (org, n) in zip(records, calls, strict=True):
        stored = UsageRecord.objects.get(request_id=record.request_id)
        assert (stored.pk, stored.organization_id, stored.completion_tokens) == (
            record.pk,
            org.pk,
            outcome(org, n).completion_tokens,
        )
        expected = 0 if n == 2 else 50 * 2_500 - 10 * 1_250 + n * 10 * 10_000
        assert stored.charged_nano == stored.cost_nano == record.charged_nano == expected
        if expected == 0:
            assert stored.transfer_id is None
            continue
        transfer = Transfer.objects.get(pk=stored.transfer_id)
        assert (transfer.amount_nano, transfer.kind, transfer.api_key_id) == (
            expected,
            TransferKind.CHARGE,
            org.api_key.pk,
        )
        assert transfer.from_account_id == _customer(org).pk
        assert transfer.to_account_id == revenue_account(org.pk).pk
    for org in orgs:
        charged = sum(
            UsageRecord.objects.filter(organization=org).values_list("charged_nano", flat=True)
        )
        customer = _customer(org)
        assert (customer.balance_nano, customer.held_nano) == (parse_usd("10") - charged, 0)
    assert UsageRecord.objects.count() == len(calls)
    report = books_check()
    assert report.is_clean, report.problems


def test_a_statement_that_fails_is_tried_call_by_call(funded_org, api_key, price, caplog):
    """One call of the group repeats a call id already held: the group's statement fails
    on it, and each call is then tried alone, so only that one fails."""
    key = _unbudgeted(api_key)
    run(_hold(funded_org, key, price, "chatcmpl-taken"))
    ids = ["chatcmpl-a", "chatcmpl-taken", "chatcmpl-b"]
    with caplog.at_level(logging.WARNING, logger="config.asyncdb"):
        results = run(_together(*(_hold(funded_org, key, price, i) for i in ids)))
    assert "trying each alone" in caplog.text
    assert isinstance(results[1], IntegrityError)
    assert [results[0][0].request_id, results[2][0].request_id] == ["chatcmpl-a", "chatcmpl-b"]
    assert _customer(funded_org).held_nano == 3 * WORST
    assert Hold.objects.count() == 3


def _connect() -> psycopg.Connection:
    params = connection.get_connection_params()
    where = {name: params.get(name) for name in ("dbname", "user", "host", "port")}
    return psycopg.connect(**where, autocommit=True)


def _waiting_on_a_lock() -> bool:
    with _connect() as conn:
        return bool(
            conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'real200 async' "
                "AND wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchall()
        )


@pytest.mark.parametrize("statement", ["hold", "settle"])
def test_a_group_locks_its_accounts_in_primary_key_order(price, statement):
    """The ledger's locking rule, which keeps two processes' groups from deadlocking:
    whatever order the calls came in, a group locks the lower account first. Here the
    higher account is locked elsewhere and its call comes first; while the group waits
    for it, the lower one must already be the group's."""
    low, high = sorted(_orgs(2), key=lambda org: _customer(org).pk)
    holds = [
        run(_hold(org, _unbudgeted(org.api_key), price, f"chatcmpl-{org.slug}"))
        for org in (high, low)
    ]

    def group() -> None:
        if statement == "hold":
            steps = [
                _hold(org, _unbudgeted(org.api_key), price, f"chatcmpl-2-{org.slug}")
                for org in (high, low)
            ]
        else:
            steps = [
                call_settle_async(
                    hold=hold,
                    outcome=call_outcome(org, org.api_key, price, hold.request_id),
                    rates=price,
                )
                for (hold, _max), org in zip(holds, (high, low), strict=True)
            ]
        results = run(_together(*steps))
        connection.close()
        assert not any(isinstance(result, BaseException) for result in results), results

    with _connect() as blocker, _connect() as probe:
        with blocker.transaction():
            blocker.execute(
                "SELECT 1 FROM billing_account WHERE id = %s FOR NO KEY UPDATE",
                [_customer(high).pk],
            )
            grouping = threading.Thread(target=group)
            grouping.start()
            deadline = time.monotonic() + 10
            while not _waiting_on_a_lock():
                assert time.monotonic() < deadline, "the group never waited for the account"
                time.sleep(0.01)
            with pytest.raises(psycopg.errors.LockNotAvailable):
                probe.execute(
                    "SELECT 1 FROM billing_account WHERE id = %s FOR NO KEY UPDATE NOWAIT",
                    [_customer(low).pk],
                )
        grouping.join(timeout=30)
    assert not grouping.is_alive()
    report = books_check()
    assert report.is_clean, report.problems
