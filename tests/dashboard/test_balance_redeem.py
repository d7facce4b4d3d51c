"""Redeeming a code from the balance page: a form that posts, a message, and back."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.contrib.messages import get_messages
from django.test import Client
from django.utils import timezone
from django.utils.crypto import get_random_string

from apps.billing.models import RedemptionCode, Transfer
from apps.billing.money import parse_usd
from apps.billing.selectors import available_nano_for_organization, books_check
from apps.billing.topups import code_mint
from apps.tenancy.models import Role, User
from tests.dashboard.money import balance_url, login, post_for_messages
from tests.dashboard.people import user_with_role

TEN = parse_usd("10.00")
REDEEM = "/o/acme/balance/redeem"
INVALID = "R200-AAAA-BBBB-CCCC-DDDD"


@pytest.fixture
def payer(org) -> User:
    """An owner of `org` with an email address of their own: redemption attempts count per
    email address in the shared cache, which outlives a test on Redis."""
    return user_with_role(org, Role.OWNER)


def _mint(**kwargs) -> str:
    [code] = code_mint(amount_nano=TEN, count=1, batch="web", created_by=None, **kwargs)
    return code


def _messages(response) -> list[str]:
    """The messages this request added (each test shows them, so none pile up)."""
    return [str(message) for message in get_messages(response.wsgi_request)]


def _redeem(client: Client, code: str) -> list[str]:
    return post_for_messages(client, REDEEM, {"code": code})


def _assert_books_clean() -> None:
    report = books_check()
    assert report.is_clean, report.problems


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN])
def test_an_owner_or_admin_redeems_a_code_and_is_sent_back_with_the_news(client, org, role):
    user = user_with_role(org, role)
    response = login(client, user).post(REDEEM, {"code": _mint()})
    assert (response.status_code, response["Location"]) == (302, balance_url())
    assert _messages(response) == ["Code redeemed: $10.00 was added to the balance."]
    assert available_nano_for_organization(organization=org) == TEN
    row = RedemptionCode.objects.get()
    assert (row.redeemed_by_organization, row.redeemed_by_user) == (org, user)
    _assert_books_clean()


def test_a_code_typed_loosely_is_still_recognised(client, org, payer):
    code = _mint()
    loose = "  " + code.lower().replace("-", " ") + " "
    login(client, payer).post(REDEEM, {"code": loose})
    assert available_nano_for_organization(organization=org) == TEN


def test_the_redeemed_code_shows_in_the_history(client, org, payer):
    code = _mint()
    login(client, payer).post(REDEEM, {"code": code})
    html = client.get(balance_url()).content.decode()
    assert "Code redemption" in html
    assert f'Code <code>…{code[-4:]}</code> <span class="muted">{payer.email}</span>' in html


@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.VIEWER])
def test_a_developer_or_viewer_may_not_redeem(client, org, role):
    response = login(client, user_with_role(org, role)).post(REDEEM, {"code": _mint()})
    assert response.status_code == 403
    assert Transfer.objects.count() == 0
    assert RedemptionCode.objects.get().redeemed_at is None


def test_an_outsider_gets_the_same_404_as_for_an_organization_that_does_not_exist(
    client, org, outsider
):
    code = _mint()
    login(client, outsider)
    for slug in ("acme", "no-such-org"):
        response = client.post(f"/o/{slug}/balance/redeem", {"code": code})
        assert response.status_code == 404
    assert Transfer.objects.count() == 0
    assert RedemptionCode.objects.get().redeemed_at is None


def test_an_anonymous_visitor_is_sent_to_log_in(client, org):
    response = client.post(REDEEM, {"code": _mint()})
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
    assert Transfer.objects.count() == 0


def test_redeem_takes_a_post_only(client, org, payer):
    assert login(client, payer).get(REDEEM).status_code == 405


def test_a_reused_unknown_empty_or_expired_code_says_why_and_credits_nothing(client, org, payer):
    login(client, payer)
    used = _mint()
    assert _redeem(client, used) == ["Code redeemed: $10.00 was added to the balance."]
    expiring = _mint(expires_at=timezone.now() + timedelta(hours=1))
    cases = [
        (used, "this code is invalid or already used"),
        (INVALID, "this code is invalid or already used"),
        ("", "This field is required."),
    ]
    for code, message in cases:
        assert _redeem(client, code) == [message]
    with time_machine.travel(timezone.now() + timedelta(hours=2)):
        assert _redeem(client, expiring) == ["this code has expired"]
    assert Transfer.objects.count() == 1
    assert available_nano_for_organization(organization=org) == TEN
    _assert_books_clean()


def test_the_error_is_shown_on_the_balance_page(client, org, payer):
    login(client, payer)
    response = client.post(REDEEM, {"code": INVALID}, follow=True)
    assert response.redirect_chain == [(balance_url(), 302)]
    assert "this code is invalid or already used" in response.content.decode()


def test_redemption_attempts_are_limited_per_user(client, org, payer):
    login(client, payer)
    for _ in range(10):
        assert _redeem(client, INVALID) == ["this code is invalid or already used"]
    response = client.post(REDEEM, {"code": _mint()})
    assert response.status_code == 429
    assert int(response["Retry-After"]) > 0
    assert "Too many attempts" in response.content.decode()
    assert Transfer.objects.count() == 0
    assert RedemptionCode.objects.get().redeemed_at is None


def test_redemption_attempts_are_limited_per_address(org):
    address = "203.0.113.77"
    for _ in range(3):
        client = login(Client(REMOTE_ADDR=address), user_with_role(org, Role.ADMIN))
        for _ in range(10):
            _redeem(client, INVALID)
    fresh_user = login(Client(REMOTE_ADDR=address), user_with_role(org, Role.ADMIN))
    assert fresh_user.post(REDEEM, {"code": _mint()}).status_code == 429
    elsewhere = login(Client(REMOTE_ADDR="203.0.113.78"), user_with_role(org, Role.ADMIN))
    assert _redeem(elsewhere, _mint()) == ["Code redeemed: $10.00 was added to the balance."]
    assert Transfer.objects.count() == 1


def test_the_redeem_form_needs_its_csrf_token(csrf_client, org, payer):
    code = _mint()
    login(csrf_client, payer)
    assert csrf_client.post(REDEEM, {"code": code}).status_code == 403
    assert Transfer.objects.count() == 0
    token = get_random_string(32)
    csrf_client.cookies["csrftoken"] = token
    response = csrf_client.post(REDEEM, {"code": code, "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert available_nano_for_organization(organization=org) == TEN
    _assert_books_clean()


def test_the_balance_page_gives_the_form_its_csrf_token(csrf_client, org, payer):
    code = _mint()
    login(csrf_client, payer)
    html = csrf_client.get(balance_url()).content.decode()
    form = html[html.index('action="/o/acme/balance/redeem"') :]
    token = form.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]
    response = csrf_client.post(REDEEM, {"code": code, "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert available_nano_for_organization(organization=org) == TEN
