"""The hold and the settlement from async code, as the gateway runs them.

On PostgreSQL the one-statement hold and settlement run on the event loop's own async
connection (config/asyncdb.py); every other case goes to the sync services in a worker
thread. Those connections are not the test's, so these tests commit their rows
(`transaction=True`), and each drives the async code in an event loop of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from django.db import IntegrityError, ProgrammingError, connection, connections
from django.utils import timezone

from apps.billing.models import Account, Hold, HoldStatus, Transfer
from apps.billing.money import parse_usd
from apps.billing.services import (
    CallNotAffordable,
    KeyBudget,
    hold_start_for_call,
    revenue_account,
    system_accounts_forget,
)
from apps.keys.models import ApiKey
from apps.usage.models import UsageRecord
from apps.usage.services import call_settle_async, key_use_forget
from config import asyncdb
from tests.billing.holds import quote_for_50_tokens
from tests.usage.test_reconcile_and_rollups import call_outcome

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
T = TypeVar("T")


def run(step: Coroutine[Any, Any, T]) -> T:
    """Run `step` in a fresh event loop, closing the loop's pool after it."""

    async def then_close() -> T:
        try:
            return await step
        finally:
            await asyncdb.fetch_pools_close()

    return asyncio.run(then_close())


async def _hold(org, key: KeyBudget, price, request_id: str, max_tokens: int | None = 200):
    """Hold a call of 50 prompt tokens and up to `max_tokens` output tokens."""
    return await hold_start_for_call(
        organization_id=org.pk,
        key=key,
        request_id=request_id,
        expires_at=timezone.now() + timedelta(minutes=5),
        quote=quote_for_50_tokens(price, max_tokens),
    ).hold()


def _unbudgeted(api_key) -> KeyBudget:
    return KeyBudget(key_id=api_key.pk, budget_nano=None)


def _customer(org) -> Account:
    return Account.objects.get(organization=org)


def test_a_call_is_held_and_settled_once_on_the_loops_connection(funded_org, api_key, price):
    hold, max_tokens = run(_hold(funded_org, _unbudgeted(api_key), price, "chatcmpl-async"))
    worst = 50 * 2_500 + 200 * 10_000
    assert (max_tokens, hold.amount_nano) == (200, worst)
    assert Hold.objects.get(pk=hold.pk).status == HoldStatus.OPEN
    assert _customer(funded_org).held_nano == worst

    system_accounts_forget()  # the settlement finds the revenue account itself
    outcome = call_outcome(funded_org, api_key, price, "chatcmpl-async", completion_tokens=120)
    record = run(call_settle_async(hold=hold, outcome=outcome, rates=price))
    stored = UsageRecord.objects.get(request_id="chatcmpl-async")
    assert (record.pk, record.charged_nano) == (stored.pk, stored.charged_nano)
    assert stored.charged_nano == 50 * 2_500 - 10 * 1_250 + 120 * 10_000
    customer = _customer(funded_org)
    assert customer.held_nano == 0
    assert customer.balance_nano == parse_usd("10.00") - stored.charged_nano
    revenue = revenue_account(funded_org.pk)
    revenue.refresh_from_db()
    assert revenue.balance_nano == stored.charged_nano
    assert Transfer.objects.get(pk=stored.transfer_id).amount_nano == stored.charged_nano
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at is not None

    # Settled again (a retry): the first record comes back and nothing moves.
    again = run(call_settle_async(hold=hold, outcome=outcome, rates=price))
    assert again.pk == record.pk
    assert _customer(funded_org).balance_nano == customer.balance_nano
    assert UsageRecord.objects.count() == 1


def test_a_short_balance_takes_the_careful_path_in_a_thread(funded_org, api_key, price):
    account = _customer(funded_org)
    Account.objects.filter(pk=account.pk).update(held_nano=account.balance_nano - 1_000_000)
    key = _unbudgeted(api_key)
    _hold_row, max_tokens = run(_hold(funded_org, key, price, "chatcmpl-capped", max_tokens=None))
    assert max_tokens == 87  # what $0.001 affords after the prompt
    with pytest.raises(CallNotAffordable) as refused:
        run(_hold(funded_org, key, price, "chatcmpl-refused"))
    assert refused.value.affordable_tokens == 0
    assert not Hold.objects.filter(request_id="chatcmpl-refused").exists()


def test_a_budgeted_key_is_held_within_its_budget(funded_org, api_key, price):
    key = KeyBudget(key_id=api_key.pk, budget_nano=parse_usd("0.001"), period="total")
    _hold_row, max_tokens = run(_hold(funded_org, key, price, "chatcmpl-budget", max_tokens=None))
    assert max_tokens == 87  # the key's $0.001, not the organization's $10
    assert Hold.objects.get(request_id="chatcmpl-budget").api_key_id == api_key.pk


def test_a_cost_beyond_the_hold_is_settled_by_the_ledger_services(funded_org, api_key, price):
    hold, _max = run(_hold(funded_org, _unbudgeted(api_key), price, "chatcmpl-more"))
    outcome = call_outcome(funded_org, api_key, price, "chatcmpl-more", completion_tokens=180)
    outcome = replace(outcome, prompt_tokens=5_000)  # far more than the 50 held for
    record = run(call_settle_async(hold=hold, outcome=outcome, rates=price))
    assert record.charged_nano == record.cost_nano > hold.amount_nano
    assert _customer(funded_org).balance_nano == parse_usd("10.00") - record.charged_nano


def test_database_errors_are_djangos(funded_org, api_key, price):
    with pytest.raises(ProgrammingError):
        run(asyncdb.fetch_one("SELECT * FROM no_such_table", {}))
    run(_hold(funded_org, _unbudgeted(api_key), price, "chatcmpl-twice"))
    with pytest.raises(IntegrityError):  # one hold per call id
        run(_hold(funded_org, _unbudgeted(api_key), price, "chatcmpl-twice"))
    assert Hold.objects.filter(request_id="chatcmpl-twice").count() == 1


def test_a_connection_that_died_idle_is_replaced_not_failed(monkeypatch):
    """A database restart kills the pool's idle connections: the first statement after
    it must not fail."""
    monkeypatch.setattr(asyncdb, "_CHECK_AFTER_IDLE_SECONDS", 0.0)

    async def across_a_restart() -> tuple:
        await asyncdb.fetch_one("SELECT 1", {})
        await asyncio.to_thread(_terminate_async_connections)
        return await asyncdb.fetch_one("SELECT 2", {})

    assert run(across_a_restart()) == (2,)


def _terminate_async_connections() -> None:
    params = connection.get_connection_params()
    where = {name: params.get(name) for name in ("dbname", "user", "host", "port")}
    with psycopg.connect(**where, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'real200 async' AND datname = current_database()"
        ).fetchall()
    assert killed


def test_key_use_is_written_at_most_once_a_minute(funded_org, api_key, price):
    key_use_forget()
    for request_id in ("chatcmpl-use-1", "chatcmpl-use-2"):
        hold, _max = run(_hold(funded_org, _unbudgeted(api_key), price, request_id))
        outcome = call_outcome(funded_org, api_key, price, request_id)
        run(call_settle_async(hold=hold, outcome=outcome, rates=price))
        if request_id == "chatcmpl-use-1":
            first = ApiKey.objects.get(pk=api_key.pk).last_used_at
            ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=None)
    assert first is not None
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at is None  # not written again


def test_a_statement_runs_in_a_thread_while_every_async_connection_is_taken(settings):
    """A burst of calls on a busy loop can take every connection of the loop's pool: a
    statement then runs on Django's pool in a worker thread rather than queue."""
    settings.DB_ASYNC_POOL_MIN = settings.DB_ASYNC_POOL_MAX = 1
    who = "SELECT current_setting('application_name')"

    async def with_the_pool_taken() -> tuple[tuple, tuple]:
        pool = await asyncdb._loop_pool()
        await pool.wait(timeout=5)  # its connection is open
        free = await asyncdb.fetch_one(who, {})
        async with pool.connection():  # its only connection
            taken = await asyncio.wait_for(asyncdb.fetch_one(who, {}), timeout=5)
        return free, taken

    free, taken = run(with_the_pool_taken())
    assert free == ("real200 async",)
    assert taken != ("real200 async",)


@pytest.mark.parametrize(("options", "threshold"), [({}, 5), ({"prepare_threshold": None}, None)])
def test_statements_are_prepared_unless_the_database_options_say_not(
    monkeypatch, options, threshold
):
    """Prepared by default (a quarter of PostgreSQL's CPU per call); an operator behind a
    pooler that cannot keep them sets OPTIONS prepare_threshold=None, and it holds here."""
    for name, value in options.items():
        monkeypatch.setitem(connections["default"].settings_dict["OPTIONS"], name, value)

    async def a_connections_threshold() -> int | None:
        pool = await asyncdb._loop_pool()
        async with pool.connection() as conn:
            return conn.prepare_threshold

    assert run(a_connections_threshold()) == threshold
