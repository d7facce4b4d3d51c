"""The two ways a call is held and settled write the same books.

On PostgreSQL a call that fits its balance is held by one statement and, when it cost no
more than its hold, settled by one; everything else (and every call on SQLite) goes
through the ledger's services in a transaction. Both are run here side by side.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.billing.models import Account, Hold, HoldStatus, Transfer, TransferKind
from apps.billing.money import parse_usd
from apps.billing.selectors import books_check
from apps.billing.services import (
    REVENUE_SHARDS,
    CallNotAffordable,
    KeyBudget,
    account_id_for_organization,
    credit_grant,
    hold_place_for_call,
    revenue_account,
)
from apps.keys.services import key_create
from apps.tenancy.models import User
from apps.tenancy.services import organization_create
from apps.usage.models import UsageRecord
from apps.usage.services import (
    _settle_in_one_statement,
    _settle_in_transaction,
    call_settle,
)
from tests.billing.holds import quote_for_50_tokens
from tests.usage.test_reconcile_and_rollups import call_outcome

pytestmark = pytest.mark.postgres


def _hold(org, api_key, price, request_id: str, **quote) -> tuple[Hold, int]:
    return hold_place_for_call(
        account_id=account_id_for_organization(organization_id=org.pk),
        key=KeyBudget(key_id=api_key.pk, budget_nano=None),
        request_id=request_id,
        expires_at=timezone.now() + timedelta(minutes=5),
        quote=quote_for_50_tokens(price, **quote),
    )


def _books(org) -> tuple[int, int, int]:
    customer = Account.objects.get(organization=org)
    revenue = revenue_account(org.pk)
    revenue.refresh_from_db()
    return customer.balance_nano, customer.held_nano, revenue.balance_nano


def test_one_statement_hold_is_the_worst_case_and_a_row(funded_org, api_key, price):
    hold, max_tokens = _hold(funded_org, api_key, price, "chatcmpl-fast")
    worst = 50 * 2_500 + 200 * 10_000
    assert max_tokens == 200
    stored = Hold.objects.get(request_id="chatcmpl-fast")
    assert (hold.pk, hold.amount_nano) == (stored.pk, worst)
    assert stored.status == HoldStatus.OPEN
    assert stored.api_key_id == api_key.pk
    assert _books(funded_org)[1] == worst


def test_a_short_balance_takes_the_careful_path_and_is_capped(funded_org, api_key, price):
    account = Account.objects.get(organization=funded_org)
    Account.objects.filter(pk=account.pk).update(held_nano=account.balance_nano - 1_000_000)
    _unused, max_tokens = _hold(funded_org, api_key, price, "chatcmpl-capped", max_tokens=None)
    # $0.001 left: 50 prompt tokens ($0.000125) and 87 output tokens ($0.00087).
    assert max_tokens == 87
    with pytest.raises(CallNotAffordable) as refused:
        _hold(funded_org, api_key, price, "chatcmpl-refused")
    assert refused.value.affordable_tokens == 0


def test_both_settlements_write_the_same_books(funded_org, api_key, price):
    fields = {}
    for request_id, settle in (
        ("chatcmpl-statement", _settle_in_one_statement),
        ("chatcmpl-transaction", _settle_in_transaction),
    ):
        hold, _max = _hold(funded_org, api_key, price, request_id)
        before = _books(funded_org)
        outcome = call_outcome(
            funded_org, api_key, price, request_id, completion_tokens=120, cache_write_tokens=20
        )
        record = settle(hold=hold, outcome=outcome, cost_nano=1_237_500)
        after = _books(funded_org)
        stored = UsageRecord.objects.get(request_id=request_id)
        transfer = Transfer.objects.get(pk=stored.transfer_id)
        assert record.pk == stored.pk
        assert record.cache_write_tokens == stored.cache_write_tokens == 20
        assert record.charged_nano == stored.charged_nano == 1_237_500
        assert (transfer.kind, transfer.amount_nano, transfer.api_key_id) == (
            TransferKind.CHARGE,
            1_237_500,
            api_key.pk,
        )
        assert Hold.objects.get(pk=hold.pk).status == HoldStatus.SETTLED
        fields[request_id] = (
            before[0] - after[0],  # balance debited
            before[1] - after[1],  # hold released
            after[2] - before[2],  # revenue credited
            transfer.memo.split()[0],
        )
        assert settle(hold=hold, outcome=outcome, cost_nano=1_237_500) is None  # once only
    assert fields["chatcmpl-statement"] == fields["chatcmpl-transaction"]


def test_a_free_call_settles_in_one_statement_without_a_transfer(funded_org, api_key, price):
    hold, _max = _hold(funded_org, api_key, price, "chatcmpl-free")
    outcome = call_outcome(funded_org, api_key, price, "chatcmpl-free", completion_tokens=0)
    record = _settle_in_one_statement(hold=hold, outcome=outcome, cost_nano=0)
    assert record.transfer_id is None
    assert record.charged_nano == 0
    assert _books(funded_org)[1] == 0
    assert not Transfer.objects.filter(kind=TransferKind.CHARGE).exists()


def test_a_cost_beyond_the_hold_is_settled_by_the_ledger_services(funded_org, api_key, price):
    """An upstream that counted more than our estimate: the cost is more than the hold,
    so the careful path charges it (capped at the balance)."""
    hold, _max = _hold(funded_org, api_key, price, "chatcmpl-more")
    outcome = call_outcome(funded_org, api_key, price, "chatcmpl-more", completion_tokens=180)
    outcome = replace(outcome, prompt_tokens=5_000)  # far more than the 50 we held for
    record = call_settle(hold=hold, outcome=outcome, rates=price)
    assert record.cost_nano > hold.amount_nano
    assert record.charged_nano == record.cost_nano
    assert Hold.objects.get(pk=hold.pk).status == HoldStatus.SETTLED


@pytest.mark.django_db(transaction=True)
def test_concurrent_charges_of_many_organizations_land_on_their_revenue_accounts(price):
    """Each organization's charges go to its own revenue shard, from both settlement
    paths at once, without a deadlock; the shards add up to every charge."""
    owner = User.objects.create_user(email="shards@example.com", password="x-long-password")
    orgs = [organization_create(slug=f"shard{n}", name=f"S{n}", owner=owner) for n in range(4)]
    keys = {}
    for org in orgs:
        credit_grant(organization=org, amount_nano=parse_usd("10"))
        keys[org.pk], _clear = key_create(organization=org, name="k")
    assert len({org.pk % REVENUE_SHARDS for org in orgs}) == 4
    calls = [(org, n) for org in orgs for n in range(12)]

    def call(job) -> int:
        org, n = job
        settle = _settle_in_one_statement if n % 2 else _settle_in_transaction
        request_id = f"chatcmpl-{org.slug}-{n}"
        try:
            hold, _max = _hold(org, keys[org.pk], price, request_id)
            outcome = call_outcome(org, keys[org.pk], price, request_id, completion_tokens=n)
            cost = 50 * 2_500 - 10 * 1_250 + n * 10_000
            return settle(hold=hold, outcome=outcome, cost_nano=cost).charged_nano
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=16) as pool:
        charged = list(pool.map(call, calls))
    for org in orgs:
        expected = sum(c for (o, _n), c in zip(calls, charged, strict=True) if o == org)
        revenue = revenue_account(org.pk)
        revenue.refresh_from_db()
        assert revenue.balance_nano == expected
        assert Account.objects.get(organization=org).held_nano == 0
    revenue_total = sum(
        Account.objects.filter(kind="revenue").values_list("balance_nano", flat=True)
    )
    assert revenue_total == sum(charged)
    report = books_check()
    assert report.is_clean, report.problems
