"""Keys in the dashboard: the list with this month's spend, create (the key shown once),
edit the policy, revoke; and the models and quick-start pages. Each role allowed and
refused as it should be."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from apps.billing.money import parse_usd
from apps.catalog.services import price_set
from apps.keys.models import ApiKey, hash_key
from apps.keys.selectors import grants_forget, key_authenticate
from apps.keys.services import key_create, key_revoke
from apps.usage.models import EndReason, UsageRecord, UsageSource
from tests.dashboard.people import ROLES, make_callable, user_with_role

pytestmark = pytest.mark.django_db

KEY_EDITORS = {"owner", "admin", "developer"}


def _url(name: str, **kwargs) -> str:
    return reverse(name, kwargs={"org_slug": "acme", **kwargs})


def _charge(key: ApiKey, price, charged_nano: int, *, when=None) -> None:
    record = UsageRecord.objects.create(
        request_id=f"chatcmpl-{UsageRecord.objects.count()}-{key.pk}",
        organization=key.organization,
        api_key=key,
        model="gpt-4o",
        price=price,
        cost_nano=charged_nano,
        charged_nano=charged_nano,
        usage_source=UsageSource.UPSTREAM,
        end_reason=EndReason.DONE,
        status_code=200,
    )
    if when is not None:
        UsageRecord.objects.filter(pk=record.pk).update(created_at=when)


# --- The list ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_every_member_sees_the_keys_and_only_key_editors_the_controls(client, org, api_key, role):
    client.force_login(user_with_role(org, role))
    response = client.get(_url("keys-list"))
    assert response.status_code == 200
    assert api_key.display in response.content.decode()
    editing = role in KEY_EDITORS
    assert (_url("key-create").encode() in response.content) == editing
    assert (_url("key-edit", pk=api_key.pk).encode() in response.content) == editing


def test_the_list_shows_this_months_spend_status_and_limits(client, owner, org, price):
    now = timezone.now()
    busy, _ = key_create(
        organization=org,
        name="busy",
        rpm=60,
        budget_nano=parse_usd("25"),
        budget_period="monthly",
        allowed_ips=["10.0.0.0/8"],
    )
    gone, _ = key_create(organization=org, name="gone")
    key_revoke(key=gone)
    _charge(busy, price, parse_usd("1.25"))
    _charge(busy, price, parse_usd("0.50"))
    last_month = now.replace(day=1) - timedelta(days=1)
    _charge(busy, price, parse_usd("100"), when=last_month)  # not this month
    client.force_login(owner)
    rows = {row.key.name: row for row in client.get(_url("keys-list")).context["rows"]}
    assert rows["busy"].spent_this_month_nano == parse_usd("1.75")
    assert rows["busy"].status == "active"
    assert rows["gone"].status == "revoked"
    page = client.get(_url("keys-list")).content.decode()
    assert "$1.75" in page
    assert "60 requests/min" in page
    assert "Budget $25.00 per month" in page
    assert "10.0.0.0/8" in page


def test_an_expired_key_reads_as_expired(client, owner, org):
    key_create(organization=org, name="short", expires_at=timezone.now() + timedelta(days=1))
    client.force_login(owner)
    with time_machine.travel(timezone.now() + timedelta(days=2)):
        (row,) = client.get(_url("keys-list")).context["rows"]
    assert row.status == "expired"


def test_the_list_costs_the_same_queries_for_one_key_or_twenty(
    client, owner, org, price, django_assert_max_num_queries
):
    client.force_login(owner)
    key, _ = key_create(organization=org)
    _charge(key, price, 5)
    client.get(_url("keys-list"))  # warm the session
    with CaptureQueriesContext(connection) as one:
        client.get(_url("keys-list"))
    for _ in range(19):
        more, _ = key_create(organization=org)
        _charge(more, price, 5)
    with django_assert_max_num_queries(len(one)):
        client.get(_url("keys-list"))


# --- Create: the key shown once ---------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_only_key_editors_may_create_keys(client, org, role):
    client.force_login(user_with_role(org, role))
    allowed = role in KEY_EDITORS
    assert client.get(_url("key-create")).status_code == (200 if allowed else 403)
    response = client.post(_url("key-create"), {"name": "k", "budget_period": "lifetime"})
    assert response.status_code == (200 if allowed else 403)
    assert ApiKey.objects.filter(name="k").exists() == allowed


def test_a_new_key_is_shown_once_with_examples_and_never_again(client, owner, org, price):
    make_callable("gpt-4o")
    client.force_login(owner)
    response = client.post(
        _url("key-create"),
        {
            "name": "app",
            "allowed_models": ["gpt-4o"],
            "rpm": "30",
            "tpm": "",
            "budget": "12.50",
            "budget_period": "monthly",
            "expires_in_days": "30",
            "allowed_ips": "203.0.113.7\n198.51.100.0/24",
        },
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    clear = response.context["clear_key"]
    key = ApiKey.objects.get(name="app")
    assert key.key_hash == hash_key(clear)
    assert (key.allowed_models, key.rpm, key.tpm) == (["gpt-4o"], 30, None)
    assert (key.budget_nano, key.budget_period) == (parse_usd("12.50"), "monthly")
    assert key.allowed_ips == ["203.0.113.7/32", "198.51.100.0/24"]
    assert timedelta(days=29) < key.expires_at - timezone.now() <= timedelta(days=30)
    page = response.content.decode()
    assert page.count(clear) >= 3  # the key to copy, the curl and the Python examples
    assert "http://testserver/v1/chat/completions" in page
    assert 'base_url="http://testserver/v1"' in page
    assert 'model="gpt-4o"' in page
    # Nowhere afterwards: not the session, not any page.
    assert clear not in str(dict(client.session.items()))
    for url in (_url("keys-list"), _url("key-edit", pk=key.pk), _url("key-revoke", pk=key.pk)):
        assert clear not in client.get(url).content.decode()
    assert clear[-4:] in client.get(_url("keys-list")).content.decode()


def test_a_bad_policy_is_refused_on_the_form(client, owner, org):
    client.force_login(owner)
    response = client.post(
        _url("key-create"),
        {"budget": "1e3", "budget_period": "monthly", "rpm": "0", "allowed_ips": "nonsense"},
    )
    form = response.context["form"]
    assert set(form.errors) >= {"budget", "rpm"}
    response = client.post(
        _url("key-create"), {"budget_period": "monthly", "allowed_ips": "not-an-ip"}
    )
    assert "not-an-ip" in str(response.context["form"].non_field_errors())
    assert not ApiKey.objects.exists()


def test_models_to_choose_are_the_callable_ones(client, owner, org, price):
    client.force_login(owner)
    assert client.get(_url("key-create")).context["form"].fields["allowed_models"].choices == []
    make_callable("gpt-4o")
    choices = client.get(_url("key-create")).context["form"].fields["allowed_models"].choices
    assert choices == [("gpt-4o", "gpt-4o")]
    response = client.post(
        _url("key-create"), {"allowed_models": ["dall-e"], "budget_period": "lifetime"}
    )
    assert response.context["form"].errors["allowed_models"]


# --- Edit and revoke ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_only_key_editors_may_edit_or_revoke(client, org, api_key, role):
    client.force_login(user_with_role(org, role))
    allowed = role in KEY_EDITORS
    assert client.get(_url("key-edit", pk=api_key.pk)).status_code == (200 if allowed else 403)
    response = client.post(
        _url("key-edit", pk=api_key.pk), {"name": "renamed", "budget_period": "lifetime"}
    )
    assert response.status_code == (302 if allowed else 403)
    assert client.get(_url("key-revoke", pk=api_key.pk)).status_code == (200 if allowed else 403)
    assert client.post(_url("key-revoke", pk=api_key.pk)).status_code == (302 if allowed else 403)
    api_key.refresh_from_db()
    assert (api_key.name == "renamed") == allowed
    assert api_key.is_revoked == allowed


# Committed: the gateway reads keys in its own worker threads, on their own connections.
@pytest.mark.django_db(transaction=True)
def test_editing_the_policy_takes_effect_for_the_gateway(client, owner, org, price):
    make_callable("gpt-4o")
    key, clear = key_create(organization=org, name="k", rpm=5)
    assert async_to_sync(key_authenticate)(clear).rpm == 5  # now cached
    client.force_login(owner)
    response = client.post(
        _url("key-edit", pk=key.pk),
        {
            "name": "k2",
            "allowed_models": ["gpt-4o"],
            "rpm": "50",
            "budget": "3",
            "budget_period": "lifetime",
            "allowed_ips": "10.1.2.3",
        },
    )
    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.name, key.rpm, key.allowed_models) == ("k2", 50, ["gpt-4o"])
    assert key.budget_nano == parse_usd("3")
    assert key.allowed_ips == ["10.1.2.3/32"]
    grants_forget()  # this process's one-second memo; the shared entry was dropped
    assert async_to_sync(key_authenticate)(clear).rpm == 50


def test_editing_keeps_the_expiry_unless_told(client, owner, org):
    expires_at = timezone.now() + timedelta(days=10)
    key, _ = key_create(organization=org, expires_at=expires_at)
    client.force_login(owner)
    client.post(_url("key-edit", pk=key.pk), {"name": "x", "budget_period": "lifetime"})
    key.refresh_from_db()
    assert key.expires_at == expires_at
    client.post(
        _url("key-edit", pk=key.pk),
        {"name": "x", "budget_period": "lifetime", "never_expires": "on"},
    )
    key.refresh_from_db()
    assert key.expires_at is None
    client.post(
        _url("key-edit", pk=key.pk),
        {"name": "x", "budget_period": "lifetime", "expires_in_days": "2"},
    )
    key.refresh_from_db()
    assert key.expires_at - timezone.now() <= timedelta(days=2)


def test_an_expired_key_can_be_edited_without_touching_its_expiry(client, owner, org):
    key, _ = key_create(organization=org, expires_at=timezone.now() + timedelta(days=1))
    client.force_login(owner)
    with time_machine.travel(timezone.now() + timedelta(days=3)):
        response = client.post(
            _url("key-edit", pk=key.pk), {"name": "renamed", "budget_period": "lifetime"}
        )
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.name == "renamed"


def test_a_revoked_key_cannot_be_edited(client, owner, org, api_key):
    key_revoke(key=api_key)
    client.force_login(owner)
    response = client.post(
        _url("key-edit", pk=api_key.pk), {"name": "zombie", "budget_period": "lifetime"}
    )
    assert response.status_code == 200
    assert response.context["form"].non_field_errors()
    api_key.refresh_from_db()
    assert api_key.name == "test key"


def test_revoking_asks_first_and_then_revokes(client, owner, org, api_key):
    client.force_login(owner)
    page = client.get(_url("key-revoke", pk=api_key.pk))
    assert b'method="post"' in page.content
    api_key.refresh_from_db()
    assert not api_key.is_revoked
    response = client.post(_url("key-revoke", pk=api_key.pk))
    assert response.url == _url("keys-list")
    api_key.refresh_from_db()
    assert api_key.is_revoked


# --- Models and docs ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_every_member_sees_models_with_prices_and_the_quick_start(client, org, price, role):
    make_callable("gpt-4o")
    client.force_login(user_with_role(org, role))
    page = client.get(_url("models-list")).content.decode()
    assert "gpt-4o" in page
    for shown in ("$2.50", "$1.25", "$10.00"):
        assert shown in page
    docs = client.get(_url("docs")).content.decode()
    for example in (
        "curl http://testserver/v1/chat/completions",
        "from openai import OpenAI",
        'import OpenAI from "openai"',
    ):
        assert example in docs


def test_the_models_page_shows_the_cache_write_price(client, owner, org):
    price_set(
        model_name="claude-sonnet-4",
        input_nano_per_mtok=parse_usd("3"),
        cached_input_nano_per_mtok=parse_usd("0.30"),
        cache_write_nano_per_mtok=parse_usd("3.75"),
        output_nano_per_mtok=parse_usd("15"),
    )
    make_callable("claude-sonnet-4")
    client.force_login(owner)
    page = client.get(_url("models-list")).content.decode()
    assert '<th scope="col" class="num">Cache write</th>' in page
    assert '<td class="num" data-label="Cache write">$3.75</td>' in page


def test_fine_prices_show_the_places_they_need(client, owner, org):
    price_set(
        model_name="tiny",
        input_nano_per_mtok=75_000_000,
        cached_input_nano_per_mtok=150_000,
        output_nano_per_mtok=parse_usd("0.6"),
    )
    make_callable("tiny")
    client.force_login(owner)
    page = client.get(_url("models-list")).content.decode()
    for shown in ("$0.075", "$0.00015", "$0.60"):
        assert shown in page


def test_the_edit_form_keeps_every_digit_of_a_budget(client, owner, org):
    key, _ = key_create(organization=org, budget_nano=parse_usd("0.125"))
    client.force_login(owner)
    form = client.get(_url("key-edit", pk=key.pk)).context["form"]
    assert form.initial["budget"] == "0.125"


def test_the_navigation_links_every_section(client, owner, org):
    """base.html builds its links with `{% url … as … %}`, which stays silent if a name
    goes missing: the page must still carry every one."""
    client.force_login(owner)
    page = client.get(_url("keys-list")).content.decode()
    for name in ("keys-list", "balance", "usage", "models-list", "docs", "members"):
        assert f'href="{_url(name)}"' in page, name
