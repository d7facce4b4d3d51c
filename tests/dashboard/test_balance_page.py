"""The balance page: the figures, the open holds and the ledger history, for every role;
and nothing of another organization's, ever."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from apps.billing.models import StripeCheckout
from apps.billing.money import parse_usd
from apps.billing.services import (
    account_for_organization,
    credit_grant,
    low_balance_threshold_set,
)
from apps.billing.topups import checkout_create
from apps.dashboard import urls_money
from apps.tenancy.models import Role
from apps.tenancy.services import organization_create
from tests.billing.holds import hold_of
from tests.dashboard.money import balance_url, login, settled_call
from tests.dashboard.people import ROLES, user_with_role

# The stripe library hands httpx the encoded form as text, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TEN = parse_usd("10.00")


def _nanos(html: str, label: str) -> list[int]:
    """The exact amounts of the cells labelled `label` (their data-nano attribute)."""
    return [int(n) for n in re.findall(rf'data-label="{label}"[^>]*data-nano="(-?\d+)"', html)]


@pytest.mark.parametrize("role", ROLES)
def test_every_member_sees_the_balance_and_only_money_roles_see_the_forms(client, org, role):
    credit_grant(organization=org, amount_nano=TEN, memo="welcome credit")
    response = login(client, user_with_role(org, role)).get(balance_url())
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="available-balance" data-nano="10000000000">$10.00<' in html
    assert "welcome credit" in html
    forms = ["/o/acme/balance/redeem", "/o/acme/balance/topup", "/o/acme/balance/threshold"]
    shown = [action in html for action in forms]
    assert shown == [role in (Role.OWNER, Role.ADMIN)] * 3


def test_a_new_organization_without_an_account_shows_zero(client, org, owner):
    response = login(client, owner).get(balance_url())
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="available-balance" data-nano="0">$0.00<' in html
    assert "No money has moved" in html


def test_an_anonymous_visitor_is_sent_to_log_in(client, org):
    response = client.get(balance_url())
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_the_figures_separate_balance_holds_and_available(client, funded_org, owner, api_key):
    hold_of(
        account_for_organization(organization=funded_org), parse_usd("1.50"), "chatcmpl-in-flight"
    )
    html = login(client, owner).get(balance_url()).content.decode()
    assert 'data-nano="8500000000">$8.50<' in html  # available
    assert 'data-nano="10000000000">$10.00<' in html  # balance
    assert 'data-nano="1500000000">$1.50<' in html  # on hold
    assert "chatcmpl-in-flight" in html


def test_the_page_warns_when_the_balance_is_below_the_threshold(client, funded_org, owner):
    login(client, owner)
    low_balance_threshold_set(organization=funded_org, threshold_nano=parse_usd("5.00"))
    assert "below your warning threshold" not in client.get(balance_url()).content.decode()
    low_balance_threshold_set(organization=funded_org, threshold_nano=parse_usd("20.00"))
    html = client.get(balance_url()).content.decode()
    assert "below your warning threshold of $20.00" in html
    assert 'name="threshold" value="20.00"' in html


def test_each_ledger_row_shows_its_signed_amount_and_the_balance_after_it(
    client, funded_org, owner, api_key, price
):
    first = settled_call(funded_org, api_key, price, "chatcmpl-1")
    second = settled_call(funded_org, api_key, price, "chatcmpl-2", completion_tokens=7)
    html = login(client, owner).get(balance_url()).content.decode()
    amounts = _nanos(html, "Amount")
    assert amounts == [-second.charged_nano, -first.charged_nano, TEN]
    after = _nanos(html, "Balance after")
    assert after == [
        TEN - first.charged_nano - second.charged_nano,
        TEN - first.charged_nano,
        TEN,
    ]
    assert "-$0.001113" in html  # 1_112_500 nano, shown to six places
    assert f"gpt-4o <code>chatcmpl-1</code> <code>{api_key.display}</code>" in html
    assert "+$10.00" in html


def test_the_ledger_is_paginated_and_the_balances_carry_across_pages(client, org, owner):
    credits = [parse_usd("1.00") + i for i in range(55)]  # distinct amounts
    for amount in credits:
        credit_grant(organization=org, amount_nano=amount)
    login(client, owner)
    first = client.get(balance_url()).content.decode()
    second = client.get(balance_url() + "?page=2").content.decode()
    assert "Page 1 of 2" in first
    assert "Page 2 of 2" in second
    assert 'href="?page=2" rel="next"' in first
    assert 'href="?page=1" rel="prev"' in second
    amounts = _nanos(first, "Amount") + _nanos(second, "Amount")
    assert amounts == credits[::-1]
    after = _nanos(first, "Balance after") + _nanos(second, "Balance after")
    assert after == [sum(credits[: i + 1]) for i in range(55)][::-1]


def test_the_ledger_never_shows_another_organizations_transfers(
    client, funded_org, owner, outsider, price
):
    elsewhere = outsider.memberships.get().organization
    credit_grant(organization=elsewhere, amount_nano=parse_usd("77.00"), memo="their secret")
    settled_call(elsewhere, None, price, "chatcmpl-theirs")
    html = login(client, owner).get(balance_url()).content.decode()
    assert "their secret" not in html
    assert "chatcmpl-theirs" not in html
    assert "77.00" not in html
    assert _nanos(html, "Amount") == [TEN]


def test_the_holds_of_another_organization_are_not_listed(client, funded_org, owner, outsider):
    elsewhere = outsider.memberships.get().organization
    credit_grant(organization=elsewhere, amount_nano=TEN)
    hold_of(
        account_for_organization(organization=elsewhere), parse_usd("1.00"), "chatcmpl-their-hold"
    )
    html = login(client, owner).get(balance_url()).content.decode()
    assert "chatcmpl-their-hold" not in html
    assert "No calls are in progress" in html


def test_the_page_costs_the_same_queries_for_one_transfer_as_for_a_full_page(
    client, org, owner, django_assert_num_queries
):
    login(client, owner)
    credit_grant(organization=org, amount_nano=TEN)
    client.get(balance_url())  # the session's first write is not what this counts
    # session, user, membership; the account for the figures and for the ledger; count,
    # page, balances after; holds; the switcher's memberships
    with django_assert_num_queries(10):
        client.get(balance_url())
    for _ in range(60):
        credit_grant(organization=org, amount_nano=TEN)
    with django_assert_num_queries(10):
        assert client.get(balance_url() + "?page=2").status_code == 200


def test_a_member_of_two_organizations_sees_each_ones_own_ledger(client, org, owner):
    other = organization_create(slug="second", name="Second", owner=owner)
    credit_grant(organization=org, amount_nano=TEN, memo="for acme")
    credit_grant(organization=other, amount_nano=parse_usd("3.00"), memo="for second")
    login(client, owner)
    acme = client.get(balance_url("acme")).content.decode()
    second = client.get(balance_url("second")).content.decode()
    assert "for acme" in acme
    assert "for second" not in acme
    assert "for second" in second
    assert "for acme" not in second


def test_an_outsider_gets_404_from_every_money_page_even_with_real_ids(
    client, org, owner, outsider, stripe_api
):
    """Every URL of the balance and usage pages, GET and POST, under the victim's slug and
    with the victim's real checkout id: 404, and no data."""
    checkout = checkout_create(
        organization=org,
        amount_nano=TEN,
        user=owner,
        success_url="http://testserver/done/{CHECKOUT_SESSION_ID}/",
        cancel_url="http://testserver/",
    )
    login(client, outsider)
    for pattern in urls_money.urlpatterns:
        kwargs = {"org_slug": "acme"}
        if "session_id" in str(pattern.pattern):
            kwargs["session_id"] = checkout.session_id
        url = reverse(pattern.name, kwargs=kwargs)
        for method in (client.get, client.post):
            response = method(url)
            assert response.status_code == 404, (pattern.name, method.__name__)
            assert checkout.session_id.encode() not in response.content
    assert StripeCheckout.objects.count() == 1
