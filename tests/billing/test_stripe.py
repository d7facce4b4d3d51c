"""Card top-ups through Stripe Checkout, against a stand-in for Stripe's API on 127.0.0.1,
with webhook events signed as Stripe signs them."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from apps.billing.models import (
    AccountKind,
    CheckoutStatus,
    StripeCheckout,
    Transfer,
    TransferKind,
)
from apps.billing.money import parse_usd
from apps.billing.selectors import available_nano_for_organization, books_check
from apps.billing.services import system_account
from apps.billing.topups import (
    CheckoutUnavailable,
    TopupError,
    WebhookSignatureError,
    checkout_complete_from_event,
    checkout_create,
)
from apps.tenancy.models import User
from apps.tenancy.services import organization_create
from tests.fakes.stripe_api import (
    WEBHOOK_SECRET,
    StripeFake,
    event_payload,
    signed_event,
    stripe_signature,
)

# The stripe library hands httpx the encoded form as text, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TWENTY = parse_usd("20.00")
# Where Stripe sends the customer back: the dashboard passes its own pages.
RETURN = {
    "success_url": "https://real200.test/o/acme/balance/topup/{CHECKOUT_SESSION_ID}/",
    "cancel_url": "https://real200.test/o/acme/balance/",
}


@pytest.fixture
def stripe_api(settings):
    with StripeFake() as fake:
        settings.STRIPE_SECRET_KEY = fake.secret_key
        settings.STRIPE_API_BASE = fake.base_url
        settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
        settings.TOPUP_MIN_USD = "5.00"
        settings.TOPUP_MAX_USD = "1000.00"
        yield fake


def _assert_books_clean() -> None:
    report = books_check()
    assert report.is_clean, report.problems


def _deliver(session: dict, **kwargs) -> StripeCheckout | None:
    payload, signature = signed_event(session, **kwargs)
    return checkout_complete_from_event(payload, signature)


# --- opening a session ------------------------------------------------------------------


def test_a_checkout_asks_stripe_for_a_payment_session_of_the_amount_in_cents(
    stripe_api, org, owner
):
    checkout = checkout_create(organization=org, amount_nano=TWENTY, user=owner, **RETURN)
    [request] = stripe_api.requests
    assert request.path == "/v1/checkout/sessions"
    assert request.headers["authorization"] == f"Bearer {stripe_api.secret_key}"
    assert request.headers["idempotency-key"].startswith("real200-checkout-")
    params = request.params
    assert params["mode"] == "payment"
    assert params["line_items[0][quantity]"] == "1"
    assert params["line_items[0][price_data][currency]"] == "usd"
    assert params["line_items[0][price_data][unit_amount]"] == "2000"
    assert params["metadata[organization_id]"] == str(org.pk)
    assert params["metadata[checkout_id]"] == str(checkout.pk)
    assert params["client_reference_id"] == str(checkout.pk)
    assert params["success_url"] == RETURN["success_url"]
    assert params["cancel_url"] == RETURN["cancel_url"]
    stored = StripeCheckout.objects.get()
    session = stripe_api.sessions[stored.session_id]
    assert stored.url == session["url"] == checkout.url
    assert (stored.amount_nano, stored.currency, stored.status) == (TWENTY, "usd", "open")
    assert (stored.organization, stored.created_by) == (org, owner)
    assert Transfer.objects.count() == 0  # nothing is credited before Stripe says paid


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("4.99", "smallest card top-up is \\$5.00"),
        ("1000.01", "largest card top-up is \\$1000.00"),
        ("10.005", "whole number of cents"),
        ("10.000000001", "whole number of cents"),
    ],
)
def test_a_checkout_amount_outside_the_bounds_or_not_whole_cents_is_refused(
    stripe_api, org, owner, amount, message
):
    with pytest.raises(TopupError, match=message):
        checkout_create(organization=org, amount_nano=parse_usd(amount), user=owner, **RETURN)
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0
    assert Transfer.objects.count() == 0


def test_the_bounds_themselves_are_accepted(stripe_api, org, owner):
    for amount in ("5.00", "1000.00"):
        checkout_create(organization=org, amount_nano=parse_usd(amount), user=owner, **RETURN)
    sent = [r.params["line_items[0][price_data][unit_amount]"] for r in stripe_api.requests]
    assert sent == ["500", "100000"]


def test_when_stripe_refuses_no_checkout_is_left_behind(stripe_api, org, owner, caplog):
    stripe_api.fail_status = 400
    with pytest.raises(CheckoutUnavailable, match="did not answer"):
        checkout_create(organization=org, amount_nano=TWENTY, user=owner, **RETURN)
    assert StripeCheckout.objects.count() == 0
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert stripe_api.secret_key not in caplog.text


def test_without_a_secret_key_card_top_ups_are_off(stripe_api, settings, org, owner):
    settings.STRIPE_SECRET_KEY = ""
    with pytest.raises(CheckoutUnavailable, match="not available"):
        checkout_create(organization=org, amount_nano=TWENTY, user=owner, **RETURN)
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0


# --- the webhook ----------------------------------------------------------------------


@pytest.fixture
def session(stripe_api, org, owner) -> dict:
    checkout = checkout_create(organization=org, amount_nano=TWENTY, user=owner, **RETURN)
    return stripe_api.sessions[checkout.session_id]


def test_a_paid_session_credits_the_organization_once_whatever_the_deliveries(session, org):
    payload, signature = signed_event(session)
    results = [checkout_complete_from_event(payload, signature) for _ in range(3)]
    again = _deliver(session, event_type="checkout.session.async_payment_succeeded")
    checkout = StripeCheckout.objects.get()
    assert {r.pk for r in [*results, again]} == {checkout.pk}
    assert checkout.status == CheckoutStatus.COMPLETED
    assert checkout.completed_at is not None
    transfer = Transfer.objects.get()
    assert checkout.transfer == transfer
    assert transfer.kind == TransferKind.TOPUP
    assert transfer.idempotency_key == f"stripe:{session['id']}"
    assert transfer.from_account == system_account(AccountKind.TOPUP_CLEARING)
    assert transfer.amount_nano == TWENTY
    assert available_nano_for_organization(organization=org) == TWENTY
    _assert_books_clean()


def test_a_session_paid_later_credits_when_the_payment_succeeds(session, org):
    assert _deliver(session, payment_status="unpaid") is None
    assert Transfer.objects.count() == 0
    _deliver(session, event_type="checkout.session.async_payment_succeeded")
    assert available_nano_for_organization(organization=org) == TWENTY
    _assert_books_clean()


def _assert_refused_loudly(caplog, org) -> None:
    assert Transfer.objects.count() == 0
    assert available_nano_for_organization(organization=org) == 0
    assert StripeCheckout.objects.get().status == CheckoutStatus.OPEN
    assert [r for r in caplog.records if r.levelno == logging.ERROR], "no error was logged"
    _assert_books_clean()


@pytest.mark.parametrize(
    "changes",
    [
        {"amount_total": 200_000},
        {"amount_total": 1999},
        {"amount_total": "2000"},
        {"amount_total": None},
        {"currency": "eur"},
        {"currency": "USD"},
        {"mode": "subscription"},
        {"metadata": {}},
        {"metadata": "checkout"},
    ],
)
def test_a_session_that_differs_from_the_checkout_is_refused_loudly(session, org, caplog, changes):
    assert _deliver(session, **changes) is None
    _assert_refused_loudly(caplog, org)


@pytest.mark.parametrize("field", ["checkout_id", "organization_id"])
def test_a_session_whose_metadata_names_another_checkout_or_organization_is_refused(
    session, org, outsider, caplog, field
):
    other = {
        "checkout_id": "999999",
        "organization_id": str(outsider.memberships.get().organization_id),
    }
    metadata = {**session["metadata"], field: other[field]}
    assert _deliver(session, metadata=metadata) is None
    _assert_refused_loudly(caplog, org)


def test_an_unknown_session_is_refused_loudly(session, org, caplog):
    assert _deliver(session, id="cs_test_not_ours") is None
    _assert_refused_loudly(caplog, org)


@pytest.mark.parametrize("payment_status", ["unpaid", "no_payment_required", None])
def test_an_unpaid_session_credits_nothing(session, org, payment_status):
    assert _deliver(session, payment_status=payment_status) is None
    assert Transfer.objects.count() == 0
    assert StripeCheckout.objects.get().status == CheckoutStatus.OPEN
    _assert_books_clean()


def test_other_events_credit_nothing(session, org):
    for event_type in ("payment_intent.succeeded", "charge.succeeded", "customer.created"):
        assert _deliver(session, event_type=event_type) is None
    assert Transfer.objects.count() == 0


def test_an_expired_session_is_marked_and_credits_nothing(session, org):
    checkout = _deliver(session, event_type="checkout.session.expired", payment_status="unpaid")
    assert checkout.status == CheckoutStatus.EXPIRED
    assert Transfer.objects.count() == 0


def _signature_cases(session: dict) -> list[tuple[bytes, str]]:
    payload = event_payload(session)
    tampered = payload.replace(b'"amount_total": 2000', b'"amount_total": 200000')
    assert tampered != payload
    return [
        (payload, ""),
        (payload, "garbage"),
        (payload, stripe_signature(payload, secret="whsec_someone_else")),
        (payload, stripe_signature(payload, at=int(time.time()) - 3600)),  # replayed later
        (tampered, stripe_signature(payload)),
        (payload, stripe_signature(payload).replace("v1=", "v0=")),
    ]


def test_an_event_not_signed_with_our_secret_is_refused_before_anything_is_read(session, org):
    for payload, signature in _signature_cases(session):
        with pytest.raises(WebhookSignatureError):
            checkout_complete_from_event(payload, signature)
    assert Transfer.objects.count() == 0
    assert StripeCheckout.objects.get().status == CheckoutStatus.OPEN
    _assert_books_clean()


def test_without_a_webhook_secret_every_event_is_refused(session, settings, caplog):
    settings.STRIPE_WEBHOOK_SECRET = ""
    payload = event_payload(session)
    with pytest.raises(WebhookSignatureError):
        checkout_complete_from_event(payload, stripe_signature(payload, secret=""))
    assert "STRIPE_WEBHOOK_SECRET" in caplog.text
    assert Transfer.objects.count() == 0


def test_a_signed_body_that_is_not_json_is_refused(session):
    payload = b"not json"
    with pytest.raises(WebhookSignatureError):
        checkout_complete_from_event(payload, stripe_signature(payload))
    assert json.loads(event_payload(session))  # the fake's own payloads are JSON


# --- under real concurrency (PostgreSQL) ------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_webhook_delivered_three_times_in_parallel_credits_once(stripe_api):
    owner = User.objects.create_user(email="pay@example.com", password="x-long-password")
    org = organization_create(slug="parallel-pay", name="P", owner=owner)
    checkout = checkout_create(organization=org, amount_nano=TWENTY, user=owner, **RETURN)
    payload, signature = signed_event(stripe_api.sessions[checkout.session_id])
    start = threading.Barrier(3)

    def deliver(_: int) -> int | None:
        try:
            start.wait(10)
            result = checkout_complete_from_event(payload, signature)
            return result.pk if result else None
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(deliver, range(3)))
    assert results == [checkout.pk] * 3
    assert Transfer.objects.filter(kind=TransferKind.TOPUP).count() == 1
    assert available_nano_for_organization(organization=org) == TWENTY
    assert StripeCheckout.objects.get().status == CheckoutStatus.COMPLETED
    _assert_books_clean()
