"""Operators' balance adjustments: one ledger transfer, with the staff user and the reason."""

from __future__ import annotations

import pytest
from django.core.management.base import CommandError

from apps.billing.adjustments import AdjustmentError, balance_adjust
from apps.billing.models import AccountKind, Transfer, TransferKind
from apps.billing.money import parse_usd
from apps.billing.selectors import available_nano_for_organization, books_check
from apps.billing.services import InsufficientFunds, account_for_organization, system_account
from apps.tenancy.models import User
from tests.billing.holds import hold_of

FIVE = parse_usd("5.00")


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user(email="ops@example.com", password="pw-ops-12345", is_staff=True)


def _assert_books_clean() -> None:
    report = books_check()
    assert report.is_clean, report.problems


def _adjust(org, staff, **changes) -> Transfer:
    arguments = {
        "organization": org,
        "amount_nano": FIVE,
        "direction": "in",
        "kind": "credit",
        "reason": "goodwill after the outage of 3 May",
        "staff_user": staff,
        **changes,
    }
    return balance_adjust(**arguments)


@pytest.mark.parametrize(
    ("kind", "direction", "transfer_kind", "system_kind", "balance_usd"),
    [
        ("credit", "in", TransferKind.GRANT, AccountKind.PROMOTIONS, "15.00"),
        ("refund", "in", TransferKind.REFUND, AccountKind.ADJUSTMENTS, "15.00"),
        ("correction", "in", TransferKind.CORRECTION, AccountKind.ADJUSTMENTS, "15.00"),
        ("credit", "out", TransferKind.GRANT, AccountKind.PROMOTIONS, "5.00"),
        ("refund", "out", TransferKind.REFUND, AccountKind.ADJUSTMENTS, "5.00"),
        ("correction", "out", TransferKind.CORRECTION, AccountKind.ADJUSTMENTS, "5.00"),
    ],
)
def test_an_adjustment_is_one_transfer_recording_the_staff_user_and_the_reason(
    funded_org, staff, kind, direction, transfer_kind, system_kind, balance_usd
):
    before = Transfer.objects.count()
    transfer = _adjust(funded_org, staff, kind=kind, direction=direction, reason="  why  ")
    assert Transfer.objects.count() == before + 1
    assert (transfer.kind, transfer.amount_nano) == (transfer_kind, FIVE)
    assert (transfer.created_by, transfer.memo) == (staff, "why")
    customer = account_for_organization(organization=funded_org)
    other = system_account(system_kind)
    sides = (other, customer) if direction == "in" else (customer, other)
    assert (transfer.from_account, transfer.to_account) == sides
    assert available_nano_for_organization(organization=funded_org) == parse_usd(balance_usd)
    _assert_books_clean()


def test_a_debit_may_not_take_the_customer_below_zero(funded_org, staff):
    before = Transfer.objects.count()
    with pytest.raises(InsufficientFunds) as refused:
        _adjust(funded_org, staff, direction="out", amount_nano=parse_usd("10.01"))
    assert refused.value.available_nano == parse_usd("10.00")
    assert Transfer.objects.count() == before
    _assert_books_clean()


def test_a_debit_may_not_take_money_held_for_calls_in_flight(funded_org, staff):
    account = account_for_organization(organization=funded_org)
    hold_of(account, parse_usd("8.00"), "r1")
    with pytest.raises(InsufficientFunds):
        _adjust(funded_org, staff, direction="out", amount_nano=parse_usd("2.01"))
    _adjust(funded_org, staff, direction="out", amount_nano=parse_usd("2.00"))
    assert available_nano_for_organization(organization=funded_org) == 0
    _assert_books_clean()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reason": "   "}, "reason is required"),
        ({"reason": "x" * 501}, "longer than 500"),
        ({"amount_nano": 0}, "more than zero"),
        ({"direction": "sideways"}, "in or out"),
        ({"kind": "gift"}, "credit, refund or correction"),
    ],
)
def test_an_adjustment_refuses_bad_input_and_writes_nothing(org, staff, changes, message):
    with pytest.raises(AdjustmentError, match=message):
        _adjust(org, staff, **changes)
    assert Transfer.objects.count() == 0


@pytest.mark.parametrize("flags", [{"is_staff": False}, {"is_active": False}])
def test_only_active_staff_may_adjust(org, flags):
    user = User.objects.create_user(
        email="x@example.com", password="pw-x-12345", **{"is_staff": True, **flags}
    )
    with pytest.raises(AdjustmentError, match="only active staff"):
        _adjust(org, user)
    assert Transfer.objects.count() == 0


def test_the_same_idempotency_key_posts_once(org, staff):
    first = _adjust(org, staff, idempotency_key="adjust:abc")
    again = _adjust(org, staff, idempotency_key="adjust:abc")
    assert first.pk == again.pk
    assert available_nano_for_organization(organization=org) == FIVE
    _assert_books_clean()


# --- the CLI --------------------------------------------------------------------------


def _cli(run_command, **options) -> list[str]:
    arguments = {
        "org": "acme",
        "amount": "5.00",
        "kind": "refund",
        "direction": "in",
        "reason": "double charge on 3 May",
        "staff": "ops@example.com",
        **options,
    }
    flat = [item for name, value in arguments.items() for item in (f"--{name}", value)]
    return run_command("adjust", *flat)


def test_adjust_posts_the_transfer_and_prints_the_new_balance_last(run_command, funded_org, staff):
    lines = _cli(run_command, staff="OPS@example.com")
    assert lines[-1] == "balance 15.000000000 USD"
    transfer = Transfer.objects.latest("pk")
    assert (transfer.kind, transfer.created_by, transfer.memo) == (
        TransferKind.REFUND,
        staff,
        "double charge on 3 May",
    )
    lines = _cli(run_command, direction="out", kind="correction", amount="15")
    assert lines[-1] == "balance 0.000000000 USD"
    _assert_books_clean()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"org": "nope"}, "no organization"),
        ({"amount": "0"}, "--amount"),
        ({"amount": "1.5e3x"}, "not an amount"),
        ({"kind": "gift"}, "invalid choice"),
        ({"direction": "up"}, "invalid choice"),
        ({"reason": " "}, "reason is required"),
        ({"staff": "nobody@example.com"}, "no user"),
        ({"staff": "owner@example.com"}, "only active staff"),
        ({"direction": "out", "amount": "10.01"}, "affords 10.000000000 USD"),
    ],
)
def test_adjust_refuses_bad_input_and_writes_nothing(
    run_command, funded_org, staff, options, message
):
    before = Transfer.objects.count()
    with pytest.raises(CommandError, match=message):
        _cli(run_command, **options)
    assert Transfer.objects.count() == before
    _assert_books_clean()
