"""The dashboard's billing endpoints: redeem a code, pay by card, and Stripe's webhook."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import time_machine
from django.db import connection
from django.test import Client
from django.utils import timezone
from django.utils.crypto import get_random_string

from apps.billing.models import CheckoutStatus, RedemptionCode, StripeCheckout, Transfer
from apps.billing.money import parse_usd
from apps.billing.selectors import available_nano_for_organization, books_check
from apps.billing.topups import checkout_create, code_mint
from apps.tenancy.models import Membership, Role, User
from apps.tenancy.services import organization_create
from tests.fakes.stripe_api import event_payload, signed_event, stripe_signature

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TEN = parse_usd("10.00")
REDEEM, CHECKOUT, WEBHOOK = "/billing/redeem", "/billing/checkout", "/stripe/webhook"


def _assert_books_clean() -> None:
    report = books_check()
    assert report.is_clean, report.problems


def _user_with_role(org, role: str) -> User:
    user = User.objects.create_user(email=f"{role}-{get_random_string(6)}@example.com")
    Membership.objects.create(user=user, organization=org, role=role)
    return user


def _mint(**kwargs) -> str:
    [code] = code_mint(amount_nano=TEN, count=1, batch="web", created_by=None, **kwargs)
    return code


def _logged_in(client: Client, user: User) -> Client:
    client.force_login(user)
    return client


# --- POST /billing/redeem ---------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN])
def test_an_owner_or_admin_redeems_a_code_into_the_organization(client, org, role):
    user = _user_with_role(org, role)
    response = _logged_in(client, user).post(REDEEM, {"org": "acme", "code": _mint()})
    assert response.status_code == 200
    assert response.json() == {"credited_usd": "10.000000000", "balance_usd": "10.000000000"}
    row = RedemptionCode.objects.get()
    assert (row.redeemed_by_organization, row.redeemed_by_user) == (org, user)
    _assert_books_clean()


def test_the_organizations_owner_redeems_too(client, org, owner):
    response = _logged_in(client, owner).post(REDEEM, {"org": "acme", "code": _mint()})
    assert response.status_code == 200
    assert available_nano_for_organization(organization=org) == TEN


@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.VIEWER])
def test_a_developer_or_viewer_may_not_top_up(client, org, role):
    code = _mint()
    response = _logged_in(client, _user_with_role(org, role)).post(
        REDEEM, {"org": "acme", "code": code}
    )
    assert response.status_code == 403
    assert Transfer.objects.count() == 0
    assert RedemptionCode.objects.get().redeemed_at is None


def test_an_outsider_gets_the_same_404_as_for_an_organization_that_does_not_exist(
    client, org, outsider
):
    code = _mint()
    _logged_in(client, outsider)
    for slug in ("acme", "no-such-org"):
        assert client.post(REDEEM, {"org": slug, "code": code}).status_code == 404
    assert Transfer.objects.count() == 0
    assert RedemptionCode.objects.get().redeemed_at is None


def test_an_anonymous_visitor_is_sent_to_log_in(client, org):
    response = client.post(REDEEM, {"org": "acme", "code": _mint()})
    assert response.status_code == 302
    assert Transfer.objects.count() == 0


def test_redeem_takes_a_post_only(client, owner, org):
    assert _logged_in(client, owner).get(REDEEM).status_code == 405


def test_a_reused_unknown_or_expired_code_answers_400_with_the_clear_message(client, org, owner):
    _logged_in(client, owner)
    used = _mint()
    assert client.post(REDEEM, {"org": "acme", "code": used}).status_code == 200
    expiring = _mint(expires_at=timezone.now() + timedelta(hours=1))
    cases = [
        (used, "this code is invalid or already used"),
        ("R200-AAAA-BBBB-CCCC-DDDD", "this code is invalid or already used"),
        ("", "this code is invalid or already used"),
    ]
    for code, message in cases:
        response = client.post(REDEEM, {"org": "acme", "code": code})
        assert (response.status_code, response.json()) == (400, {"error": message})
    with time_machine.travel(timezone.now() + timedelta(hours=2)):
        response = client.post(REDEEM, {"org": "acme", "code": expiring})
    assert (response.status_code, response.json()) == (400, {"error": "this code has expired"})
    assert Transfer.objects.count() == 1
    assert available_nano_for_organization(organization=org) == TEN
    _assert_books_clean()


def test_redemption_attempts_are_limited_per_user(client, org, owner):
    _logged_in(client, owner)
    for _ in range(10):
        bad = client.post(REDEEM, {"org": "acme", "code": "R200-AAAA-BBBB-CCCC-DDDD"})
        assert bad.status_code == 400
    response = client.post(REDEEM, {"org": "acme", "code": _mint()})
    assert response.status_code == 429
    assert int(response["Retry-After"]) > 0
    assert "too many attempts" in response.json()["error"]
    assert Transfer.objects.count() == 0
    assert RedemptionCode.objects.get().redeemed_at is None


def test_redemption_attempts_are_limited_per_address(org):
    address = "203.0.113.77"
    for _ in range(3):
        client = _logged_in(Client(REMOTE_ADDR=address), _user_with_role(org, Role.ADMIN))
        for _ in range(10):
            client.post(REDEEM, {"org": "acme", "code": "R200-AAAA-BBBB-CCCC-DDDD"})
    fresh_user = _logged_in(Client(REMOTE_ADDR=address), _user_with_role(org, Role.ADMIN))
    response = fresh_user.post(REDEEM, {"org": "acme", "code": _mint()})
    assert response.status_code == 429
    elsewhere = _logged_in(Client(REMOTE_ADDR="203.0.113.78"), _user_with_role(org, Role.ADMIN))
    assert elsewhere.post(REDEEM, {"org": "acme", "code": _mint()}).status_code == 200
    assert Transfer.objects.count() == 1


def test_the_redeem_form_needs_its_csrf_token(csrf_client, org, owner):
    code = _mint()
    _logged_in(csrf_client, owner)
    assert csrf_client.post(REDEEM, {"org": "acme", "code": code}).status_code == 403
    assert Transfer.objects.count() == 0
    token = get_random_string(32)
    csrf_client.cookies["csrftoken"] = token
    response = csrf_client.post(REDEEM, {"org": "acme", "code": code, "csrfmiddlewaretoken": token})
    assert response.status_code == 200
    _assert_books_clean()


# --- POST /billing/checkout -------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN])
def test_a_checkout_redirects_to_stripe_with_303(client, stripe_api, org, role):
    user = _user_with_role(org, role)
    response = _logged_in(client, user).post(CHECKOUT, {"org": "acme", "amount": "25.50"})
    assert response.status_code == 303
    checkout = StripeCheckout.objects.get()
    assert response["Location"] == stripe_api.sessions[checkout.session_id]["url"]
    assert (checkout.amount_nano, checkout.created_by) == (parse_usd("25.50"), user)
    [request] = stripe_api.requests
    assert request.params["line_items[0][price_data][unit_amount]"] == "2550"
    assert Transfer.objects.count() == 0


@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.VIEWER])
def test_a_developer_or_viewer_may_not_pay(client, stripe_api, org, role):
    response = _logged_in(client, _user_with_role(org, role)).post(
        CHECKOUT, {"org": "acme", "amount": "25.00"}
    )
    assert response.status_code == 403
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0


def test_an_outsider_may_not_pay_for_someone_else(client, stripe_api, org, outsider):
    response = _logged_in(client, outsider).post(CHECKOUT, {"org": "acme", "amount": "25.00"})
    assert response.status_code == 404
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0


def test_an_anonymous_visitor_may_not_open_a_checkout(client, stripe_api, org):
    assert client.post(CHECKOUT, {"org": "acme", "amount": "25.00"}).status_code == 302
    assert stripe_api.requests == []


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("4.99", "smallest card top-up"),
        ("1000.01", "largest card top-up"),
        ("10.005", "whole number of cents"),
        ("ten", "not an amount"),
        ("", "not an amount"),
        ("-10", "negative"),
        ("0", "more than zero"),
        ("NaN", "not an amount"),
    ],
)
def test_a_bad_amount_answers_400_and_asks_stripe_nothing(
    client, stripe_api, org, owner, amount, message
):
    response = _logged_in(client, owner).post(CHECKOUT, {"org": "acme", "amount": amount})
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0
    assert Transfer.objects.count() == 0


def test_when_stripe_is_down_the_checkout_answers_503(client, stripe_api, org, owner):
    stripe_api.fail_status = 400
    response = _logged_in(client, owner).post(CHECKOUT, {"org": "acme", "amount": "25.00"})
    assert response.status_code == 503
    assert StripeCheckout.objects.count() == 0


def test_the_checkout_form_needs_its_csrf_token(csrf_client, stripe_api, org, owner):
    _logged_in(csrf_client, owner)
    assert csrf_client.post(CHECKOUT, {"org": "acme", "amount": "25.00"}).status_code == 403
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0


# --- POST /stripe/webhook ---------------------------------------------------------------


def _post_event(client: Client, payload: bytes, signature: str | None):
    headers = {} if signature is None else {"Stripe-Signature": signature}
    return client.post(WEBHOOK, payload, content_type="application/json", headers=headers)


@pytest.fixture
def session(stripe_api, org, owner) -> dict:
    checkout = checkout_create(organization=org, amount_nano=TEN, user=owner)
    return stripe_api.sessions[checkout.session_id]


def test_a_signed_paid_event_credits_once_however_often_it_arrives(csrf_client, session, org):
    payload, signature = signed_event(session)
    for _ in range(3):  # Stripe redelivers until it sees a 2xx; no CSRF token, no login
        response = _post_event(csrf_client, payload, signature)
        assert (response.status_code, response.json()) == (200, {"received": True})
    assert Transfer.objects.count() == 1
    assert available_nano_for_organization(organization=org) == TEN
    assert StripeCheckout.objects.get().status == CheckoutStatus.COMPLETED
    _assert_books_clean()


def test_an_event_with_a_bad_or_missing_signature_answers_400(client, session):
    payload = event_payload(session)
    for bad in (None, "", "t=1,v1=00", stripe_signature(payload, secret="whsec_other")):
        assert _post_event(client, payload, bad).status_code == 400
    assert Transfer.objects.count() == 0
    assert StripeCheckout.objects.get().status == CheckoutStatus.OPEN
    _assert_books_clean()


def test_a_signed_event_that_does_not_match_the_checkout_answers_200_and_credits_nothing(
    client, session, caplog
):
    for changes in ({"amount_total": 999_999}, {"currency": "eur"}, {"id": "cs_test_unknown"}):
        payload, signature = signed_event(session, **changes)
        assert _post_event(client, payload, signature).status_code == 200
    assert Transfer.objects.count() == 0
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 3
    _assert_books_clean()


def test_an_unpaid_completion_answers_200_and_credits_nothing(client, session):
    payload, signature = signed_event(session, payment_status="unpaid")
    assert _post_event(client, payload, signature).status_code == 200
    assert Transfer.objects.count() == 0


def test_the_webhook_takes_a_post_only(client):
    assert client.get(WEBHOOK).status_code == 405


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_three_parallel_deliveries_to_the_webhook_credit_once(stripe_api):
    owner = User.objects.create_user(email="hook@example.com", password="x-long-password")
    org = organization_create(slug="hooked", name="H", owner=owner)
    checkout = checkout_create(organization=org, amount_nano=TEN, user=owner)
    payload, signature = signed_event(stripe_api.sessions[checkout.session_id])
    start = threading.Barrier(3)

    def deliver(_: int) -> int:
        try:
            start.wait(10)
            return _post_event(Client(), payload, signature).status_code
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(deliver, range(3))) == [200, 200, 200]
    assert Transfer.objects.count() == 1
    assert available_nano_for_organization(organization=org) == TEN
    _assert_books_clean()
