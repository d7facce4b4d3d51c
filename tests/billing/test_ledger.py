"""The ledger invariants, tried the way they could break."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction

from apps.billing.models import Account, AccountKind, Hold, Transfer, TransferKind
from apps.billing.selectors import books_check
from apps.billing.services import (
    InsufficientFunds,
    account_for_organization,
    credit_grant,
    hold_release,
    hold_settle,
    revenue_account,
    system_account,
    transfer_post,
    transfer_post_once,
)
from apps.tenancy.models import Organization
from tests.billing.holds import hold_of


def _balance(account: Account) -> int:
    return Account.objects.get(pk=account.pk).balance_nano


def test_a_credit_moves_money_and_the_books_sum_to_zero(org):
    credit_grant(organization=org, amount_nano=5_000)
    account = account_for_organization(organization=org)
    account.refresh_from_db()
    assert account.balance_nano == 5_000
    assert _balance(system_account(AccountKind.PROMOTIONS)) == -5_000
    report = books_check()
    assert report.is_clean, report.problems
    assert report.total_nano == 0


def test_a_debit_that_would_take_a_customer_below_zero_is_refused_and_writes_nothing(funded_org):
    customer = account_for_organization(organization=funded_org)
    transfers_before = Transfer.objects.count()
    with pytest.raises(InsufficientFunds):
        transfer_post(
            from_account=customer,
            to_account=system_account(AccountKind.ADJUSTMENTS),
            amount_nano=customer.balance_nano + 1,
            kind=TransferKind.CORRECTION,
        )
    assert Transfer.objects.count() == transfers_before
    customer.refresh_from_db()
    assert customer.balance_nano == 10 * 10**9
    assert books_check().is_clean


@pytest.mark.parametrize("amount", [0, -1])
def test_a_transfer_moves_a_positive_amount(org, amount):
    with pytest.raises(ValueError, match="positive"):
        credit_grant(organization=org, amount_nano=amount)


def test_a_transfer_moves_money_between_two_different_accounts(org):
    account = account_for_organization(organization=org)
    with pytest.raises(ValueError, match="two different"):
        transfer_post(
            from_account=account, to_account=account, amount_nano=1, kind=TransferKind.GRANT
        )


def test_the_database_refuses_a_transfer_that_breaks_an_invariant_even_past_the_service(org):
    account = account_for_organization(organization=org)
    promotions = system_account(AccountKind.PROMOTIONS)
    for bad in (
        {"from_account": promotions, "to_account": account, "amount_nano": 0},
        {"from_account": account, "to_account": account, "amount_nano": 5},
    ):
        with pytest.raises(IntegrityError), transaction.atomic():
            Transfer.objects.bulk_create([Transfer(kind=TransferKind.GRANT, **bad)])


def test_a_customer_balance_cannot_be_set_below_its_holds_by_any_query(funded_org):
    account = account_for_organization(organization=funded_org)
    with pytest.raises(IntegrityError), transaction.atomic():
        Account.objects.filter(pk=account.pk).update(balance_nano=-1)


def test_transfers_are_immutable_in_the_model_and_in_the_database(funded_org):
    transfer = Transfer.objects.get()
    with pytest.raises(ValueError, match="never edited"):
        transfer.save()
    with pytest.raises(ValueError, match="never deleted"):
        transfer.delete()
    with pytest.raises(DatabaseError), transaction.atomic():
        Transfer.objects.filter(pk=transfer.pk).update(amount_nano=1)
    with pytest.raises(DatabaseError), transaction.atomic():
        Transfer.objects.filter(pk=transfer.pk).delete()
    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM billing_transfer")
    assert Transfer.objects.get().amount_nano == transfer.amount_nano


def test_an_event_delivered_twice_moves_money_once(org):
    fields = {
        "from_account": system_account(AccountKind.TOPUP_CLEARING),
        "to_account": account_for_organization(organization=org),
        "amount_nano": 700,
        "kind": TransferKind.TOPUP,
    }
    first, created = transfer_post_once(idempotency_key="stripe:evt_1", **fields)
    again, created_again = transfer_post_once(idempotency_key="stripe:evt_1", **fields)
    assert (created, created_again) == (True, False)
    assert first.pk == again.pk
    assert _balance(account_for_organization(organization=org)) == 700


def test_a_hold_reserves_spendable_money_and_refuses_what_is_not_there(funded_org):
    account = account_for_organization(organization=funded_org)
    hold = hold_of(account, 6 * 10**9, "r1")
    with pytest.raises(InsufficientFunds) as refused:
        hold_of(account, 5 * 10**9, "r2")
    assert refused.value.available_nano == 4 * 10**9
    account.refresh_from_db()
    assert (account.balance_nano, account.held_nano) == (10 * 10**9, 6 * 10**9)
    assert hold_release(hold=hold) is True
    assert hold_release(hold=hold) is False  # a second release changes nothing
    account.refresh_from_db()
    assert account.held_nano == 0
    assert books_check().is_clean


def test_settling_a_hold_charges_the_metered_cost_once(funded_org):
    account = account_for_organization(organization=funded_org)
    hold = hold_of(account, 1_000, "r1")
    settled, transfer, charged = hold_settle(hold=hold, cost_nano=400)
    assert (settled, charged, transfer.amount_nano) == (True, 400, 400)
    assert hold_settle(hold=hold, cost_nano=400) == (False, None, 0)
    account.refresh_from_db()
    assert (account.balance_nano, account.held_nano) == (10 * 10**9 - 400, 0)
    assert _balance(revenue_account(funded_org.pk)) == 400
    assert books_check().is_clean


def test_a_cost_beyond_the_balance_is_charged_only_up_to_zero(org):
    credit_grant(organization=org, amount_nano=1_000)
    account = account_for_organization(organization=org)
    hold = hold_of(account, 900, "r1")
    settled, _transfer, charged = hold_settle(hold=hold, cost_nano=5_000)
    assert (settled, charged) == (True, 1_000)
    account.refresh_from_db()
    assert (account.balance_nano, account.held_nano) == (0, 0)
    assert books_check().is_clean


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_credits_from_many_threads_sum_exactly():
    from apps.tenancy.models import User
    from apps.tenancy.services import organization_create

    owner = User.objects.create_user(email="c@example.com", password="x-long-password")
    org = organization_create(slug="concurrent", name="C", owner=owner)
    amounts = [1 + (i * 7919) % 100_003 for i in range(200)]

    def credit(amount: int) -> None:
        try:
            credit_grant(organization=org, amount_nano=amount)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(credit, amounts))
    assert account_for_organization(organization=org).balance_nano == sum(amounts)
    assert Transfer.objects.count() == len(amounts)
    report = books_check()
    assert report.is_clean, report.problems


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_holds_never_reserve_more_than_the_balance():
    from apps.tenancy.models import User
    from apps.tenancy.services import organization_create

    owner = User.objects.create_user(email="h@example.com", password="x-long-password")
    org = organization_create(slug="holds", name="H", owner=owner)
    credit_grant(organization=org, amount_nano=10_000)
    account = account_for_organization(organization=org)

    def try_hold(i: int) -> bool:
        try:
            hold = hold_of(account, 1_000, f"c{i}")
            hold_settle(hold=hold, cost_nano=1_000)
            return True
        except InsufficientFunds:
            return False
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(try_hold, range(50)))
    assert results.count(True) == 10
    account.refresh_from_db()
    assert (account.balance_nano, account.held_nano) == (0, 0)
    assert Hold.objects.filter(status="settled").count() == 10
    assert books_check().is_clean


def test_only_customer_accounts_belong_to_an_organization(org):
    with pytest.raises(IntegrityError), transaction.atomic():
        Account.objects.create(kind=AccountKind.REVENUE, organization=org)
    other = Organization.objects.create(slug="x", name="x")
    with pytest.raises(IntegrityError), transaction.atomic():
        Account.objects.create(kind=AccountKind.CUSTOMER, organization=None)
    assert account_for_organization(organization=other).kind == AccountKind.CUSTOMER
