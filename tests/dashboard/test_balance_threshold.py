"""The low-balance warning form on the balance page."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.utils.crypto import get_random_string

from apps.billing.models import Account
from apps.billing.money import parse_usd
from apps.tenancy.models import Role
from tests.dashboard.money import balance_url, login, post_for_messages
from tests.dashboard.people import user_with_role

THRESHOLD = "/o/acme/balance/threshold"


def _messages(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def _threshold(org) -> int | None:
    account = Account.objects.filter(organization=org).first()
    return account.low_balance_threshold_nano if account else None


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN])
def test_an_owner_or_admin_sets_and_clears_the_warning(client, org, role):
    login(client, user_with_role(org, role))
    assert post_for_messages(client, THRESHOLD, {"threshold": "12.50"}) == [
        "The owners will be emailed when the available balance falls below $12.50."
    ]
    assert _threshold(org) == parse_usd("12.50")
    assert post_for_messages(client, THRESHOLD, {"threshold": ""}) == [
        "The low-balance warning is off."
    ]
    assert _threshold(org) is None


@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.VIEWER])
def test_a_developer_or_viewer_may_not_change_it_but_sees_it(client, org, owner, role):
    login(client, owner).post(THRESHOLD, {"threshold": "3"})
    login(client, user_with_role(org, role))
    assert client.post(THRESHOLD, {"threshold": "99"}).status_code == 403
    assert _threshold(org) == parse_usd("3")
    html = client.get(balance_url()).content.decode()
    assert "warned when the available balance falls below $3.00" in html


def test_an_outsider_gets_404_and_changes_nothing(client, org, outsider):
    login(client, outsider)
    assert client.post(THRESHOLD, {"threshold": "5"}).status_code == 404
    assert _threshold(org) is None


def test_an_anonymous_visitor_is_sent_to_log_in(client, org):
    assert client.post(THRESHOLD, {"threshold": "5"}).status_code == 302
    assert _threshold(org) is None


def test_the_threshold_takes_a_post_only(client, org, owner):
    assert login(client, owner).get(THRESHOLD).status_code == 405


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "Enter an amount in US dollars, such as 25.00."),
        ("-5", "Enter an amount in US dollars, such as 25.00."),
        ("0", "the threshold must be more than zero; leave it empty for none"),
        ("5.005", "the threshold is a whole number of cents"),
        ("1" * 30, "Enter an amount in US dollars, such as 25.00."),
    ],
)
def test_a_bad_threshold_is_refused_with_a_message(client, org, owner, value, message):
    response = login(client, owner).post(THRESHOLD, {"threshold": value})
    assert _messages(response) == [message]
    assert _threshold(org) is None


def test_the_form_shows_the_current_threshold(client, org, owner):
    login(client, owner).post(THRESHOLD, {"threshold": "7.5"})
    html = client.get(balance_url()).content.decode()
    assert 'name="threshold" value="7.50"' in html


def test_the_threshold_form_needs_its_csrf_token(csrf_client, org, owner):
    login(csrf_client, owner)
    assert csrf_client.post(THRESHOLD, {"threshold": "5"}).status_code == 403
    assert _threshold(org) is None
    token = get_random_string(32)
    csrf_client.cookies["csrftoken"] = token
    response = csrf_client.post(THRESHOLD, {"threshold": "5", "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert _threshold(org) == parse_usd("5")
