"""The operators' admin: the books read-only, money moved only through the services."""

from __future__ import annotations

import re

import pytest
from django.contrib import admin
from django.test import Client, RequestFactory
from django.urls import reverse

from apps.billing.models import (
    Account,
    Hold,
    ReconciliationReport,
    RedemptionCode,
    StripeCheckout,
    Transfer,
    TransferKind,
)
from apps.billing.money import parse_usd
from apps.billing.selectors import available_nano_for_organization, books_check
from apps.billing.services import account_for_organization
from apps.billing.topups import code_hash
from apps.catalog.models import Channel, Price
from apps.catalog.services import channel_add
from apps.keys.models import ApiKey
from apps.tenancy.models import Organization, User
from apps.usage.models import UsageRecord, UsageRollup
from tests.billing.holds import hold_of

CODE = re.compile(r"R200(?:-[2-9A-HJ-NP-Z]{4}){4}")


@pytest.fixture(autouse=True)
def _static_without_collectstatic(settings) -> None:
    """Admin pages link their CSS; the tests run without `collectstatic`'s manifest."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def operator(db) -> User:
    return User.objects.create_superuser(email="ops@example.com", password="pw-ops-12345")


@pytest.fixture
def ops(client, operator) -> Client:
    client.force_login(operator)
    return client


def _assert_books_clean() -> None:
    report = books_check()
    assert report.is_clean, report.problems


def _admin_url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


# --- the books are read-only ----------------------------------------------------------


READ_ONLY = [
    Transfer,
    Hold,
    Account,
    ReconciliationReport,
    StripeCheckout,
    UsageRecord,
    UsageRollup,
]


@pytest.mark.parametrize("model", READ_ONLY)
def test_the_books_have_no_add_change_or_delete_in_the_admin(operator, model):
    request = RequestFactory().get("/admin/")
    request.user = operator
    model_admin = admin.site._registry[model]
    assert model_admin.has_view_permission(request)
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request)
    assert not model_admin.has_delete_permission(request)
    assert "delete_selected" not in model_admin.get_actions(request)


def test_the_ledger_refuses_every_write_through_the_admin(ops, funded_org):
    transfer = Transfer.objects.get()
    assert ops.get(_admin_url(Transfer, "changelist")).status_code == 200
    page = ops.get(_admin_url(Transfer, "change", transfer.pk))
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert ops.get(_admin_url(Transfer, "add")).status_code == 403
    for view in ("change", "delete"):
        response = ops.post(
            _admin_url(Transfer, view, transfer.pk), {"amount_nano": 1, "post": "yes"}
        )
        assert response.status_code == 403
    response = ops.post(
        _admin_url(Transfer, "changelist"),
        {"action": "delete_selected", "_selected_action": [transfer.pk], "post": "yes"},
    )
    assert Transfer.objects.get().amount_nano == parse_usd("10.00")
    assert response.status_code in (200, 302)
    _assert_books_clean()


def test_every_admin_list_renders(ops, funded_org, api_key, price):
    hold_of(account_for_organization(organization=funded_org), 5, "r1")
    for model in admin.site._registry:
        response = ops.get(_admin_url(model, "changelist"))
        assert response.status_code == 200, model


# --- organizations, their balance and "Adjust balance" --------------------------------


def test_the_organization_list_shows_the_available_balance(ops, funded_org):
    response = ops.get(_admin_url(Organization, "changelist"))
    assert "10.000000000" in response.content.decode()


def _adjust_url(org) -> str:
    return reverse("admin:tenancy_organization_adjust", args=[org.pk])


def _token(response) -> str:
    return re.search(r'name="token" value="([0-9a-f-]{36})"', response.content.decode())[1]


def test_adjusting_a_balance_writes_one_transfer_with_the_staff_user_and_the_reason(
    ops, operator, funded_org
):
    form = ops.get(_adjust_url(funded_org))
    assert form.status_code == 200
    data = {
        "direction": "in",
        "kind": "refund",
        "amount": "2.50",
        "reason": "calls failed upstream on 3 May",
        "token": _token(form),
    }
    before = Transfer.objects.count()
    response = ops.post(_adjust_url(funded_org), data)
    assert response.status_code == 302
    ops.post(_adjust_url(funded_org), data)  # the same form submitted twice posts once
    assert Transfer.objects.count() == before + 1
    transfer = Transfer.objects.latest("pk")
    assert (transfer.kind, transfer.amount_nano) == (TransferKind.REFUND, parse_usd("2.50"))
    assert (transfer.created_by, transfer.memo) == (operator, "calls failed upstream on 3 May")
    assert available_nano_for_organization(organization=funded_org) == parse_usd("12.50")
    _assert_books_clean()


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"direction": "out", "amount": "10.01"}, "affords 10.000000000 USD"),
        ({"reason": ""}, "This field is required"),
        ({"amount": "0"}, "more than zero"),
        ({"amount": "2,50"}, "not an amount"),
        ({"amount": "0.0000000001"}, "finer than one nano-dollar"),
        ({"kind": "gift"}, "Select a valid choice"),
    ],
)
def test_a_bad_adjustment_is_a_form_error_and_writes_nothing(ops, funded_org, changes, error):
    data = {
        "direction": "in",
        "kind": "correction",
        "amount": "1.00",
        "reason": "typo",
        "token": _token(ops.get(_adjust_url(funded_org))),
        **changes,
    }
    before = Transfer.objects.count()
    response = ops.post(_adjust_url(funded_org), data)
    assert response.status_code == 200
    assert error in response.content.decode()
    assert Transfer.objects.count() == before
    _assert_books_clean()


def test_staff_without_the_ledger_permission_may_not_adjust(client, funded_org):
    clerk = User.objects.create_user(
        email="clerk@example.com", password="pw-c-12345", is_staff=True
    )
    client.force_login(clerk)
    data = {"direction": "in", "kind": "credit", "amount": "1", "reason": "r", "token": "0" * 32}
    assert client.get(_adjust_url(funded_org)).status_code == 403
    assert client.post(_adjust_url(funded_org), data).status_code == 403
    assert Transfer.objects.count() == 1


def test_the_adjust_action_opens_the_form_for_one_organization(ops, funded_org):
    response = ops.post(
        _admin_url(Organization, "changelist"),
        {"action": "adjust_balance", "_selected_action": [funded_org.pk]},
    )
    assert response.status_code == 302
    assert response["Location"] == _adjust_url(funded_org)


# --- channels, prices, codes, keys ----------------------------------------------------


def test_a_channels_provider_key_is_never_displayed_and_is_write_only(ops, db):
    channel = channel_add(
        name="up",
        kind="openai",
        base_url="https://api.example.com/v1",
        api_key="sk-provider-SECRET-1234",
        models={"gpt-4o": "gpt-4o"},
    )
    for url in (_admin_url(Channel, "changelist"), _admin_url(Channel, "change", channel.pk)):
        page = ops.get(url).content.decode()
        assert "SECRET" not in page
        assert "1234" not in page
    data = {
        "name": "up",
        "kind": "openai",
        "base_url": "https://api.example.com/v1",
        "new_api_key": "",
        "priority": "5",
        "weight": "1",
        "is_enabled": "on",
        "timeout_seconds": "60",
        "settings": "{}",
        "model_links-TOTAL_FORMS": "0",
        "model_links-INITIAL_FORMS": "0",
    }
    assert ops.post(_admin_url(Channel, "change", channel.pk), data).status_code == 302
    channel.refresh_from_db()
    assert (channel.priority, channel.api_key) == (5, "sk-provider-SECRET-1234")
    data["new_api_key"] = "sk-provider-NEW"
    assert ops.post(_admin_url(Channel, "change", channel.pk), data).status_code == 302
    channel.refresh_from_db()
    assert channel.api_key == "sk-provider-NEW"


def test_prices_are_added_in_usd_and_never_changed(ops, price):
    data = {"model": price.model_id, "input_usd": "3.00", "output_usd": "12.00"}
    assert ops.post(_admin_url(Price, "add"), data).status_code == 302
    new = Price.objects.latest("pk")
    assert new.pk != price.pk
    assert (new.input_nano_per_mtok, new.output_nano_per_mtok) == (3 * 10**9, 12 * 10**9)
    assert new.cached_input_nano_per_mtok == new.cache_write_nano_per_mtok == 3 * 10**9
    given = ops.post(_admin_url(Price, "add"), {**data, "cache_write_usd": "3.75"})
    assert given.status_code == 302
    assert Price.objects.latest("pk").cache_write_nano_per_mtok == 3_750_000_000
    assert "3.750000000" in ops.get(_admin_url(Price, "changelist")).content.decode()
    bad = ops.post(_admin_url(Price, "add"), {**data, "input_usd": "3.0000000001"})
    assert b"finer than one nano-dollar" in bad.content
    shown = ops.get(_admin_url(Price, "change", price.pk))
    assert shown.status_code == 200  # read only: every rate, none in an input
    assert "1.250000000" in shown.content.decode()  # the cached-input rate
    assert b'name="input_usd"' not in shown.content
    change = ops.post(_admin_url(Price, "change", price.pk), {**data, "input_usd": "0"})
    assert change.status_code == 403
    assert ops.post(_admin_url(Price, "delete", price.pk), {"post": "yes"}).status_code == 403
    price.refresh_from_db()
    assert price.input_nano_per_mtok == parse_usd("2.50")
    assert Price.objects.count() == 3


def test_minting_codes_in_the_admin_shows_them_once(ops, operator):
    assert ops.get(_admin_url(RedemptionCode, "add")).status_code == 200
    response = ops.post(
        _admin_url(RedemptionCode, "add"),
        {"amount": "10.00", "count": "3", "batch": "expo", "expires_in_days": "30"},
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    codes = set(CODE.findall(response.content.decode()))
    assert len(codes) == 3
    rows = RedemptionCode.objects.filter(batch="expo")
    assert {row.code_hash for row in rows} == {code_hash(code) for code in codes}
    assert all(row.created_by == operator and row.amount_nano == 10**10 for row in rows)
    listing = ops.get(_admin_url(RedemptionCode, "changelist")).content.decode()
    assert not CODE.search(listing)
    assert "expo" in listing
    row = rows.first()
    detail = ops.get(_admin_url(RedemptionCode, "change", row.pk)).content.decode()
    assert row.code_hash not in detail
    assert not CODE.search(detail)
    assert ops.post(_admin_url(RedemptionCode, "change", row.pk), {}).status_code == 403
    assert Transfer.objects.count() == 0


def test_a_bad_mint_is_a_form_error(ops):
    response = ops.post(_admin_url(RedemptionCode, "add"), {"amount": "0", "count": "3"})
    assert response.status_code == 200
    assert b"more than zero" in response.content
    assert RedemptionCode.objects.count() == 0


def test_a_keys_hash_is_never_shown_and_the_revoke_action_revokes(ops, api_key):
    for url in (_admin_url(ApiKey, "changelist"), _admin_url(ApiKey, "change", api_key.pk)):
        page = ops.get(url).content.decode()
        assert api_key.key_hash not in page
    response = ops.post(
        _admin_url(ApiKey, "changelist"),
        {"action": "revoke", "_selected_action": [api_key.pk]},
    )
    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.is_revoked
    assert ops.get(_admin_url(ApiKey, "add")).status_code == 403


def test_an_operator_adds_a_user_by_email(ops):
    response = ops.post(
        _admin_url(User, "add"),
        {
            "email": "new@example.com",
            "usable_password": "true",
            "password1": "a-long-pass-phrase-1",
            "password2": "a-long-pass-phrase-1",
        },
    )
    assert response.status_code == 302
    assert User.objects.get(email="new@example.com").check_password("a-long-pass-phrase-1")
