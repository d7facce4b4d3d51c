"""Card top-ups from the balance page: the form that sends the browser to Stripe, the page
Stripe sends it back to (which waits for the webhook's credit), and the webhook itself."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.utils.crypto import get_random_string

from apps.billing.models import CheckoutStatus, StripeCheckout, Transfer
from apps.billing.money import parse_usd
from apps.billing.selectors import available_nano_for_organization, books_check
from apps.billing.services import credit_grant
from apps.billing.topups import checkout_create
from apps.tenancy.models import Role, User
from apps.tenancy.services import organization_create
from tests.dashboard.money import balance_url, login
from tests.dashboard.people import user_with_role
from tests.fakes.stripe_api import event_payload, signed_event, stripe_signature

# The stripe library hands httpx the encoded form as text, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TEN = parse_usd("10.00")
TOPUP, WEBHOOK = "/o/acme/balance/topup", "/stripe/webhook"


def _assert_books_clean() -> None:
    report = books_check()
    assert report.is_clean, report.problems


def _messages(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def _open_checkout(org, user, slug: str = "acme") -> StripeCheckout:
    return checkout_create(
        organization=org,
        amount_nano=TEN,
        user=user,
        success_url=f"http://testserver/o/{slug}/balance/topup/{{CHECKOUT_SESSION_ID}}/",
        cancel_url=f"http://testserver/o/{slug}/balance/",
    )


def _return_url(checkout: StripeCheckout, slug: str = "acme") -> str:
    return f"/o/{slug}/balance/topup/{checkout.session_id}/"


def _post_event(client: Client, payload: bytes, signature: str | None):
    headers = {} if signature is None else {"Stripe-Signature": signature}
    return client.post(WEBHOOK, payload, content_type="application/json", headers=headers)


# --- the form -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN])
def test_the_form_sends_the_browser_to_stripe_which_will_send_it_back_here(
    client, stripe_api, org, role
):
    user = user_with_role(org, role)
    response = login(client, user).post(TOPUP, {"amount": "25.50"})
    assert response.status_code == 303
    checkout = StripeCheckout.objects.get()
    assert response["Location"] == stripe_api.sessions[checkout.session_id]["url"]
    assert (checkout.amount_nano, checkout.created_by) == (parse_usd("25.50"), user)
    [request] = stripe_api.requests
    assert request.params["line_items[0][price_data][unit_amount]"] == "2550"
    assert request.params["success_url"] == (
        "http://testserver/o/acme/balance/topup/{CHECKOUT_SESSION_ID}/"
    )
    assert request.params["cancel_url"] == "http://testserver/o/acme/balance/"
    assert Transfer.objects.count() == 0


def test_the_page_offers_the_form_with_the_bounds(client, stripe_api, org, owner):
    html = login(client, owner).get(balance_url()).content.decode()
    assert 'action="/o/acme/balance/topup"' in html
    assert "From $5.00 to $1000.00, in whole cents." in html


def test_without_stripe_the_page_says_card_payments_are_off(client, settings, org, owner):
    settings.STRIPE_SECRET_KEY = ""
    html = login(client, owner).get(balance_url()).content.decode()
    assert "Card payments are not available on this server." in html
    response = client.post(TOPUP, {"amount": "25.00"})
    assert _messages(response) == ["card top-ups are not available"]
    assert StripeCheckout.objects.count() == 0


@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.VIEWER])
def test_a_developer_or_viewer_may_not_pay(client, stripe_api, org, role):
    response = login(client, user_with_role(org, role)).post(TOPUP, {"amount": "25.00"})
    assert response.status_code == 403
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0


def test_an_outsider_may_not_pay_for_someone_else(client, stripe_api, org, outsider):
    response = login(client, outsider).post(TOPUP, {"amount": "25.00"})
    assert response.status_code == 404
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0


def test_an_anonymous_visitor_may_not_open_a_checkout(client, stripe_api, org):
    response = client.post(TOPUP, {"amount": "25.00"})
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
    assert stripe_api.requests == []


def test_the_top_up_takes_a_post_only(client, stripe_api, org, owner):
    assert login(client, owner).get(TOPUP).status_code == 405


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("4.99", "the smallest card top-up is $5.00"),
        ("1000.01", "the largest card top-up is $1000.00"),
        ("10.005", "a card top-up is a whole number of cents"),
        ("0", "the smallest card top-up is $5.00"),
        ("ten", "Enter an amount in US dollars, such as 25.00."),
        ("-10", "Enter an amount in US dollars, such as 25.00."),
        ("1e3", "Enter an amount in US dollars, such as 25.00."),
        ("NaN", "Enter an amount in US dollars, such as 25.00."),
        ("", "This field is required."),
    ],
)
def test_a_bad_amount_is_refused_with_a_message_and_stripe_is_asked_nothing(
    client, stripe_api, org, owner, amount, message
):
    response = login(client, owner).post(TOPUP, {"amount": amount})
    assert (response.status_code, response["Location"]) == (302, balance_url())
    assert _messages(response) == [message]
    assert stripe_api.requests == []
    assert StripeCheckout.objects.count() == 0


def test_a_dollar_sign_is_fine(client, stripe_api, org, owner):
    assert login(client, owner).post(TOPUP, {"amount": "$25"}).status_code == 303
    assert StripeCheckout.objects.get().amount_nano == parse_usd("25")


def test_when_stripe_is_down_the_customer_is_told_to_try_again(client, stripe_api, org, owner):
    stripe_api.fail_status = 500
    response = login(client, owner).post(TOPUP, {"amount": "25.00"})
    assert _messages(response) == [
        "the payment provider did not answer; please try again in a minute"
    ]
    assert StripeCheckout.objects.count() == 0


def test_the_top_up_form_needs_its_csrf_token(csrf_client, stripe_api, org, owner):
    login(csrf_client, owner)
    assert csrf_client.post(TOPUP, {"amount": "25.00"}).status_code == 403
    assert stripe_api.requests == []
    token = get_random_string(32)
    csrf_client.cookies["csrftoken"] = token
    response = csrf_client.post(TOPUP, {"amount": "25.00", "csrfmiddlewaretoken": token})
    assert response.status_code == 303


# --- the page Stripe sends the customer back to ---------------------------------------------


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN, Role.DEVELOPER, Role.VIEWER])
def test_the_return_page_waits_for_the_payment_to_be_confirmed(client, stripe_api, org, role):
    checkout = _open_checkout(org, org.memberships.get(role=Role.OWNER).user)
    response = login(client, user_with_role(org, role)).get(_return_url(checkout))
    assert response.status_code == 200
    html = response.content.decode()
    assert "Waiting for payment confirmation of $10.00" in html
    assert f'data-poll-url="/o/acme/balance/topup/{checkout.session_id}/status"' in html
    assert "/static/js/topup-status.js" in html
    assert f'href="{checkout.url}"' in html  # back to Stripe's page while it is open
    assert "no-store" in response["Cache-Control"]


def test_the_return_page_flips_to_the_new_balance_once_the_webhook_credited(
    client, stripe_api, org, owner
):
    credit_grant(organization=org, amount_nano=parse_usd("1.25"))
    checkout = _open_checkout(org, owner)
    login(client, owner)
    status_url = _return_url(checkout) + "status"
    waiting = client.get(status_url)
    assert waiting.status_code == 200
    assert "Waiting for payment confirmation" in waiting.content.decode()
    assert "data-final" not in waiting.content.decode()

    payload, signature = signed_event(stripe_api.sessions[checkout.session_id])
    assert _post_event(Client(), payload, signature).status_code == 200

    paid = client.get(status_url).content.decode()
    assert "data-final" in paid
    assert "Payment received." in paid
    assert "$10.00 was added to the balance." in paid
    assert 'id="topup-new-balance" data-nano="11250000000">$11.25<' in paid
    page = client.get(_return_url(checkout)).content.decode()
    assert "data-poll-url" not in page  # nothing left to wait for
    assert "$11.25" in page
    history = client.get(balance_url()).content.decode()
    assert f"Card payment <code>{checkout.session_id}</code>" in history
    _assert_books_clean()


def test_an_expired_session_says_nothing_was_charged(client, stripe_api, org, owner):
    checkout = _open_checkout(org, owner)
    session = stripe_api.sessions[checkout.session_id]
    payload, signature = signed_event(session, event_type="checkout.session.expired")
    _post_event(Client(), payload, signature)
    html = login(client, owner).get(_return_url(checkout) + "status").content.decode()
    assert "expired before it was paid. Nothing was charged." in html
    assert "data-final" in html


def test_the_status_fragment_is_never_cached(client, stripe_api, org, owner):
    checkout = _open_checkout(org, owner)
    response = login(client, owner).get(_return_url(checkout) + "status")
    assert "no-store" in response["Cache-Control"]
    assert "<html" not in response.content.decode()


def test_another_organizations_checkout_is_404_under_either_slug(
    client, stripe_api, org, owner, outsider
):
    elsewhere = outsider.memberships.get().organization
    theirs = _open_checkout(elsewhere, outsider, slug=elsewhere.slug)
    ours = _open_checkout(org, owner)
    login(client, owner)
    for url in (
        _return_url(theirs),  # their session under our slug
        _return_url(theirs) + "status",
        _return_url(theirs, slug=elsewhere.slug),  # under theirs
        _return_url(theirs, slug=elsewhere.slug) + "status",
        "/o/acme/balance/topup/cs_test_does_not_exist/",
    ):
        assert client.get(url).status_code == 404, url
    login(client, outsider)
    assert client.get(_return_url(ours)).status_code == 404
    assert client.get(_return_url(ours, slug=elsewhere.slug)).status_code == 404


# --- POST /stripe/webhook ---------------------------------------------------------------------


@pytest.fixture
def session(stripe_api, org, owner) -> dict:
    return stripe_api.sessions[_open_checkout(org, owner).session_id]


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
    checkout = _open_checkout(org, owner, slug="hooked")
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
