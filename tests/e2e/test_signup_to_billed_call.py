"""From sign-up to the first billed API call, in a real browser: sign up, create a key,
redeem a code, call the API with that key through the `openai` SDK, and find the call in
the request log with the balance lower by exactly its cost. Also the card top-up's return
page, which updates itself when Stripe's webhook credits the payment."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from openai import OpenAI
from playwright.sync_api import Page, expect

from apps.billing.money import call_cost_nano, format_usd, parse_usd
from apps.billing.services import credit_grant
from apps.billing.topups import checkout_create, code_mint
from apps.catalog.models import Price
from apps.catalog.selectors import routes_forget
from apps.catalog.services import channel_add, price_set
from apps.keys.services import key_create
from apps.tenancy.models import User
from apps.tenancy.services import organization_create
from apps.usage.models import UsageRecord
from apps.usage.tasks import rollup_usage
from tests.dashboard.money import settled_call
from tests.fakes.stripe_api import WEBHOOK_SECRET, StripeFake, signed_event

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # The stripe library hands httpx the encoded form as text, which httpx deprecates.
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

EMAIL = "first-customer@example.com"
PASSWORD = "a-long-and-unusual-passphrase"


@pytest.fixture
def gpt4o(upstream) -> Price:
    """What the operator set up before any customer came: a price and a channel."""
    upstream.reset()
    price = price_set(
        model_name="gpt-4o",
        input_nano_per_mtok=parse_usd("2.50"),
        cached_input_nano_per_mtok=parse_usd("1.25"),
        output_nano_per_mtok=parse_usd("10.00"),
    )
    channel_add(
        name="openai",
        kind="openai",
        base_url=upstream.base_url,
        api_key="sk-upstream-secret",
        models={"gpt-4o": "gpt-4o-2024-08-06"},
        timeout_seconds=10,
    )
    routes_forget()
    return price


def _nano(page: Page, selector: str) -> int:
    return int(page.locator(selector).first.get_attribute("data-nano"))


def test_sign_up_create_a_key_redeem_a_code_and_see_the_call_billed(
    real200, gpt4o, upstream, page, shoot
):
    [code] = code_mint(amount_nano=parse_usd("10.00"), count=1, batch="e2e", created_by=None)

    # Sign up: the new user lands in their personal organization.
    page.goto(f"{real200}/accounts/signup/")
    shoot(page, "01-signup")
    page.get_by_label("Email address").fill(EMAIL)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page).to_have_url(re.compile(r"/o/[\w-]+/keys/$"))
    slug = page.url.rstrip("/").split("/")[-2]
    shoot(page, "02-keys")

    # Create a key: shown once, in full.
    page.get_by_role("link", name="Create a key").click()
    page.get_by_label("Name").fill("my app")
    shoot(page, "03-key-form")
    page.get_by_role("button", name="Create key").click()
    clear_key = page.locator("#secret").inner_text().strip()
    assert clear_key.startswith("sk-real200-")
    shoot(page, "04-key-created")

    # Redeem the code on the balance page.
    page.get_by_role("navigation", name="Organization").get_by_role("link", name="Balance").click()
    expect(page).to_have_url(f"{real200}/o/{slug}/balance/")
    page.get_by_label("Code").fill(code)
    page.get_by_label("Code").press("Enter")  # by keyboard: the form submits on Enter
    expect(page.get_by_text("Code redeemed: $10.00 was added to the balance.")).to_be_visible()
    before = _nano(page, "#available-balance")
    assert before == parse_usd("10.00")
    shoot(page, "05-balance-redeemed")

    # The customer's app calls the API with the key, through the official SDK.
    client = OpenAI(base_url=f"{real200}/v1", api_key=clear_key, max_retries=0, timeout=30)
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}], max_tokens=50
    )
    assert completion.choices[0].message.content
    assert len(upstream.calls) == 1
    cost = call_cost_nano(
        prompt_tokens=completion.usage.prompt_tokens,
        cached_tokens=0,
        cache_write_tokens=0,
        completion_tokens=completion.usage.completion_tokens,
        rates=gpt4o,
    )
    assert cost > 0
    record = UsageRecord.objects.get(request_id=completion.id)
    assert record.charged_nano == cost

    # The call is in the request log, with its key, model, tokens and cost.
    rollup_usage()  # what beat runs every five minutes, so the charts show the call too
    page.get_by_role("navigation", name="Organization").get_by_role("link", name="Usage").click()
    row = page.locator("table.request-log tbody tr").filter(has_text=completion.id)
    expect(row).to_have_count(1)
    expect(row.locator('[data-label="Model"]')).to_have_text("gpt-4o")
    expect(row.locator('[data-label="Key"]')).to_contain_text("my app")
    expect(row.locator('[data-label="Output tokens"]')).to_have_text(
        str(completion.usage.completion_tokens)
    )
    assert int(row.locator('[data-label="Cost"]').get_attribute("data-nano")) == cost
    expect(page.locator("figure.chart").first).to_contain_text("gpt-4o")
    shoot(page, "06-usage")

    # And the balance is lower by exactly that cost.
    page.get_by_role("navigation", name="Organization").get_by_role("link", name="Balance").click()
    assert _nano(page, "#available-balance") == before - cost
    newest = page.locator("table.ledger tbody tr").first
    expect(newest).to_contain_text(completion.id)
    assert int(newest.locator('[data-label="Amount"]').get_attribute("data-nano")) == -cost
    shoot(page, "07-balance-after-call")


def test_the_top_up_page_updates_itself_when_the_payment_is_confirmed(
    real200, page, shoot, settings
):
    user = User.objects.create_user(email="payer@example.com", password=PASSWORD)
    org = organization_create(slug="payer", name="Payer", owner=user)
    with StripeFake() as stripe_api:
        settings.STRIPE_SECRET_KEY = stripe_api.secret_key
        settings.STRIPE_API_BASE = stripe_api.base_url
        settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
        checkout = checkout_create(
            organization=org,
            amount_nano=parse_usd("25.00"),
            user=user,
            success_url=f"{real200}/o/payer/balance/topup/{{CHECKOUT_SESSION_ID}}/",
            cancel_url=f"{real200}/o/payer/balance/",
        )
        page.goto(f"{real200}/accounts/login/")
        page.get_by_label("Email address").fill(user.email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.goto(f"{real200}/o/payer/balance/topup/{checkout.session_id}/")
        expect(page.get_by_text("Waiting for payment confirmation of $25.00")).to_be_visible()
        shoot(page, "08-topup-waiting")

        # Stripe confirms the payment; the page sees it at its next poll.
        payload, signature = signed_event(stripe_api.sessions[checkout.session_id])
        response = httpx.post(
            f"{real200}/stripe/webhook",
            content=payload,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
        )
        assert response.status_code == 200
        new_balance = page.locator("#topup-new-balance")
        expect(new_balance).to_have_text("$25.00", timeout=10_000)
        expect(page.get_by_text("Payment received.")).to_be_visible()
        assert int(new_balance.get_attribute("data-nano")) == parse_usd("25.00")
        shoot(page, "09-topup-paid")


def test_a_usage_page_with_a_month_of_traffic(real200, gpt4o, page, shoot):
    """Not a check so much as the picture the README shows: a month of calls by three
    models and two keys (copied to docs/usage-page.png when it changes)."""
    user = User.objects.create_user(email="busy@example.com", password=PASSWORD)
    org = organization_create(slug="busy", name="Busy Co", owner=user)
    credit_grant(organization=org, amount_nano=parse_usd("500.00"))
    mini = price_set(
        model_name="gpt-4o-mini",
        input_nano_per_mtok=parse_usd("0.15"),
        output_nano_per_mtok=parse_usd("0.60"),
    )
    claude = price_set(
        model_name="claude-sonnet-4",
        input_nano_per_mtok=parse_usd("3.00"),
        output_nano_per_mtok=parse_usd("15.00"),
    )
    web, _clear = key_create(organization=org, name="web app")
    batch, _clear = key_create(organization=org, name="nightly batch")
    today = datetime.now(tz=UTC).replace(hour=9, minute=0, second=0, microsecond=0)
    number = 0
    for days_ago in range(29, -1, -1):
        at = today - timedelta(days=days_ago)
        # A weekly rhythm and growth over the month, in whole tokens.
        load = 3 + (29 - days_ago) // 6 + (2 if at.weekday() < 5 else 0)
        for price, key, prompt, completion in (
            (gpt4o, web, 900 * load, 300 * load),
            (mini, web, 4000 * load, 1500 * load),
            (claude, batch, 1200 * load if days_ago % 3 else 0, 500 * load if days_ago % 3 else 0),
        ):
            if prompt:
                number += 1
                settled_call(
                    org,
                    key,
                    price,
                    f"chatcmpl-demo{number:04d}",
                    at=at + timedelta(minutes=number % 50),
                    prompt_tokens=prompt,
                    cached_tokens=prompt // 4,
                    completion_tokens=completion,
                    latency_ms=400 + (number * 37) % 900,
                )
    rollup_usage(hours=24 * 31)
    page.goto(f"{real200}/accounts/login/")
    page.get_by_label("Email address").fill(user.email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{real200}/o/busy/usage/")
    expect(page.locator("svg.bars").first).to_be_visible()
    spent = format_usd(sum(UsageRecord.objects.values_list("charged_nano", flat=True)), 2)
    assert spent != "0.00"
    page.set_viewport_size({"width": 1280, "height": 1280})
    shoot(page, "usage-page", full_page=False)
    # On a phone the charts scroll sideways and the tables become cards.
    page.set_viewport_size({"width": 390, "height": 844})
    shoot(page, "usage-page-phone", full_page=False)
    page.goto(f"{real200}/o/busy/balance/")
    page.locator("#ledger-heading").scroll_into_view_if_needed()
    shoot(page, "balance-page-phone", full_page=False)
